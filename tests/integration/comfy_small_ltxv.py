"""LTX-Video on ComfyUI's MODEL, small: ComfyUI's LTXV entry (its LTXVModel) at 2 layers of 2 heads of 32 (inner 64;
any width builds: its RoPE pads what the three axes leave over), caption width 32; ComfyUI's own T5-XXL encoder (the
LTXV clip target, T5 tokenizer padding to 128 tokens with its attention mask) at d_model 32, 2 layers, 2 heads of 16;
ComfyUI's own LTX VideoVAE from a random state dict with its config in the file's metadata, as Load Checkpoint hands
an LTX checkpoint's VAE its metadata (VAELoader passes none, and a state dict alone makes ComfyUI guess the full-size
config from the decoder's widths). That VAE is the demo's TINY_VAE: 128 latent channels, 32x spatial (patch 4 and
three space-to-depth steps), 8x temporal, a timestep-conditioned decoder; its encoder's first width is fixed at 128
by ComfyUI. Clips of 9 frames at 64 px are 2 latent frames of 2x2."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from comfy_small import SmallFamily, fill_random, small_clip, small_model

CAPTION = 32  # the T5 width, the model's caption_channels
UNET = {"image_model": "ltxv", "in_channels": 128, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 32,
        "cross_attention_dim": 64, "caption_channels": CAPTION}
T5 = {"d_model": CAPTION, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 2}

EXPECT = {"detected": "LTXV", "model_class": "LTXV", "stacks": ["transformer_blocks"],
          "text_keys": ["attention_mask", "attention_mask__shape", "cross_attn", "cross_attn__shape"],
          "latent_shapes": [[128, 2, 2, 2]], "sample_shape": [3, 9, 64, 64],
          "condition_effects": ["fps_effect", "mask_effect"]}


def _write_vae(path: Path) -> None:
    """ComfyUI's VideoVAE at the tiny config, random, saved with the config in the metadata (as an LTX checkpoint
    carries it); the per-channel statistics a plausible spread."""
    import comfy.ldm.lightricks.vae.causal_video_autoencoder as ltx_vae
    from trainer.demo.ltxv import TINY_VAE
    from trainer.fileio import save_safetensors_atomic

    vae = ltx_vae.VideoVAE(config=TINY_VAE)
    fill_random(vae, seed=5)
    g = torch.Generator().manual_seed(6)
    sd = {k: v.detach().float().contiguous() for k, v in vae.state_dict().items()}
    for k in list(sd):
        if k.startswith("per_channel_statistics."):
            sd[k] = 0.8 + 0.4 * torch.rand(128, generator=g) if "std" in k else 0.1 * torch.randn(128, generator=g)
        elif k.endswith("timestep_scale_multiplier"):
            sd[k] = torch.tensor(1000.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(sd, path, {"config": json.dumps({"vae": TINY_VAE})})


def ltxv_vae(cache: Path):
    """ComfyUI's VAE over the tiny LTX VAE file, given the file's metadata as Load Checkpoint gives it."""
    import comfy.sd
    import comfy.utils

    path = cache / "ltxv_vae_tiny_v1.safetensors"
    if not path.exists():
        _write_vae(path)
    sd, metadata = comfy.utils.load_torch_file(str(path), return_metadata=True)
    with torch.inference_mode():
        return comfy.sd.VAE(sd=sd, metadata=metadata)


def build(cache: Path, comfyui: str) -> SmallFamily:
    patcher = small_model("LTXV", UNET)
    clip = small_clip(patcher, {"t5xxl": T5})
    # flux_shift: the training sigmas shifted by the latent's mu (ComfyUI's LTXV sampling shift)
    return SmallFamily(patcher, clip, ltxv_vae(cache), latent_shape=(1, 128, 2, 2, 2), video_frames=9,
                       settings={"timestep_type": "flux_shift"})
