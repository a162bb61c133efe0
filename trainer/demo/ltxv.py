"""Random LTX-Video files in the layouts ComfyUI loads: one Lightricks-style checkpoint (`models/checkpoints`: the
transformer as `model.diffusion_model.*`, the VAE as `vae.*`, their configs in the file's `config` metadata), a T5
encoder (`models/text_encoders`) and its tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..fileio import save_safetensors_atomic
from ..models.ltxv_layout import (Positions, diffusers_to_original, per_channel_statistics, transformer_metadata,
                                  vae_layout)
from . import tiny

# A small VAE ComfyUI builds from this config (its encoder's first width is always 128): LTX-Video's 32x spatial,
# 8x temporal compression (patches of 4, three space-to-depth steps) and a timestep-conditioned decoder
# (0.9.1 and later), with one resnet per stage and no channel growth.
TINY_VAE = {
    "_class_name": "CausalVideoAutoencoder", "dims": 3, "in_channels": 3, "out_channels": 3, "latent_channels": 128,
    "encoder_blocks": [["res_x", {"num_layers": 1}]] + [["compress_all_res", {"multiplier": 1}]] * 3
    + [["res_x", {"num_layers": 1}]],
    "decoder_blocks": [["res_x", {"num_layers": 1, "inject_noise": False}],
                       ["compress_all", {"residual": True, "multiplier": 1}]] * 3
    + [["res_x", {"num_layers": 1, "inject_noise": False}]],
    "scaling_factor": 1.0, "norm_layer": "pixel_norm", "patch_size": 4, "latent_log_var": "uniform",
    "use_quant_conv": False, "causal_decoder": False, "timestep_conditioning": True, "spatial_padding_mode": "zeros",
}


def ltxv_diffusers_config(inner: int = 64, heads: int = 2, layers: int = 2, caption_channels: int = 64) -> dict:
    return dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=heads,
                attention_head_dim=inner // heads, cross_attention_dim=inner, num_layers=layers,
                activation_fn="gelu-approximate", qk_norm="rms_norm_across_heads", norm_elementwise_affine=False,
                norm_eps=1e-6, caption_channels=caption_channels, attention_bias=True, attention_out_bias=True)


def ltxv_vae_tensors(vae_config: dict, seed: int = 42, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A random LTX VAE of this original config, in the original names (without the checkpoint's `vae.`)."""
    from diffusers import AutoencoderKLLTXVideo

    lay = vae_layout(vae_config, 128, "the demo VAE config")
    shapes = tiny.module_shapes(AutoencoderKLLTXVideo, lay.config)
    sd = tiny.random_weights(shapes, seed, dtype, bias_std=0.02,
                             std={k: 0.05 for k in shapes if k.endswith("scale_shift_table")})
    g = torch.Generator().manual_seed(seed + 1)
    sd["decoder.timestep_scale_multiplier"] = torch.tensor(1000.0, dtype=dtype)
    mean = (0.1 * torch.randn(128, generator=g)).to(dtype)
    std = (0.8 + 0.4 * torch.rand(128, generator=g)).to(dtype)
    out = {lay.to_original(k): v for k, v in sd.items() if k not in ("latents_mean", "latents_std")}
    out.update(per_channel_statistics(mean, std))
    return out


def make_ltxv_checkpoint(path: Path, cfg: dict, positions: Positions = Positions(), vae_config: dict = TINY_VAE,
                         seed: int = 41, dtype: torch.dtype = torch.float32) -> None:
    """A Lightricks-style checkpoint: random transformer and VAE, configs in the metadata as ComfyUI reads them."""
    from diffusers import LTXVideoTransformer3DModel

    shapes = tiny.module_shapes(LTXVideoTransformer3DModel, cfg)
    sd = tiny.random_weights(shapes, seed, dtype, bias_std=0.02, norm_std=0.1,
                             std={k: 0.05 for k in shapes if k.endswith("scale_shift_table")})
    tensors = {f"model.diffusion_model.{k}": v for k, v in diffusers_to_original(sd, cfg["num_layers"]).items()}
    tensors.update({f"vae.{k}": v for k, v in ltxv_vae_tensors(vae_config, seed + 1, dtype).items()})
    config = {"transformer": transformer_metadata(cfg, positions), "vae": vae_config}
    save_safetensors_atomic(tensors, path, {"config": json.dumps(config)})


def write_ltxv_files(folder: Path, name: str = "ltxv", inner: int = 64, heads: int = 2, layers: int = 2,
                     t5_dim: int = 64, causal: bool = False, dtype: torch.dtype = torch.float32,
                     vae_config: dict = TINY_VAE) -> dict:
    """A random LTX-Video in the files users keep. Returns the `model:` config."""
    folder.mkdir(parents=True, exist_ok=True)
    ckpt, t5, tok = folder / f"{name}.safetensors", folder / f"{name}_t5.safetensors", folder / f"{name}_tokenizer_t5"
    t5_tok = tiny.build_tokenizer(tok, "t5")
    tiny.make_t5_file(t5, len(t5_tok), d_model=t5_dim, layers=1, dtype=dtype)
    make_ltxv_checkpoint(ckpt, ltxv_diffusers_config(inner, heads, layers, t5_dim), Positions(causal=causal),
                         vae_config, dtype=dtype)
    return {"arch": "ltxv", "name_or_path": str(ckpt), "text_encoder_paths": [str(t5)], "tokenizer_paths": [str(tok)]}


def write_ltxv_demo(folder: Path) -> dict:
    ckpt = folder / "ltxv_demo.safetensors"
    if ckpt.exists():
        return {"arch": "ltxv", "name_or_path": str(ckpt), "text_encoder_paths": [str(folder / "ltxv_demo_t5.safetensors")],
                "tokenizer_paths": [str(folder / "ltxv_demo_tokenizer_t5")]}
    return write_ltxv_files(folder, name="ltxv_demo", causal=True, dtype=torch.bfloat16)
