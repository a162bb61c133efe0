"""Random Chroma files in the single-file layout ComfyUI loads."""

from __future__ import annotations

from pathlib import Path

import torch

from ..fileio import save_safetensors_atomic
from ..models.chroma_layout import diffusers_to_original
from ..models.flux_layout import rope_axes
from . import tiny


def chroma_diffusers_config(hidden: int, head_dim: int, double: int, single: int, context_dim: int,
                            approximator_hidden: int, approximator_layers: int, in_channels: int = 64,
                            approximator_in: int = 64) -> dict:
    return dict(
        patch_size=1, in_channels=in_channels, num_layers=double, num_single_layers=single,
        attention_head_dim=head_dim, num_attention_heads=hidden // head_dim, joint_attention_dim=context_dim,
        axes_dims_rope=rope_axes(head_dim), approximator_num_channels=approximator_in,
        approximator_hidden_dim=approximator_hidden, approximator_layers=approximator_layers,
    )


def chroma_original_state_dict(cfg: dict, seed: int = 4, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights for a Chroma of `cfg`, in the original layout."""
    from diffusers import ChromaTransformer2DModel

    return diffusers_to_original(tiny.random_weights(tiny.module_shapes(ChromaTransformer2DModel, cfg), seed, dtype), cfg)


def make_chroma_file(path: Path, cfg: dict, seed: int = 4, dtype: torch.dtype = torch.bfloat16) -> None:
    save_safetensors_atomic(chroma_original_state_dict(cfg, seed, dtype), path)


def write_chroma_demo(folder: Path) -> dict:
    """Random Chroma files sized so ComfyUI detects and runs them as Chroma: hidden 3072 in 24 heads of 128
    and a 5-layer approximator of width 5120 (ComfyUI fixes these), one double and one single block; small
    T5 and VAE. Returns the `model:` config."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {n: folder / f for n, f in (("chroma", "chroma_demo.safetensors"), ("t5", "t5_demo.safetensors"),
                                         ("vae", "ae_demo.safetensors"))}
    tok_t5 = folder / "tokenizer_t5"
    if not all(p.exists() for p in paths.values()) or not tok_t5.exists():
        t5_tok = tiny.build_tokenizer(tok_t5, "t5")
        tiny.make_t5_file(paths["t5"], len(t5_tok), d_model=64, layers=1)
        tiny.make_vae_file(paths["vae"], [32, 32, 32, 32], layers=1, latent=16)
        cfg = chroma_diffusers_config(hidden=3072, head_dim=128, double=1, single=1, context_dim=64,
                                      approximator_hidden=5120, approximator_layers=5)
        make_chroma_file(paths["chroma"], cfg, dtype=torch.bfloat16)
    return {
        "arch": "chroma",
        "name_or_path": str(paths["chroma"]),
        "text_encoder_paths": [str(paths["t5"])],
        "vae_path": str(paths["vae"]),
        "tokenizer_paths": [str(tok_t5)],
        "t5_max_length": 32,
    }
