"""Flux.1 on ComfyUI's MODEL with its weights held in fp8: the `flux` fixture (comfy_fixtures.flux_files: a bf16 file
ComfyUI detects as Flux, hidden 3072, 1 double + 1 single block, CLIP-L text) loaded as ComfyUI's UNETLoader loads it
with weight_dtype fp8_e4m3fn: comfy.sd.load_diffusion_model(path, model_options={"dtype": torch.float8_e4m3fn}).
ComfyUI then builds the model at that dtype (every parameter of its ops layers stored as float8_e4m3fn, rounded from
the file's bf16 at load) with manual_cast ops: each layer casts its weight to the compute dtype ComfyUI picks for the
device (unet_manual_cast: float32 on the CPU) for its own matmul; nothing is ever stored upcast.

EXPECT["fp8"] names what comfy_check_train.py checks beside the usual: the storage dtype, the upcast weights kept for
backward, the gradient against the same model upcast and against the file's bf16 weights, ComfyUI's two ways of
patching a LoRA into fp8 weights. The fixture is shared with `flux` (its file in the cache)."""

from __future__ import annotations

from pathlib import Path

import torch

from comfy_small import SmallFamily

EXPECT = {"detected": "Flux", "model_class": "Flux", "stacks": ["double_blocks", "single_blocks"],
          "text_keys": ["cross_attn", "cross_attn__shape", "pooled_output", "pooled_output__shape"],
          "fp8": {"weight_dtype": "torch.float8_e4m3fn", "scaled": False}}


def load_fp8(files: dict, weight_dtype: torch.dtype | None = torch.float8_e4m3fn):
    """MODEL, CLIP, VAE as UNETLoader (weight_dtype fp8_e4m3fn; None: its default, for a file stored in fp8),
    CLIPLoader (type stable_diffusion) and VAELoader load them."""
    import comfy.sd
    import comfy.utils

    with torch.inference_mode():  # as every node runs
        options = {} if weight_dtype is None else {"dtype": weight_dtype}
        model = comfy.sd.load_diffusion_model(files["unet"], model_options=options)
        clip = comfy.sd.load_clip([files["clip"]], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(files["vae"]))
    return model, clip, vae


def build(cache: Path, comfyui: str) -> SmallFamily:
    import comfy_fixtures

    files = comfy_fixtures.flux_files(cache)
    patcher, clip, vae = load_fp8(files)
    return SmallFamily(patcher, clip, vae, latent_shape=(1, 16, 8, 8), reference_file=files["unet"])
