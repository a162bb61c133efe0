"""ChatGLM3-6B, Kolors' text encoder, from the files users keep, run by diffusers' own ChatGLM code.

Files: ComfyUI-Kolors-MZ's `models/LLM/chatglm3-fp16.safetensors` (ChatGLMModel's tensor names, optionally under
`transformer.`), its 8-bit file (`chatglm3-8bit.safetensors`: int8 weights with a per-row `weight_scale`, dequantized
on load), or a diffusers `text_encoder` folder (config.json + safetensors shards). The config comes from the shapes;
what the shapes do not hold follows ChatGLM3-6B's own config, as the MZ node's fixed config does: heads of 128
channels, RMSNorm, rotary positions. The language-model head (`output_layer`) is never loaded: Kolors reads hidden
states only.

The tokenizer is ChatGLM's SentencePiece model (`tokenizer.model`): `model.tokenizer_paths[0]`, a pipeline folder's
`tokenizer/`, or the copy the MZ node ships (`custom_nodes/ComfyUI-Kolors-MZ/configs/tokenizer`) in a ComfyUI install
around the files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ModelFileError
from .files import comfyui_roots, find_weights_file, load_state_dict, safetensors_shapes

PREFIXES = ("transformer.", "text_encoder.", "")
EMBEDDING = "embedding.word_embeddings.weight"
HEAD_CHANNELS = 128  # ChatGLM3's kv_channels
SEQ_LENGTH = 32768  # ChatGLM3's config; positions beyond the 256 prompt tokens are never read
SPIECE = "tokenizer.model"
# where ComfyUI-Kolors-MZ keeps ChatGLM's tokenizer inside a ComfyUI install
COMFY_TOKENIZER_DIRS = ("custom_nodes/ComfyUI-Kolors-MZ/configs/tokenizer",)


def _files(path: Path) -> list[Path]:
    if path.is_dir() and not any(path.glob("*.safetensors")) and any(path.glob("*.bin")):
        raise ModelFileError(f"{path}: ChatGLM3 as pickle shards (.bin), which this trainer never loads (they can run"
                             " code); point model.text_encoder_paths at chatglm3-fp16.safetensors (ComfyUI's models/LLM)")
    return find_weights_file(path) if path.is_dir() else [path]


def chatglm_prefix(path: Path) -> str | None:
    """The prefix under which `path` holds a ChatGLM model, or None if it is not one."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in _files(path):
        shapes.update(safetensors_shapes(f))
    return next((p for p in PREFIXES if f"{p}{EMBEDDING}" in shapes
                 and f"{p}encoder.layers.0.self_attention.query_key_value.weight" in shapes), None)


def _count(keys, pattern: str) -> int:
    n = 0
    while any(k.startswith(pattern.format(n)) for k in keys):
        n += 1
    return n


def config_from_state(sd: dict[str, torch.Tensor], source: str) -> dict:
    """ChatGLMConfig arguments from the (dequantized) tensors' shapes."""
    try:
        vocab, hidden = sd[EMBEDDING].shape
        qkv = sd["encoder.layers.0.self_attention.query_key_value.weight"].shape[0]
        ffn = sd["encoder.layers.0.mlp.dense_h_to_4h.weight"].shape[0] // 2  # gate and value rows
    except KeyError as e:
        raise ModelFileError(f"{source}: not a complete ChatGLM model (missing {e.args[0]})") from None
    if hidden % HEAD_CHANNELS:
        raise ModelFileError(f"{source}: ChatGLM width {hidden} does not split into {HEAD_CHANNELS}-channel heads")
    heads = hidden // HEAD_CHANNELS
    groups, rest = divmod(qkv - hidden, 2 * HEAD_CHANNELS)
    if rest or groups < 1 or heads % groups:
        raise ModelFileError(f"{source}: query_key_value of {qkv} rows fits no ChatGLM head layout for width {hidden}")
    return dict(
        num_layers=_count(sd, "encoder.layers.{}."), padded_vocab_size=vocab, hidden_size=hidden,
        ffn_hidden_size=ffn, kv_channels=HEAD_CHANNELS, num_attention_heads=heads, seq_length=SEQ_LENGTH,
        multi_query_attention=groups != heads, multi_query_group_num=groups,
        add_qkv_bias="encoder.layers.0.self_attention.query_key_value.bias" in sd,
        add_bias_linear="encoder.layers.0.self_attention.dense.bias" in sd,
        post_layer_norm="encoder.final_layernorm.weight" in sd,
        rmsnorm="encoder.final_layernorm.bias" not in sd and "encoder.layers.0.input_layernorm.bias" not in sd,
        original_rope=True, layernorm_epsilon=1e-5,
    )


