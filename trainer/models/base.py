"""What the training loop needs from a model, whatever its family or backend.

The loop sees a `TrainingModel`: a denoiser to adapt (with its trainable targets named by
ComfyUI's own keys), text/pixel encoders, an objective and `predict`. Family differences live
in the family modules, never in the loop.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch
import torch.utils.checkpoint
from torch import nn

# Conditioning for a batch: family-defined tensors, batch dimension first.
Conditioning = dict[str, torch.Tensor]


def split_conditioning(cond: Conditioning) -> list[Conditioning]:
    n = next(iter(cond.values())).shape[0]
    return [{k: v[i] for k, v in cond.items()} for i in range(n)]


def collate_conditioning(items: list[Conditioning]) -> Conditioning:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def conditioning_to(cond: Conditioning, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditioning:
    out = {}
    for k, v in cond.items():
        v = v.to(device)
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v
    return out


@dataclass
class TargetMember:
    """One module of the backend that computes rows `rows` of the ComfyUI weight named by the target."""

    module: nn.Module
    rows: slice


@dataclass
class Target:
    """A trainable layer as ComfyUI names it (`diffusion_model.double_blocks.0.img_attn.qkv`).

    A fused original weight (Flux qkv, linear1) may be computed by several backend modules that
    share one input; each member computes a slice of the fused output rows.
    """

    key: str
    in_features: int
    out_features: int
    members: list[TargetMember]
    kind: str = "linear"
    aliases: tuple[str, ...] = ()  # backend names of the members, also matched by target filters
    component: str = "denoiser"  # or "text_encoder": its captions must then be encoded with grad every step


class FlowObjective:
    """Rectified flow: x_t = (1 - s) x0 + s n, the model predicts n - x0."""

    name = "flow"

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        s = sigmas.view(-1, *([1] * (latents.dim() - 1))).to(latents.dtype)
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


class EpsObjective:
    """Variance-exploding (k-diffusion) form of eps / v models: x_t = x0 + s n, the loss is on eps."""

    name = "eps"

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        s = sigmas.view(-1, *([1] * (latents.dim() - 1))).to(latents.dtype)
        return latents + s * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        return noise

    def snr(self, sigmas: torch.Tensor) -> torch.Tensor:
        return 1.0 / sigmas.clamp_min(1e-6) ** 2

    def initial(self, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return noise * torch.sqrt(1.0 + sigma**2)

    def min_snr_weights(self, sigmas: torch.Tensor, gamma: float) -> torch.Tensor:
        snr = self.snr(sigmas)
        return torch.clamp(snr, max=gamma) / snr


def time_shift_exponential(mu: float, sigmas: torch.Tensor) -> torch.Tensor:
    """Resolution-dependent shift used by Flux: exp(mu) / (exp(mu) + (1/s - 1))."""
    s = sigmas.clamp(1e-7, 1.0)
    return math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0))


def time_shift_linear(shift: float, sigmas: torch.Tensor) -> torch.Tensor:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def linear_mu(seq_len: int, base_seq: int = 256, max_seq: int = 4096, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    m = (max_shift - base_shift) / (max_seq - base_seq)
    return seq_len * m + (base_shift - m * base_seq)


@dataclass
class SampleRequest:
    cond: Conditioning
    neg_cond: Conditioning | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int


class TrainingModel(ABC):
    """The seam between the loop and a family/backend."""

    arch: str = ""
    objective = FlowObjective()
    # image sides must be multiples of this (VAE downsampling x patch size)
    pixel_factor: int = 16
    # guidance distilled into the model (an embedding) rather than classifier-free guidance
    distilled_guidance: bool = False
    denoiser: nn.Module
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @abstractmethod
    def targets(self) -> list[Target]:
        """Trainable layers of the denoiser, named by ComfyUI's keys."""

    @abstractmethod
    def encode_text(self, captions: list[str]) -> Conditioning: ...

    def encode_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """images in [-1, 1], (b, 3, h, w) -> normalized latents (the family's KL VAE in `self.vae`)."""
        from .vae import encode_latents

        return encode_latents(self.vae, images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """normalized latents -> images in [-1, 1]."""
        from .vae import decode_latents

        return decode_latents(self.vae, latents)

    @abstractmethod
    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning, guidance: float | None = None) -> torch.Tensor:
        """Model output in the objective's target space, for latents (b, c, h, w) at noise level sigmas (b,)."""

    @abstractmethod
    def sample_sigmas(self, steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """Descending noise levels for sampling, ending in 0."""

    @abstractmethod
    def latent_channels(self) -> int: ...

    def train_sigmas(self, kind: str, batch: int, gen: torch.Generator, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """Noise levels for a training batch (`train.timestep_type`); flow families share this one."""
        from ..train.timesteps import sample_flow_sigmas

        return sample_flow_sigmas(kind, batch, gen, self.train_shift_mu(latent_shape))

    def schedule_position(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Where each noise level sits on the training schedule, in [0, 1] (0: clean, 1: pure noise): what
        `linear_timesteps` weights. Flow sigmas already are; DDPM families map theirs to t / 999."""
        return sigmas

    def train_shift_mu(self, latent_shape: tuple[int, ...]) -> float | None:
        """mu for resolution-dependent timestep shift, or None if the family has none."""
        return None

    def text_encoder_targets(self) -> list[Target]:
        """Trainable layers of the text encoders (`component="text_encoder"`, ComfyUI's `lora_te1_...` keys),
        for train.train_text_encoder; families without it say so."""
        from ..errors import ConfigError

        raise ConfigError(f"config.process[0].train.train_text_encoder: not supported for model.arch {self.arch!r}"
                          " (only the denoiser is trained); set it to false")

    def encode_text_for_training(self, captions: list[str]) -> Conditioning:
        """Conditioning for a training step: as encode_text, but where the family trains text encoders, with
        gradients reaching their adapters (and left on the model's device)."""
        return self.encode_text(captions)

    def release_text_encoders(self) -> None:
        """Text encoders leave memory once embeddings are cached."""

    def place_denoiser(self) -> None:
        """Move the denoiser onto the training device. Loaders leave it on the CPU so that the text encoders and
        the VAE encode the dataset without sharing the card with it: on 24 GB, T5-XXL next to an 8-12B
        transformer does not fit, either alone does."""
        self.denoiser.to(self.device)

    def text_encoders_loaded(self) -> bool:
        return True

    def set_train_hooks(self, training: bool) -> None:
        """Family-specific switches between training and sampling (e.g. a bypassed guidance embedding)."""

    def set_gradient_checkpointing(self, fraction: float) -> None:
        """Checkpoint this fraction of the denoiser's repeated blocks (0: none, 1: all)."""
        chosen = {id(b) for b in spread_over_depth(self.repeated_blocks(), fraction)}
        if not chosen:
            return

        def checkpoint(module, *args):
            if id(module) in chosen:
                return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)
            return module(*args)

        enable = getattr(self.denoiser, "enable_gradient_checkpointing", None)
        if enable is None:
            raise ValueError(f"{type(self.denoiser).__name__} has no gradient checkpointing")
        enable(gradient_checkpointing_func=checkpoint)

    def repeated_blocks(self) -> list[nn.Module]:
        """The denoiser's repeated blocks, in depth order (for checkpointing and compiling)."""
        return []

    def compile_blocks(self) -> None:
        """Regional torch.compile of the repeated blocks (after the network's hooks are attached).

        Blocks of one class share one code object, and dynamo counts recompiles per code object: a UNet's
        resnets differ in width and resolution, so each needs its own graph. Allow one per block."""
        import torch._dynamo

        blocks = self.repeated_blocks()
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 2 * len(blocks)))
        for b in blocks:
            b.compile(fullgraph=True)

    def latent_cache_id(self) -> str:
        """Identifies the pixel encoder, so cached latents are never reused across encoders."""
        vae = getattr(self, "vae", None)
        if isinstance(vae, nn.Module):
            from ..data.cache import module_fingerprint

            return module_fingerprint(vae)
        return type(self).__name__

    def save_metadata(self) -> dict[str, str]:
        return {"ss_base_model_version": self.arch, "eridiffusion.arch": self.arch}


ModelLoader = Callable[..., TrainingModel]


def spread_over_depth(blocks: list[nn.Module], fraction: float) -> list[nn.Module]:
    """round(fraction * n) of the blocks, spread evenly over depth (0: none, 1: all)."""
    n = len(blocks)
    k = max(0, min(n, round(fraction * n))) if fraction > 0 else 0
    return [blocks[round(i * n / k)] for i in range(k)] if k else []


class BlockForwards:
    """Blocks whose forward is wrapped (e.g. checkpointed), for backends whose blocks are called directly
    rather than through a checkpointing hook of their own; `wrap` undoes the previous wrapping first."""

    def __init__(self) -> None:
        self._wrapped: list[nn.Module] = []

    def wrap(self, blocks: list[nn.Module], wrapper: Callable[[Callable], Callable]) -> None:
        self.restore()
        for b in blocks:
            b.forward = wrapper(b.forward)  # an instance attribute shadows the class's forward
            self._wrapped.append(b)

    def restore(self) -> None:
        for b in self._wrapped:
            b.__dict__.pop("forward", None)
        self._wrapped = []


def checkpointed(forward: Callable) -> Callable:
    """`forward` under non-reentrant activation checkpointing while grad is enabled (keyword arguments kept)."""

    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run
