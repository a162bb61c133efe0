"""Qwen2.5(-VL)'s language model as a text encoder (OmniGen2 reads Qwen2.5-VL-3B's last hidden state), from the
files users keep: ComfyUI's `qwen_2.5_vl_fp16.safetensors` (or scaled fp8; keys `model.layers.N...`, the vision
tower `visual.*` beside them, never loaded), or a transformers folder (Qwen2.5-VL-3B-Instruct, config.json).

Text-only input gives every position the same index on the three M-RoPE axes, which is plain 1-D rotary embedding:
transformers' Qwen2Model computes it. A file has no config: the sizes come from the shapes, the rest is
Qwen2.5-VL-3B's (heads of 128, rope theta 1e6, RMS eps 1e-6, q/k/v biases), as ComfyUI fixes it
(comfy/text_encoders/llama.py Qwen25_3BConfig). Tokenizer: model.tokenizer_paths[0], the folder's, or ComfyUI's
`comfy/text_encoders/qwen25_tokenizer`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ModelFileError
from .files import dequantize_scaled_fp8, find_weights_file, load_state_dict, safetensors_shapes
from .text_encoders import find_tokenizer, load_tokenizer, materialize

QWEN_PREFIXES = ("model.language_model.", "model.", "")
QWEN_HEAD_DIM = 128
QWEN_MARKER = "layers.0.self_attn.q_proj.bias"  # Qwen2's q/k/v biases: Llama and Gemma have none
QWEN_PAD = "<|endoftext|>"  # 151643, ComfyUI's pad for Qwen2.5


def _files(path: Path) -> list[Path]:
    return find_weights_file(path) if path.is_dir() else [path]


def qwen_prefix(shapes: dict[str, tuple[int, ...]]) -> str | None:
    return next((p for p in QWEN_PREFIXES if f"{p}{QWEN_MARKER}" in shapes and f"{p}embed_tokens.weight" in shapes),
                None)


def is_qwen(path: Path) -> bool:
    try:
        shapes: dict = {}
        for f in _files(path):
            shapes.update(safetensors_shapes(f))
    except ModelFileError:
        return False
    return qwen_prefix(shapes) is not None


def qwen25_config(shapes: dict[str, tuple[int, ...]], source: Path, rope_theta: float = 1e6):
    from transformers import Qwen2Config

    try:
        vocab, hidden = shapes["embed_tokens.weight"]
        q, k = shapes["layers.0.self_attn.q_proj.weight"][0], shapes["layers.0.self_attn.k_proj.weight"][0]
        layers = 1 + max(int(key.split(".")[1]) for key in shapes if key.startswith("layers."))
        ff = shapes["layers.0.mlp.gate_proj.weight"][0]
    except (KeyError, ValueError) as e:
        raise ModelFileError(f"{source}: not a complete Qwen2.5 language model (missing {e.args[0]})") from None
    if q % QWEN_HEAD_DIM or k % QWEN_HEAD_DIM:
        raise ModelFileError(f"{source}: Qwen attention widths {q} / {k} are not multiples of its 128-wide heads")
    return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=ff, num_hidden_layers=layers,
                       num_attention_heads=q // QWEN_HEAD_DIM, num_key_value_heads=k // QWEN_HEAD_DIM,
                       head_dim=QWEN_HEAD_DIM, rms_norm_eps=1e-6, max_position_embeddings=128000,
                       rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, tie_word_embeddings=False)


def load_qwen25(path: Path, dtype: torch.dtype):
    """Qwen2Model (decoder stack and final norm; no LM head, no vision tower) from a file or a folder."""
    from transformers import Qwen2Model

    theta = 1e6
    if path.is_dir() and (path / "config.json").exists():
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        text = cfg.get("text_config") or cfg
        theta = float(text.get("rope_theta") or (text.get("rope_parameters") or {}).get("rope_theta") or theta)
    sd: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for f in _files(path):
        shapes.update(safetensors_shapes(f))
    prefix = qwen_prefix(shapes)
    if prefix is None:
        raise ModelFileError(f"{path}: not a Qwen2.5 language model (no {QWEN_MARKER})")
    for f in _files(path):
        sd.update(load_state_dict(f, None, prefix))
    sd = {k: v for k, v in sd.items() if not k.startswith(("lm_head.", "visual.", "vision"))}
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in dequantize_scaled_fp8(sd, str(path)).items()}
    cfg = qwen25_config({k: tuple(v.shape) for k, v in sd.items()}, path, theta)
    model = materialize(Qwen2Model, cfg, sd, dtype, "", path, "Qwen2.5 text encoder")
    model.rotary_emb = type(model.rotary_emb)(cfg)  # computed frequencies, not in the file
    return model


def qwen25_tokenizer(explicit: Path | None, candidates: list[Path], near: list[Path]):
    """The Qwen2.5 tokenizer, padded on the right with <|endoftext|> (as ComfyUI pads Qwen2.5)."""
    tok = load_tokenizer(find_tokenizer("qwen25", explicit, candidates, near))
    tok.padding_side = "right"
    if QWEN_PAD in tok.get_vocab():
        tok.pad_token = QWEN_PAD
    return tok
