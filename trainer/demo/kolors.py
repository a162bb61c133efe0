"""Random Kolors files as ComfyUI-Kolors-MZ users keep them: the UNet in diffusers' layout (models/unet), a
ChatGLM3 file (models/LLM, ChatGLMModel's tensor names), the SDXL VAE, and ChatGLM's SentencePiece tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from ..fileio import save_safetensors_atomic
from . import tiny
from .sdxl import random_unet_ldm, sdxl_unet_config

HEAD_CHANNELS = 128  # ChatGLM3's head width (trainer.models.chatglm reads it so)


def kolors_unet_config(widths=(32, 64, 128), layers: int = 2, depths=(0, 1, 2), context: int = 64,
                       text_width: int = 256) -> dict:
    """SDXL's UNet structure with Kolors' text projection: ChatGLM's `text_width` -> `context` in encoder_hid_proj,
    the pooled input ChatGLM's width (+ SDXL's 6 x 256 size ids)."""
    cfg = sdxl_unet_config(widths, layers, depths, context, pooled=text_width)
    cfg.update(encoder_hid_dim=text_width, encoder_hid_dim_type="text_proj")
    return cfg


def chatglm_config(vocab: int, hidden: int = 256, layers: int = 2, ffn: int = 192, groups: int = 1) -> dict:
    """ChatGLM3-6B's structure (multi-query attention in `groups` groups, qkv bias, RMSNorm, SwiGLU) at any width."""
    return dict(num_layers=layers, padded_vocab_size=vocab, hidden_size=hidden, ffn_hidden_size=ffn,
                kv_channels=HEAD_CHANNELS, num_attention_heads=hidden // HEAD_CHANNELS, seq_length=32768,
                multi_query_attention=True, multi_query_group_num=groups, add_qkv_bias=True, add_bias_linear=False,
                rmsnorm=True, post_layer_norm=True, original_rope=True)


def chatglm_state(cfg: dict, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random ChatGLMModel weights (norm scales near 1, small nonzero qkv biases), the rotary frequencies as the
    model computes them."""
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel, RotaryEmbedding

    with torch.device("meta"):
        model = ChatGLMModel(ChatGLMConfig(**cfg), empty_init=False)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("rotary_pos_emb.")}
    sd = tiny.random_weights(shapes, seed, dtype, bias_std=0.1, norm_std=0.1)
    sd["rotary_pos_emb.inv_freq"] = RotaryEmbedding(cfg["kv_channels"] // 2).inv_freq.to(dtype)
    return sd


def write_chatglm_tokenizer(folder: Path) -> int:
    """A word-level SentencePiece model as ChatGLM's `tokenizer.model`; returns the tokenizer's vocabulary size (the
    SentencePiece pieces and ChatGLM's special tokens after them)."""
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(tiny.build_spiece_model())
    return ChatGLMTokenizer(vocab_file=str(folder / "tokenizer.model")).vocab_size


def write_kolors_files(folder: Path, widths=(32, 64, 128), layers: int = 2, depths=(0, 1, 2), context: int = 64,
                       text_width: int = 256, text_layers: int = 2, ffn: int = 192, groups: int = 1,
                       vae_widths=(32, 32), layout: str = "diffusers", seed: int = 21,
                       dtype: torch.dtype = torch.float32, name: str = "kolors") -> dict:
    """A random Kolors-structured model in the files users keep: the UNet (diffusers' layout, or `layout="ldm"`
    ComfyUI's), ChatGLM3, the SDXL-style VAE and the tokenizer folder. Returns the `model:` config."""
    from diffusers import UNet2DConditionModel

    folder.mkdir(parents=True, exist_ok=True)
    tok_dir = folder / "chatglm_tokenizer"
    vocab = write_chatglm_tokenizer(tok_dir)
    cfg = kolors_unet_config(widths, layers, depths, context, text_width)
    if layout == "ldm":
        unet = random_unet_ldm(cfg, seed, dtype)
    else:
        unet = tiny.random_weights(tiny.module_shapes(UNet2DConditionModel, cfg), seed, dtype, bias_std=0.1,
                                   norm_std=0.1)
    paths = {n: folder / f"{name}_{n}.safetensors" for n in ("unet", "chatglm3", "vae")}
    save_safetensors_atomic(unet, paths["unet"])
    save_safetensors_atomic(chatglm_state(chatglm_config(vocab, text_width, text_layers, ffn, groups), seed + 1, dtype),
                            paths["chatglm3"])
    save_safetensors_atomic(tiny.random_weights(tiny.ldm_vae_shapes(list(vae_widths), 1, 4), seed + 2, dtype),
                            paths["vae"])
    return {"arch": "kolors", "name_or_path": str(paths["unet"]), "text_encoder_paths": [str(paths["chatglm3"])],
            "vae_path": str(paths["vae"]), "tokenizer_paths": [str(tok_dir)]}


def write_kolors_demo(folder: Path) -> dict:
    """A small random Kolors (ComfyUI-Kolors-MZ detects Kolors only at its full 2.6B size, so this one is sized for a
    CPU run, not for that loader). Returns the `model:` config."""
    path = folder / "kolors_demo_unet.safetensors"
    if path.exists() and (folder / "chatglm_tokenizer").exists():
        return {"arch": "kolors", "name_or_path": str(path),
                "text_encoder_paths": [str(folder / "kolors_demo_chatglm3.safetensors")],
                "vae_path": str(folder / "kolors_demo_vae.safetensors"),
                "tokenizer_paths": [str(folder / "chatglm_tokenizer")]}
    return write_kolors_files(folder, widths=(32, 64, 128), depths=(0, 1, 2), context=128, text_width=256,
                              vae_widths=(32, 32, 32, 32), name="kolors_demo", dtype=torch.bfloat16)
