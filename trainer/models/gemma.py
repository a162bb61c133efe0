"""Gemma-2 text encoders (Sana's Gemma-2-2B-it) from the files users keep, and their tokenizers.

A transformers folder (config.json, safetensors, the tokenizer beside them: Efficient-Large-Model/gemma-2-2b-it,
a diffusers pipeline's `text_encoder`), or one safetensors file (`model.layers.N...`, as ComfyUI keeps Gemma files;
its tokenizer then comes from a folder: model.tokenizer_paths[0]). A file has no config: the sizes come from
its shapes, the rest is Gemma 2's own (heads of 256, soft-capping, sliding window 4096, RMS eps 1e-6). Only the last
hidden state (after the final norm) is read, so the LM head is never loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ModelFileError
from .files import find_weights_file, safetensors_shapes
from .text_encoders import load_tokenizer, materialize

GEMMA_PREFIXES = ("model.language_model.", "model.", "")
GEMMA2_HEAD_DIM = 256  # Gemma 2 2B and 9B; the shapes hold heads x 256, not the head count
GEMMA_MARKER = "layers.0.pre_feedforward_layernorm.weight"  # Gemma 2's extra norm: Llama has none


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for f in (find_weights_file(path) if path.is_dir() else [path]):
        shapes.update(safetensors_shapes(f))
    return shapes


def gemma_prefix(shapes: dict[str, tuple[int, ...]]) -> str | None:
    return next((p for p in GEMMA_PREFIXES if f"{p}{GEMMA_MARKER}" in shapes and f"{p}embed_tokens.weight" in shapes),
                None)


def is_gemma(path: Path) -> bool:
    if path.is_dir() and (path / "config.json").exists():
        import json

        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        return str(cfg.get("model_type", "")).startswith("gemma")
    try:
        return gemma_prefix(_shapes(path)) is not None
    except ModelFileError:
        return False


def gemma2_config(shapes: dict[str, tuple[int, ...]], source: Path):
    from transformers import Gemma2Config

    try:
        vocab, hidden = shapes["embed_tokens.weight"]
        q, k = shapes["layers.0.self_attn.q_proj.weight"][0], shapes["layers.0.self_attn.k_proj.weight"][0]
        layers = 1 + max(int(key.split(".")[1]) for key in shapes if key.startswith("layers."))
        ff = shapes["layers.0.mlp.gate_proj.weight"][0]
    except (KeyError, ValueError) as e:
        raise ModelFileError(f"{source}: not a complete Gemma 2 text encoder (missing {e.args[0]})") from None
    if q % GEMMA2_HEAD_DIM or k % GEMMA2_HEAD_DIM:
        raise ModelFileError(f"{source}: Gemma attention widths {q} / {k} are not multiples of Gemma 2's 256-wide"
                             " heads")
    return Gemma2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=ff, num_hidden_layers=layers,
                        num_attention_heads=q // GEMMA2_HEAD_DIM, num_key_value_heads=k // GEMMA2_HEAD_DIM,
                        head_dim=GEMMA2_HEAD_DIM, query_pre_attn_scalar=GEMMA2_HEAD_DIM)


def load_gemma(path: Path, dtype: torch.dtype):
    """Gemma2Model (decoder stack and final norm) from a folder or a single file; eager attention, which Gemma 2's
    attention soft-capping needs."""
    from transformers import Gemma2Model

    if path.is_dir() and (path / "config.json").exists():
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
        cfg = getattr(cfg, "text_config", cfg)
        if cfg.model_type != "gemma2":
            raise ModelFileError(f"{path}: a {cfg.model_type} model, not Gemma 2 (Sana reads Gemma-2-2B-it)")
        files = find_weights_file(path)
    else:
        files, cfg = [path], None
    shapes = _shapes(path)
    prefix = gemma_prefix(shapes)
    if prefix is None:
        raise ModelFileError(f"{path}: not a Gemma 2 text encoder (no {GEMMA_MARKER})")
    from .files import load_state_dict

    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update({k: v for k, v in load_state_dict(f, dtype, prefix).items()
                   if not k.startswith(("lm_head.", "vision", "multi_modal")) and k != "spiece_model"})
    if cfg is None:
        cfg = gemma2_config({k: tuple(v.shape) for k, v in sd.items()}, path)
    cfg._attn_implementation = "eager"
    model = materialize(Gemma2Model, cfg, sd, dtype, "", path, "Gemma 2 text encoder")
    # computed buffers, not in the file: built for real, not left as the empty memory of a meta-device build
    model.rotary_emb = type(model.rotary_emb)(cfg)
    model.embed_tokens.embed_scale.fill_(cfg.hidden_size**0.5)
    return model


def gemma_tokenizer(explicit: Path | None, candidates: list[Path], encoder: Path):
    """The Gemma tokenizer (its tokenizer.json), padding on the right as Sana pads: model.tokenizer_paths[0], a
    pipeline folder's `tokenizer`, or the encoder's own folder."""
    tried = []
    for c in [c for c in ([explicit] if explicit else []) + candidates if c is not None]:
        tried.append(str(c))
        if c.is_dir() and (c / "tokenizer.json").exists():
            tok = load_tokenizer(c)
            tok.padding_side = "right"
            return tok
    raise ModelFileError(f"no Gemma tokenizer found (looked in: {', '.join(tried) or 'nothing'}). Set"
                         " model.tokenizer_paths[0] to the gemma-2-2b-it folder (its tokenizer.json)")
