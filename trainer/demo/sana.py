"""Random Sana files in the layouts Sana users keep: the transformer in the original layout (what ComfyUI_ExtraModels'
Sana Checkpoint Loader reads from models/checkpoints), a Gemma-2 text encoder as one safetensors file
(`model.layers.N...`) with a word-level Gemma tokenizer folder (<bos> first, padded with <pad>), and a small DC-AE
as a diffusers folder (config.json + weights).

The small transformer's width is no Sana preset, so its file says its cross-attention heads in the metadata
(sana.num_cross_attention_heads), which the trainer reads where the width does not tell them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..fileio import save_safetensors_atomic
from ..models.sana import CROSS_HEADS_METADATA, diffusers_to_original
from . import tiny


def sana_diffusers_config(hidden: int = 64, layers: int = 2, cross_heads: int = 2, caption: int = 64,
                          qk_norm: bool = True, in_channels: int = 32) -> dict:
    return dict(in_channels=in_channels, out_channels=in_channels, num_attention_heads=hidden // 32,
                attention_head_dim=32, num_layers=layers, num_cross_attention_heads=cross_heads,
                cross_attention_head_dim=hidden // cross_heads, cross_attention_dim=hidden, caption_channels=caption,
                mlp_ratio=2.5, patch_size=1, sample_size=32, qk_norm="rms_norm_across_heads" if qk_norm else None)


def sana_original_state_dict(cfg: dict, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random weights for `cfg` in the original layout (norm scales near 1, small nonzero biases, so a misplaced
    bias or scale shows), with the original's caption-dropout embedding and position table, which the diffusers
    model has no place for."""
    from diffusers import SanaTransformer2DModel

    shapes = tiny.module_shapes(SanaTransformer2DModel, cfg)
    # the tables start at randn / sqrt(width) in the original; the gates they hold must not be zero here
    sd = tiny.random_weights(shapes, seed, dtype, bias_std=0.05, norm_std=0.1,
                             std={k: 0.3 for k in shapes if k.endswith("scale_shift_table")})
    out = diffusers_to_original(sd, cfg["num_layers"], cfg["qk_norm"] is not None)
    out["y_embedder.y_embedding"] = 0.1 * torch.randn(300, cfg["caption_channels"],
                                                      generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    # the position table every original file holds (read by the 2K / 4K models only)
    out["pos_embed"] = torch.zeros(1, cfg["sample_size"] ** 2, cfg["cross_attention_dim"], dtype=dtype)
    return out


def write_sana_transformer(path: Path, cfg: dict, seed: int = 61, dtype: torch.dtype = torch.float32) -> None:
    save_safetensors_atomic(sana_original_state_dict(cfg, seed, dtype), path,
                            metadata={CROSS_HEADS_METADATA: str(cfg["num_cross_attention_heads"])})


def write_gemma_file(path: Path, vocab: int, hidden: int, layers: int = 1, seed: int = 62,
                     dtype: torch.dtype = torch.float32) -> None:
    """A Gemma-2 decoder with random weights, one head of 256 (Gemma 2's width), under `model.` like ComfyUI's."""
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    cfg = Gemma2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=1, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256)
    model = Gemma2Model(cfg)
    save_safetensors_atomic({f"model.{k}": v.to(dtype) for k, v in model.state_dict().items()}, path)


def tiny_dc_ae_config(latent: int = 32) -> dict:
    """A 3-level DC-AE (4x), the block types Sana's has (ResBlocks, then an EfficientViT block)."""
    return dict(in_channels=3, latent_channels=latent, attention_head_dim=8,
                encoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock"],
                decoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock"],
                encoder_block_out_channels=[16, 32, 32], decoder_block_out_channels=[16, 32, 32],
                encoder_layers_per_block=[1, 1, 1], decoder_layers_per_block=[1, 1, 1],
                encoder_qkv_multiscales=[[], [], [5]], decoder_qkv_multiscales=[[], [], [5]],
                upsample_block_type="interpolate", downsample_block_type="Conv", decoder_norm_types="rms_norm",
                decoder_act_fns="silu", scaling_factor=0.41407)


def write_dc_ae(folder: Path, latent: int = 32, seed: int = 63) -> None:
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    AutoencoderDC(**tiny_dc_ae_config(latent)).save_pretrained(str(folder))


def write_sana_files(folder: Path, cfg: dict, gemma_layers: int = 1, seed: int = 61) -> dict:
    """The four parts in `folder`; returns the `model:` config."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = tiny.build_tokenizer(folder / "gemma_tokenizer", "gemma")
    paths = {"transformer": folder / "sana_demo.safetensors", "gemma": folder / "gemma_2_2b_it_demo.safetensors",
             "vae": folder / "dc_ae_demo"}
    write_sana_transformer(paths["transformer"], cfg, seed)
    write_gemma_file(paths["gemma"], len(tok), cfg["caption_channels"], gemma_layers, seed + 1)
    write_dc_ae(paths["vae"], cfg["in_channels"], seed + 2)
    return {"arch": "sana", "name_or_path": str(paths["transformer"]), "text_encoder_paths": [str(paths["gemma"])],
            "tokenizer_paths": [str(folder / "gemma_tokenizer")], "vae_path": str(paths["vae"])}


def write_sana_demo(folder: Path) -> dict:
    """A random Sana 1.5-style model (2 blocks of width 64, q/k norms) with its Gemma, tokenizer and DC-AE."""
    transformer = folder / "sana_demo.safetensors"
    if transformer.exists() and (folder / "gemma_tokenizer").exists() and (folder / "dc_ae_demo").exists():
        return {"arch": "sana", "name_or_path": str(transformer),
                "text_encoder_paths": [str(folder / "gemma_2_2b_it_demo.safetensors")],
                "tokenizer_paths": [str(folder / "gemma_tokenizer")], "vae_path": str(folder / "dc_ae_demo")}
    return write_sana_files(folder, sana_diffusers_config())
