"""Preview sampling: Euler steps over the family's sigmas, with distilled or classifier-free guidance, for
image latents (b, c, h, w) and video latents (b, c, f, h, w) alike."""

from __future__ import annotations

import torch

from .models.base import Conditioning, SampleRequest, TrainingModel
from .seeds import torch_generator


def initial_noise(model: TrainingModel, width: int, height: int, seed: int, frames: int = 1,
                  leading: int = 0) -> torch.Tensor:
    """The starting noise of a preview: the family's latent shape at this size (rounded as buckets are), with
    `leading` latent frames more before the clip's (VACE's reference frames), drawn in one go as the pipelines do."""
    shape = list(model.latent_shape(width, height, frames))
    if leading:
        shape[2] += leading
    return torch.randn(shape, generator=torch_generator(seed))


def leading_frames(model: TrainingModel, cond: Conditioning) -> int:
    """How many latent frames before the clip's own the conditioning brings (VACE's reference images)."""
    key = model.leading_frames_key
    return int(cond[key].shape[2]) if key is not None and key in cond else 0


@torch.no_grad()
def denoise(model: TrainingModel, noise: torch.Tensor, cond: Conditioning, neg: Conditioning | None, steps: int,
            guidance_scale: float) -> torch.Tensor:
    # the noise is drawn on the CPU (the same for a seed on any device); the steps run where the model is
    sigmas = model.sample_sigmas(steps, tuple(noise.shape)).to(model.device)
    x = model.objective.initial(noise.float().to(model.device), sigmas[0])
    cfg = (not model.distilled_guidance) and guidance_scale > 1.0 and neg is not None
    known = model.known_latents(cond, x)
    if known is not None:  # given frames (I2V's start frame) stay what the conditioning says at every step
        values, given = (t.to(x.device, x.dtype) for t in known)
    for i in range(steps):
        if known is not None:
            x = x * (1 - given) + values * given
        s = sigmas[i].reshape(1).expand(x.shape[0])
        v = model.predict(x, s, model.conditions_at(cond, i, steps), guidance=guidance_scale).float()
        if cfg:
            v_neg = model.predict(x, s, model.conditions_at(neg, i, steps), guidance=guidance_scale).float()
            v = v_neg + guidance_scale * (v - v_neg)
        # an objective whose target is not dx/dsigma (v-prediction) turns the output into it
        v = model.objective.derivative(x, v, sigmas[i])
        if known is not None:
            v = v * (1 - given)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def sample(model: TrainingModel, req: SampleRequest) -> torch.Tensor:
    """One image (3, h, w) or clip (3, f, h, w) in [-1, 1]."""
    model.ensure_loaded()
    lead = leading_frames(model, req.cond)
    noise = initial_noise(model, req.width, req.height, req.seed, req.frames, lead)
    lat = denoise(model, noise, req.cond, req.neg_cond, req.steps, req.guidance_scale)
    return model.decode(lat[:, :, lead:])[0]  # the reference frames are dropped, as ComfyUI's TrimVideoLatent does


def to_pil(img: torch.Tensor):
    """An image (3, h, w) in [-1, 1] as a PIL image."""
    from PIL import Image

    arr = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)
