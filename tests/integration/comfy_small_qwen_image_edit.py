"""Qwen-Image-Edit on ComfyUI's MODEL, small: the same ComfyUI QwenImage entry as Qwen-Image (comfy_small_qwen_image.py:
the Edit checkpoints have Qwen-Image's layout, and ComfyUI detects them as QwenImage), trained on a dataset with a
control folder: each item's reference image goes in as ComfyUI's `reference_latents` (VAEEncode -> ReferenceLatent),
concatenated to the image tokens inside the same transformer_blocks (Qwen-Image has no stack of its own for them).

The text encoder's vision tower (Qwen2VLVisionTransformer, built by ComfyUI at its fixed full size: 1280 wide, 32
blocks, ~670M weights, 2.7 GB in fp32) is filled and runs: Edit reads the reference image through the VL text encoder
too (TextEncodeQwenImageEditPlus: the image at 384x384 area, 196 vision tokens, ~4 s per encoding on 2 CPU cores).
"""

from __future__ import annotations

from pathlib import Path

from comfy_small import SmallFamily, small_model
from comfy_small_qwen_image import EXPECT as QWEN_IMAGE
from comfy_small_qwen_image import UNET, small_qwen_clip, wan21_vae

EXPECT = {**QWEN_IMAGE, "reference": True, "images_in_text": True}


def build(cache: Path, comfyui: str) -> SmallFamily:
    patcher = small_model("QwenImage", UNET)
    clip = small_qwen_clip(patcher, vision=True)
    return SmallFamily(patcher, clip, wan21_vae(cache), latent_shape=(1, 16, 1, 8, 8), controls=True)
