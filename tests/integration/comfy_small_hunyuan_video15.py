"""HunyuanVideo 1.5 T2V on ComfyUI's MODEL, small: ComfyUI's HunyuanVideo15 entry (its HunyuanVideo model with the 1.5
inputs: 65 input channels = 32 noise + 32 start-image latent + 1 mask, which ComfyUI fills with zeros for text-to-video;
the byT5 glyph mapper, whose 1472 input width ComfyUI fixes; the condition-type embedding; the vision projection,
unused without a start image; no pooled vector, no guidance embedding) at hidden 64 in 2 heads of 32 (RoPE axes
8+12+12 = 32), 2 double blocks and no single blocks (as 1.5 has none), patch 1x1x1. Its text encoders are ComfyUI's
own (the HunyuanVideo15 clip target): Qwen2.5-VL-7B layer -3 with the video template ComfyUI crops, at hidden 32,
4 layers (the least its layer -3 takes), one head (ComfyUI fixes heads of 128); ByT5-small for quoted text
(`conditioning_byt5small`) at ComfyUI's fixed width 1472, 1 layer (its config override is ComfyUI's model_options
"_model_config": ComfyUI names no model for it). The Qwen2.5-VL vision tower is built by ComfyUI at its fixed full
size (~670M weights) and never run for text-to-video: left as ComfyUI's constructor made it, unfilled. The VAE is
ComfyUI's HunyuanVideo 1.5 VAE (32 channels, 16x spatial, 4x temporal) at the size ComfyUI fixes it (1.26B weights,
random; its widths are not read from the state dict). Clips of 5 frames at 64 px are 2 latent frames of 4x4. The
captions carry quoted text, so ComfyUI's tokenizer gives byT5 tokens and the glyph conditioning is trained on."""

from __future__ import annotations

from pathlib import Path

import torch

from comfy_small import SmallFamily, fill_random, small_model
from comfy_small_hunyuan_video import comfy_vae

TEXT = 32  # the Qwen2.5-VL width, the model's context_in_dim
UNET = {"image_model": "hunyuan_video", "in_channels": 65, "out_channels": 32, "patch_size": [1, 1, 1],
        "vec_in_dim": None, "context_in_dim": TEXT, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2,
        "depth_single_blocks": 0, "axes_dim": [8, 12, 12], "theta": 256, "qkv_bias": True, "guidance_embed": False,
        "byt5": True, "meanflow": False, "use_cond_type_embedding": True, "vision_in_dim": 1152, "meanflow_sum": True}
QWEN25_7B = {"hidden_size": TEXT, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 1,
             "num_key_value_heads": 1}
BYT5 = {"num_layers": 1, "d_ff": 64, "num_heads": 2, "d_kv": 16}
CAPTIONS = ['a sign that says "red cat"', 'a poster with the words "blue house"']

# the last double block's text stream is computed and discarded (no single block reads it; the model returns the
# video tokens): its text-only layers get no gradient, their LoRA stays zero, as on the full model
LAST = f"diffusion_model.double_blocks.{UNET['depth'] - 1}"
DISCARDED = [f"{LAST}.{name}" for name in ("txt_attn.proj", "txt_mlp.0", "txt_mlp.2")]
EXPECT = {"detected": "HunyuanVideo15", "model_class": "HunyuanVideo15", "stacks": ["double_blocks"],
          "text_keys": ["conditioning_byt5small", "conditioning_byt5small__shape", "cross_attn", "cross_attn__shape"],
          "latent_shapes": [[32, 2, 4, 4]], "sample_shape": [3, 5, 64, 64], "not_targets": ["txt_in", "byt5_in"],
          "condition_effects": ["byt5_effect"], "untrained": DISCARDED}


def small_clip_hv15(patcher, seed: int = 1):
    """ComfyUI's CLIP over HunyuanVideo15's clip_target at the small configs, random; the vision tower unfilled."""
    import comfy.sd

    options = {"qwen25_7b_model_config": QWEN25_7B, "_model_config": BYT5, "dtype": torch.float32}
    clip = comfy.sd.CLIP(target=patcher.model.model_config.clip_target(), model_options=options)
    te = clip.cond_stage_model
    fill_random(te.qwen25_7b.transformer.model, seed)
    fill_random(te.byt5_small, seed + 1)
    return clip


def hunyuan_video15_vae():
    """ComfyUI's HunyuanVideo 1.5 VAE (its vae_refiner encoder and decoder, 32 latent channels)."""
    return comfy_vae({"decoder.conv_in.conv.weight": torch.zeros(1024, 32, 3, 3, 3)}, seed=11)


def build(cache: Path, comfyui: str) -> SmallFamily:
    patcher = small_model("HunyuanVideo15", UNET)
    # timestep_type shift: the training sigmas shifted by ComfyUI's own sampling shift for the model (7)
    return SmallFamily(patcher, small_clip_hv15(patcher), hunyuan_video15_vae(), latent_shape=(1, 32, 2, 4, 4),
                       video_frames=5, captions=CAPTIONS, settings={"timestep_type": "shift"})
