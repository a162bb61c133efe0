"""ComfyUI's own diffusion model and text encoder of a family, built small in memory with random weights, for the
training tests on ComfyUI's MODEL. Runs inside ComfyUI's python.

ComfyUI's detection hard-codes the full size of most newer families (Z-Image's dim 3840, Qwen-Image's 60 layers ...),
so a small file would not be detected as them. Instead each family's `supported_models` entry is instantiated with a
small unet_config and built as `load_diffusion_model` builds a detected one (get_model, ModelPatcher), and its CLIP is
ComfyUI's CLIP object over the entry's own `clip_target()` with a small text-encoder config (ComfyUI reads
`model_options["<encoder>_model_config"]`). Only the sizes are ours; the classes, the conditioning, the sampling
settings and the LoRA key map are ComfyUI's.

A family module `comfy_small_<name>.py` exposes `build(cache: Path, comfyui: str) -> SmallFamily` and `EXPECT`
(what the test asserts about it); comfy_check_train.py imports it by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch


@dataclass
class SmallFamily:
    """A family's ComfyUI MODEL / CLIP / VAE, built small, and what the training check needs to drive it."""

    patcher: Any
    clip: Any
    vae: Any
    latent_shape: tuple[int, ...]  # the fixed test latent, batch of one: (1, c, h, w) or (1, c, f, h, w)
    video_frames: int | None = None  # a video family trains on clips of this many frames
    captions: list[str] = field(default_factory=lambda: ["a photo of a red cat", "a sketch of a blue house"])
    settings: dict = field(default_factory=dict)  # train: keys beside the check's defaults
    model_keys: dict = field(default_factory=dict)  # model: keys a ComfyUI MODEL takes from its node (expert)
    controls: bool = False  # the dataset has a control folder: one reference image per item (reference_latents)
    clip_vision: Any = None  # ComfyUI's CLIP_VISION, for the models that read its features (Wan 2.1 I2V)
    # datasets[]: keys beside the check's defaults, given the work folder and the training clips' folder (a
    # conditioned family's do_i2v, or the control / mask / reference folders it writes with the clips' names)
    dataset: Callable[[Path, Path], dict] | None = None
    # the file whose weights ComfyUI holds in fp8 (a family loaded at weight_dtype fp8): its own precision, the
    # reference of the fp8 gradient comparison
    reference_file: str | None = None


def fill_random(module: torch.nn.Module, seed: int, scale: float = 1.0) -> None:
    """Every parameter of a module built with ComfyUI's uninitialised ops given seeded values: matrices and kernels
    at 1/sqrt(fan_in) (times `scale`), norm weights one, other vectors small; buffers (RoPE tables ...) stay as
    the constructor made them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() >= 2:
                fan_in = p[0].numel()
                value = torch.randn(p.shape, generator=g) * (scale / fan_in ** 0.5)
            elif "norm" in name and leaf in ("weight", "scale"):
                value = torch.ones(p.shape)
            else:
                value = 0.02 * torch.randn(p.shape, generator=g)
            p.copy_(value.to(p.dtype))


def small_model(config_name: str, unet_config: dict, seed: int = 0, dtype: torch.dtype = torch.float32,
                scale: float = 1.0):
    """ComfyUI's ModelPatcher over the `comfy.supported_models.<config_name>` model built at `unet_config`, as
    load_diffusion_model builds a detected one, with seeded random weights."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm

    model_config = getattr(sm, config_name)(dict(unet_config))
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, "")
    fill_random(model.diffusion_model, seed, scale)
    model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def small_clip(patcher, encoder_configs: dict[str, dict], seed: int = 1, clip_target=None,
               tokenizer_data: dict | None = None):
    """ComfyUI's CLIP over the family's own clip_target (or `clip_target`), each text encoder at its small config
    (`encoder_configs`: encoder name -> config keys, e.g. {"qwen3_4b": {"hidden_size": 32, ...}}), random weights;
    `tokenizer_data` as ComfyUI's CLIP loader passes what a text encoder file carries (a tokenizer's vocabulary)."""
    import comfy.sd

    target = clip_target or patcher.model.model_config.clip_target()
    options = {f"{name}_model_config": cfg for name, cfg in encoder_configs.items()}
    options["dtype"] = torch.float32
    clip = comfy.sd.CLIP(target=target, model_options=options, tokenizer_data=tokenizer_data or {})
    fill_random(clip.cond_stage_model, seed)
    return clip


def flux_vae(cache) -> Any:
    """The 16-channel ldm VAE ComfyUI builds for Flux-layout latents (its fixed widths), random, as VAELoader loads
    it (Flux, Chroma, Z-Image, HiDream, SD3 latents)."""
    import comfy.sd
    import comfy.utils
    from trainer.demo import tiny

    path = cache / "vae16_v1.safetensors"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tiny.make_vae_file(path, [128, 256, 512, 512], layers=2, latent=16)
    with torch.inference_mode():
        return comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))


def wan21_vae(cache) -> Any:
    """ComfyUI's Wan 2.1 VAE (16 latent channels, 8x spatial, 4x temporal) at dim 16, random, as VAELoader loads it
    (Wan 2.1, Wan 2.2 A14B, Qwen-Image latents)."""
    import comfy.ldm.wan.vae as wan_vae
    import comfy.sd
    import comfy.utils
    from comfy_fixtures import _random, _save, _shapes

    path = cache / "wan21_vae16_v1.safetensors"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with torch.device("meta"):
            vae = wan_vae.WanVAE(dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                 temperal_downsample=[False, True, True])
        _save(_random(_shapes(vae), 32, torch.float32), path)
    with torch.inference_mode():
        return comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))