def dequantize(sd: dict[str, torch.Tensor], dtype: torch.dtype, source: str) -> dict[str, torch.Tensor]:
    """The MZ node's 8-bit file: each quantized Linear keeps int8 rows and their scale (weight = int8 * scale);
    4-bit files pack two weights a byte with a CUDA kernel's layout this trainer does not read."""
    hidden = sd[EMBEDDING].shape[1]
    ffn = sd["encoder.layers.0.mlp.dense_h_to_4h.weight"].shape[0] // 2  # rows are never packed
    out = {k: v for k, v in sd.items() if not k.endswith(".weight_scale")}
    for k, scale in sd.items():
        if not k.endswith(".weight_scale"):
            continue
        w = k[:-len("_scale")]
        q = sd.get(w)
        if q is None or q.dtype != torch.int8:
            raise ModelFileError(f"{source}: {k} without an int8 {w}; not a ChatGLM quantization this trainer reads")
        if q.shape[1] != (ffn if ".dense_4h_to_h." in w else hidden):
            raise ModelFileError(f"{source}: a 4-bit ChatGLM (packed int4 weights); use chatglm3-fp16.safetensors or"
                                 " chatglm3-8bit.safetensors")
        out[w] = (q.float() * scale.float()[:, None]).to(dtype)
    return out


def _read(path: Path, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors in `dtype` (converted one by one as they are read: 6B weights are never held twice)."""
    sd: dict[str, torch.Tensor] = {}
    for f in _files(path):
        sd.update(load_state_dict(f, dtype, prefix))
    for k in [k for k in sd if k.startswith(("output_layer.", "rotary_pos_emb."))]:
        del sd[k]
    if any(k.endswith(".weight_scale") for k in sd):
        sd = dequantize(sd, dtype, str(path))
    return sd


def load_chatglm(path: Path, dtype: torch.dtype):
    """diffusers' ChatGLMModel (what KolorsPipeline runs) with the weights of a ChatGLM file or folder."""
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel, RotaryEmbedding

    prefix = chatglm_prefix(path)
    if prefix is None:
        raise ModelFileError(f"{path}: not a ChatGLM3 text encoder (Kolors reads chatglm3-fp16.safetensors, in"
                             " ComfyUI's models/LLM)")
    sd = _read(path, prefix, dtype)
    cfg = config_from_state(sd, str(path))
    if path.is_dir() and (path / "config.json").exists():  # a pipeline folder's config is the authority
        known = json.loads((path / "config.json").read_text())
        cfg.update({k: known[k] for k in ("kv_channels", "num_attention_heads", "multi_query_group_num",
                                          "multi_query_attention", "layernorm_epsilon", "rmsnorm", "seq_length",
                                          "original_rope", "apply_residual_connection_post_layernorm") if k in known})
    config = ChatGLMConfig(**cfg)
    with torch.device("meta"):
        model = ChatGLMModel(config, empty_init=False)
    model.output_layer = None  # the language-model head: Kolors reads hidden states only
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not k.startswith("rotary_pos_emb.")]
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unknown tensor {unexpected[0]}"
        raise ModelFileError(f"{path}: not a ChatGLM3 model of the shape its tensors suggest ({what})")
    # the rotary table's frequencies are a computed buffer (made on meta above): build it for real
    rotary = config.kv_channels or config.hidden_size // config.num_attention_heads
    model.rotary_pos_emb = RotaryEmbedding(rotary // 2, original_impl=config.original_rope)
    return model.to(dtype).eval().requires_grad_(False)


# --- tokenizer -----------------------------------------------------------------------------------

def find_chatglm_tokenizer(explicit: Path | None, folder: Path | None, near: list[Path]) -> Path:
    """ChatGLM's `tokenizer.model`: the explicit path (the file or its folder), the pipeline folder's
    `tokenizer/`, then the MZ node's copy in a ComfyUI install around the model files (or COMFYUI_PATH)."""
    candidates = [explicit] if explicit is not None else []
    if folder is not None:
        candidates.append(folder / "tokenizer")
    for root in comfyui_roots(*near):
        candidates.extend(root / rel for rel in COMFY_TOKENIZER_DIRS)
    for c in candidates:
        f = c if c.is_file() else c / SPIECE
        if f.is_file():
            return f
    raise ModelFileError(
        "no ChatGLM tokenizer found (looked in: " + ", ".join(str(c) for c in candidates) + "). Set"
        f" model.tokenizer_paths to the folder holding ChatGLM3's {SPIECE} (ComfyUI-Kolors-MZ ships it in"
        " configs/tokenizer; Kolors' diffusers folder in tokenizer/), or keep the files inside that ComfyUI install."
    )


def load_chatglm_tokenizer(spiece: Path):
    """diffusers' ChatGLMTokenizer over a SentencePiece model (left padding, [gMASK] sop prefix, position ids)."""
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer

    try:
        return ChatGLMTokenizer(vocab_file=str(spiece))
    except Exception as e:  # sentencepiece raises its own kinds for a damaged model
        raise ModelFileError(f"{spiece}: cannot load ChatGLM's tokenizer ({e})") from None
