"""HiDream-I1's four text encoders from the files users keep: CLIP-L and CLIP-G (pooled, through their projections),
T5-XXL, and Llama-3.1-8B-Instruct, whose every layer conditions the transformer.

The Llama reader lives here (not in text_encoders.py) because HiDream is its only reader today: ComfyUI's
`llama_3.1_8b_instruct_fp8_scaled` (per-tensor scaled fp8, dequantized on load) or bf16 file, keys
`model.layers.N...`, or a transformers folder (config.json). A file carries no config: the shapes give the sizes,
and the rest is Llama-3.1-8B-Instruct's own config (rope theta 500000 with the llama3 frequency scaling, RMS eps
1e-5, heads of 128). Its tokenizer: model.tokenizer_paths[3], the folder's `tokenizer_4`, the Llama folder, or
ComfyUI's `comfy/text_encoders/llama_tokenizer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelFileError
from .files import comfyui_roots, find_weights_file, safetensors_shapes
from .text_encoders import EncoderFile, identify_text_encoder, load_llama_encoder, load_tokenizer

LLAMA_PREFIXES = ("model.", "")
LLAMA_HEAD_DIM = 128
# meta-llama/Llama-3.1-8B-Instruct's config.json (what HiDream-I1 was trained with)
LLAMA31 = dict(rms_norm_eps=1e-5, max_position_embeddings=131072, attention_bias=False, mlp_bias=False,
               rope_theta=500000.0, tie_word_embeddings=False,
               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192})
# HiDream pads Llama prompts with <|eot_id|> (128009): Llama-3.1-Instruct's eos, the pad token diffusers' pipeline
# sets, and ComfyUI's (comfy/text_encoders/hidream.py)
LLAMA_PAD = "<|eot_id|>"
COMFY_LLAMA_TOKENIZER = "comfy/text_encoders/llama_tokenizer"


@dataclass
class HiDreamEncoderFiles:
    clip_l: EncoderFile | None = None
    clip_g: EncoderFile | None = None
    t5: EncoderFile | None = None
    llama: Path | None = None

    def missing(self) -> list[str]:
        named = {"clip_l": "CLIP-L (clip_l_hidream.safetensors)", "clip_g": "CLIP-G (clip_g_hidream.safetensors)",
                 "t5": "T5-XXL (t5xxl_fp8_e4m3fn_scaled.safetensors)",
                 "llama": "Llama-3.1-8B-Instruct (llama_3.1_8b_instruct_fp8_scaled.safetensors)"}
        return [named[k] for k in named if getattr(self, k) is None]


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for f in (find_weights_file(path) if path.is_dir() else [path]):
        shapes.update(safetensors_shapes(f))
    return shapes


def llama_prefix(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """The key prefix of a Llama decoder stack in `shapes`, or None if it holds none."""
    return next((p for p in LLAMA_PREFIXES if f"{p}layers.0.self_attn.q_proj.weight" in shapes
                 and f"{p}embed_tokens.weight" in shapes), None)


def sort_encoders(paths: list[Path]) -> HiDreamEncoderFiles:
    """The configured files told apart by their keys: a Llama stack, T5, and two CLIPs, of which the wider is
    CLIP-G (1280 against CLIP-L's 768); the first of each kind wins."""
    found = HiDreamEncoderFiles()
    clips: list[tuple[int, int, EncoderFile]] = []
    for i, p in enumerate(paths):
        shapes = _shapes(p)
        if llama_prefix(shapes) is not None:
            found.llama = found.llama or p
            continue
        ef = identify_text_encoder(p)
        if ef.kind == "clip":
            width = next(v[1] for k, v in shapes.items() if k.endswith("embeddings.token_embedding.weight"))
            clips.append((width, i, ef))
        elif ef.kind == "t5" and found.t5 is None:
            found.t5 = ef
        elif ef.kind == "umt5":
            raise ModelFileError(f"{p}: a UMT5 encoder (Wan's); HiDream reads T5-XXL (t5xxl_*.safetensors)")
    if len(clips) > 2:
        raise ModelFileError("model.text_encoder_paths: more than two CLIP text encoders; HiDream reads CLIP-L and"
                             " CLIP-G")
    if len(clips) == 2:
        (_, _, narrow), (_, _, wide) = sorted(clips, key=lambda c: (c[0], c[1]))
        found.clip_l, found.clip_g = narrow, wide
    elif clips:
        raise ModelFileError(f"model.text_encoder_paths: one CLIP encoder ({clips[0][2].path}); HiDream reads both"
                             " CLIP-L and CLIP-G")
    return found


def llama_config(shapes: dict[str, tuple[int, ...]], source: str):
    """LlamaConfig of a Llama stack (prefix removed) from its shapes, with Llama-3.1's rope and norm settings."""
    from transformers import LlamaConfig

    try:
        vocab, hidden = shapes["embed_tokens.weight"]
        q_out = shapes["layers.0.self_attn.q_proj.weight"][0]
        kv_out = shapes["layers.0.self_attn.k_proj.weight"][0]
        inter = shapes["layers.0.mlp.gate_proj.weight"][0]
    except KeyError as e:
        raise ModelFileError(f"{source}: not a complete Llama text encoder (missing {e.args[0]})") from None
    head = LLAMA_HEAD_DIM if q_out % LLAMA_HEAD_DIM == 0 and kv_out % LLAMA_HEAD_DIM == 0 else q_out  # small: one head
    if kv_out % head:
        raise ModelFileError(f"{source}: Llama key width {kv_out} is not a multiple of its heads' {head}")
    layers = 0
    while f"layers.{layers}.self_attn.q_proj.weight" in shapes:
        layers += 1
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=q_out // head, num_key_value_heads=kv_out // head, head_dim=head, **LLAMA31)


def llama_layers_of(path: Path) -> int:
    """How many hidden layers the Llama encoder at `path` has (from its header or config, nothing loaded)."""
    if path.is_dir() and (path / "config.json").exists():
        import json

        return int(json.loads((path / "config.json").read_text())["num_hidden_layers"])
    shapes = _shapes(path)
    prefix = llama_prefix(shapes) or ""
    return sum(1 for k in shapes if k.startswith(f"{prefix}layers.") and k.endswith(".self_attn.q_proj.weight"))


def load_llama(path: Path, dtype: torch.dtype):
    """LlamaModel (the decoder stack, no LM head: only hidden states are read) from a file or a folder, with Llama
    3.1's settings (text_encoders' Llama loader reads it)."""
    shapes = {} if path.is_dir() and (path / "config.json").exists() else _shapes(path)
    prefix = llama_prefix(shapes) if shapes else ""
    if prefix is None:
        raise ModelFileError(f"{path}: not a Llama text encoder (no layers.0.self_attn.q_proj.weight)")
    return load_llama_encoder(EncoderFile("llama", path, prefix), dtype, llama_config)


def llama_tokenizer(explicit: Path | None, candidates: list[Path], near: list[Path]):
    """The Llama tokenizer, padded with <|eot_id|> as HiDream pads (the eos where a vocabulary lacks it)."""
    tried = []
    for c in ([explicit] if explicit else []) + candidates:
        tried.append(str(c))
        if c.is_dir() and any((c / n).exists() for n in ("tokenizer.json", "tokenizer_config.json")):
            return padded(load_tokenizer(c))
    for root in comfyui_roots(*near):
        c = root / COMFY_LLAMA_TOKENIZER
        tried.append(str(c))
        if (c / "tokenizer.json").exists():
            return padded(load_tokenizer(c))
    raise ModelFileError(f"no Llama tokenizer found (looked in: {', '.join(tried) or 'nothing'}). Set"
                         " model.tokenizer_paths[3] to the Llama-3.1 tokenizer folder, or keep the files inside a"
                         " ComfyUI install (comfy/text_encoders/llama_tokenizer)")


def padded(tok):
    tok.pad_token = LLAMA_PAD if LLAMA_PAD in tok.get_vocab() else tok.eos_token
    tok.padding_side = "right"
    return tok
