"""Z-Image on ComfyUI's MODEL, small: ComfyUI's ZImage entry (Lumina2's NextDiT with Z-Image's modulation, as its
detection configures dim 3840) at dim 256 (the least its timestep embedder
and modulation take: they are min(dim, 256) wide), 2 heads of 128, 2 layers, 1 refiner layer each; its Qwen3-4B text encoder at hidden 32,
3 layers (Z-Image takes the second-to-last hidden state); the 16-channel Flux VAE."""

from __future__ import annotations

from pathlib import Path

from comfy_small import SmallFamily, flux_vae, small_clip, small_model

CAP = 32  # the text encoder's width, the model's cap_feat_dim
UNET = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "cap_feat_dim": CAP, "n_layers": 2,
        "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "qk_norm": True, "axes_dims": [32, 48, 48],
        "axes_lens": [300, 64, 64], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True,
        "time_scale": 1000.0, "pad_tokens_multiple": 32}
QWEN3 = {"hidden_size": CAP, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
         "num_key_value_heads": 1}

EXPECT = {"detected": "ZImage", "model_class": "Lumina2", "stacks": ["context_refiner", "layers", "noise_refiner"],
          "text_keys": ["attention_mask", "attention_mask__shape", "cross_attn", "cross_attn__shape"]}


def build(cache: Path, comfyui: str) -> SmallFamily:
    patcher = small_model("ZImage", UNET)
    clip = small_clip(patcher, {"qwen3_4b": QWEN3})
    return SmallFamily(patcher, clip, flux_vae(cache), latent_shape=(1, 16, 8, 8))
