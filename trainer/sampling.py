"""Preview sampling: Euler steps over the family's flow sigmas, with distilled or classifier-free guidance."""

from __future__ import annotations

import torch

from .models.base import Conditioning, SampleRequest, TrainingModel


def initial_noise(model: TrainingModel, width: int, height: int, seed: int) -> torch.Tensor:
    f = model.pixel_factor
    w, h = max(f, width // f * f), max(f, height // f * f)
    scale = f // 2 if f >= 2 else 1  # latent cells per pixel side = VAE downsampling (pixel_factor / patch 2)
    shape = (1, model.latent_channels(), h // scale, w // scale)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def denoise(model: TrainingModel, noise: torch.Tensor, cond: Conditioning, neg: Conditioning | None, steps: int, guidance_scale: float) -> torch.Tensor:
    sigmas = model.sample_sigmas(steps, tuple(noise.shape))
    x = model.objective.initial(noise.float(), sigmas[0])
    cfg = (not model.distilled_guidance) and guidance_scale > 1.0 and neg is not None
    # an objective whose target is not dx/dsigma (v-prediction) says how to turn the output into it
    to_derivative = getattr(model.objective, "derivative", None)
    for i in range(steps):
        s = sigmas[i].reshape(1).expand(x.shape[0])
        v = model.predict(x, s, cond, guidance=guidance_scale).float()
        if cfg:
            v_neg = model.predict(x, s, neg, guidance=guidance_scale).float()
            v = v_neg + guidance_scale * (v - v_neg)
        if to_derivative is not None:
            v = to_derivative(x, v, sigmas[i])
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def sample_image(model: TrainingModel, req: SampleRequest) -> torch.Tensor:
    """One image in [-1, 1], (3, h, w)."""
    noise = initial_noise(model, req.width, req.height, req.seed)
    lat = denoise(model, noise, req.cond, req.neg_cond, req.steps, req.guidance_scale)
    return model.decode(lat)[0]


def to_pil(img: torch.Tensor):
    from PIL import Image

    arr = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)
