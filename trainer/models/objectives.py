"""What a denoiser is trained to predict, in one sigma space per objective.

Every objective gives: how to noise latents at noise level sigma, the training target, the SNR (for
min-SNR weighting), the starting latent for sampling, and `derivative`, which turns the model's output
into dx/dsigma for the Euler sampler (the identity where the target already is that).
"""

from __future__ import annotations

import torch


def _per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigmas.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


class FlowObjective:
    """Rectified flow: x_t = (1 - s) x0 + s n, the model predicts the velocity n - x0."""

    name = "flow"

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        s = _per_sample(sigmas, latents)
        return (1.0 - s) * latents + s * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        return noise - latents

    def snr(self, sigmas: torch.Tensor) -> torch.Tensor:
        s = sigmas.clamp(1e-6, 1 - 1e-6)
        return ((1 - s) / s) ** 2

    def initial(self, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The starting latent for sampling from noise level `sigma` (1 for flow)."""
        return noise * sigma

    def min_snr_weights(self, sigmas: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma for a velocity target: x0 error = sigma * velocity error, and x0 losses are
        weighted min(snr, gamma), so velocity losses get sigma^2 * min(snr, gamma)."""
        return sigmas**2 * torch.clamp(self.snr(sigmas), max=gamma)

    def derivative(self, x: torch.Tensor, pred: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return pred  # the velocity is dx/dsigma


class EpsObjective:
    """Variance-exploding (k-diffusion) form of eps models: x_t = x0 + s n, the loss is on eps."""

    name = "eps"

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        return latents + _per_sample(sigmas, latents) * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        return noise

    def snr(self, sigmas: torch.Tensor) -> torch.Tensor:
        return 1.0 / sigmas.clamp_min(1e-6) ** 2

    def initial(self, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return noise * torch.sqrt(1.0 + sigma**2)

    def min_snr_weights(self, sigmas: torch.Tensor, gamma: float) -> torch.Tensor:
        snr = self.snr(sigmas)
        return torch.clamp(snr, max=gamma) / snr

    def derivative(self, x: torch.Tensor, pred: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return pred  # eps is dx/dsigma in this form


class VObjective(EpsObjective):
    """v-prediction in the same sigma space: v = a n - a s x0 with a = 1 / sqrt(1 + s^2)."""

    name = "v"

    def target(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        s = _per_sample(sigmas, latents)
        a = torch.rsqrt(1 + s**2)
        return a * noise - a * s * latents

    def min_snr_weights(self, sigmas: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma for a v target: min(snr, gamma) / (snr + 1)."""
        snr = self.snr(sigmas)
        return torch.clamp(snr, max=gamma) / (snr + 1)

    def derivative(self, x: torch.Tensor, pred: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """dx/dsigma (= eps) from the model's v: eps = a v + a^2 s x."""
        a2 = 1.0 / (1.0 + sigma**2)
        return a2**0.5 * pred + a2 * sigma * x


Objective = FlowObjective | EpsObjective
