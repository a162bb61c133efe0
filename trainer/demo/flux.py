"""Random Flux-layout files (Flux.1, Flex.1, Flex.2) in the single-file layout ComfyUI loads."""

from __future__ import annotations

from pathlib import Path

import torch

from ..fileio import save_safetensors_atomic
from ..models.flux_layout import diffusers_to_original, rope_axes
from . import tiny


def flux_diffusers_config(hidden: int, head_dim: int, double: int, single: int, context_dim: int, pooled_dim: int,
                          guidance: bool, in_channels: int = 64) -> dict:
    return dict(
        patch_size=1, in_channels=in_channels, num_layers=double, num_single_layers=single,
        attention_head_dim=head_dim, num_attention_heads=hidden // head_dim, joint_attention_dim=context_dim,
        pooled_projection_dim=pooled_dim, guidance_embeds=guidance, axes_dims_rope=rope_axes(head_dim),
    )


def make_flux_file(path: Path, cfg: dict, seed: int = 4, dtype: torch.dtype = torch.bfloat16) -> None:
    """A Flux transformer with random weights in the original single-file layout ComfyUI loads."""
    from diffusers import FluxTransformer2DModel

    sd = tiny.random_weights(tiny.module_shapes(FluxTransformer2DModel, cfg), seed, dtype)
    save_safetensors_atomic(diffusers_to_original(sd, cfg), path)


def write_flux_demo(folder: Path, arch: str = "flux", config_overrides: dict | None = None) -> dict:
    """Random Flux-architecture files sized so ComfyUI detects them as Flux (hidden 3072, 24 heads of 128,
    one double and one single block), with small text encoders and VAE. Returns the `model:` config.
    A family in Flux's layout passes its arch and its transformer config differences (Flex.2: img_in width)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {n: folder / f for n, f in (("flux", f"{arch}_demo.safetensors"), ("clip", "clip_l_demo.safetensors"),
                                         ("t5", "t5_demo.safetensors"), ("vae", "ae_demo.safetensors"))}
    tok_clip, tok_t5 = folder / "tokenizer_clip", folder / "tokenizer_t5"
    if not all(p.exists() for p in paths.values()) or not (tok_clip.exists() and tok_t5.exists()):
        clip_tok = tiny.build_tokenizer(tok_clip, "clip")
        t5_tok = tiny.build_tokenizer(tok_t5, "t5")
        tiny.make_clip_file(paths["clip"], len(clip_tok), hidden=64, layers=1)
        tiny.make_t5_file(paths["t5"], len(t5_tok), d_model=64, layers=1)
        tiny.make_vae_file(paths["vae"], [32, 32, 32, 32], layers=1, latent=16)
        cfg = flux_diffusers_config(hidden=3072, head_dim=128, double=1, single=1, context_dim=64, pooled_dim=64,
                                    guidance=True)
        cfg.update(config_overrides or {})
        make_flux_file(paths["flux"], cfg, dtype=torch.bfloat16)
    return {
        "arch": arch,
        "name_or_path": str(paths["flux"]),
        "text_encoder_paths": [str(paths["clip"]), str(paths["t5"])],
        "vae_path": str(paths["vae"]),
        "tokenizer_paths": [str(tok_clip), str(tok_t5)],
        "t5_max_length": 32,
    }


def write_flex2_demo(folder: Path) -> dict:
    """The Flux demo's files with Flex.2's img_in (196 features in, 64 out); the demo adds control images."""
    return write_flux_demo(folder, arch="flex2", config_overrides={"in_channels": 196, "out_channels": 64})
