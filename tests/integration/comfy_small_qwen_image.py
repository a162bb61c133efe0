"""Qwen-Image on ComfyUI's MODEL, small: ComfyUI's QwenImage entry (its QwenImageTransformer2DModel, which detection
builds at 60 blocks of 24 heads x 128) at 2 blocks of 2 heads x 32 (RoPE axes 8 + 12 + 12 = the head width, as
ComfyUI's EmbedND needs; the timestep embedder is 256 wide whatever the width), reading the text encoder's 32 wide
states; its Qwen2.5-VL-7B text encoder through ComfyUI's qwen25_7b config override at hidden 32, 2 layers, 1 head
(ComfyUI fixes the head width at 128 and the vocabulary at Qwen2.5's 152064, which its chat template's token ids need);
the 16-channel Wan 2.1 VAE ComfyUI detects from a dim-16 state dict (the smallest its Wan VAE builds).

The text encoder's vision tower (Qwen2VLVisionTransformer) is built by ComfyUI at its fixed full size (1280 wide, 32
blocks, ~670M weights) whatever the config; text-to-image never runs it, so its weights are left as ComfyUI's
constructor made them (uninitialised, never read: filling them would cost 2.7 GB and seconds for nothing). Qwen-Image-
Edit (comfy_small_qwen_image_edit.py) runs it and fills it.

ComfyUI samples Qwen-Image with ModelSamplingFlux at its config's fixed shift 1.15 (mu, whatever the resolution): the
check reports the training shift the backend takes (`train_shift_mu`) at two latent sizes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from comfy_small import SmallFamily, fill_random, small_model, wan21_vae

TEXT = 32  # the text encoder's width, the model's joint_attention_dim
UNET = {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 2, "attention_head_dim": 32,
        "num_attention_heads": 2, "joint_attention_dim": TEXT, "axes_dims_rope": (8, 12, 12)}
QWEN25_7B = {"hidden_size": TEXT, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 1,
             "num_key_value_heads": 1}

# the last block's text stream is computed and discarded (the model returns the image tokens only): its text-only
# layers get no gradient, their LoRA stays zero, as on the full model
LAST = f"diffusion_model.transformer_blocks.{UNET['num_layers'] - 1}"
DISCARDED = [f"{LAST}.{name}" for name in ("attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")]
EXPECT = {"detected": "QwenImage", "model_class": "QwenImage", "stacks": ["transformer_blocks"],
          "text_keys": ["cross_attn", "cross_attn__shape"], "untrained": DISCARDED, "shift_mu": 1.15}


def small_qwen_clip(patcher, seed: int = 1, vision: bool = False):
    """ComfyUI's CLIP over QwenImage's clip_target, its Qwen2.5-VL-7B at QWEN25_7B, random; the vision tower's weights
    filled only when `vision` (Edit runs it)."""
    import comfy.sd

    options = {"qwen25_7b_model_config": QWEN25_7B, "dtype": torch.float32}
    clip = comfy.sd.CLIP(target=patcher.model.model_config.clip_target(), model_options=options)
    qwen = clip.cond_stage_model.qwen25_7b.transformer  # comfy.text_encoders.llama.Qwen25_7BVLI
    fill_random(qwen.model, seed)
    if vision:
        fill_random(qwen.visual, seed + 1)
    return clip


def build(cache: Path, comfyui: str) -> SmallFamily:
    patcher = small_model("QwenImage", UNET)
    clip = small_qwen_clip(patcher)
    return SmallFamily(patcher, clip, wan21_vae(cache), latent_shape=(1, 16, 1, 8, 8))
