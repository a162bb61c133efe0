"""Text encoders from local files: ComfyUI's `text_encoders/` single files or diffusers folders.

The architecture config is derived from the checkpoint's shapes, so pruned or small encoders load
without a config file. Tokenizers come from a model folder, a configured path, or the ComfyUI
install around the pack or the model files; a missing tokenizer is a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

import logging

from ..errors import ModelFileError
from .files import comfyui_roots, dequantize_scaled_fp8, find_weights_file, load_state_dict, safetensors_shapes

log = logging.getLogger("trainer")

CLIP_PREFIXES = ("cond_stage_model.transformer.", "transformer.", "te.", "")
T5_PREFIXES = ("text_encoders.t5xxl.transformer.", "t5xxl.transformer.", "transformer.", "")
# Llama text models: ComfyUI's llava_llama3 files (a causal LM's `model.`), a whole LLaVA's language model, bare
LLAMA_PREFIXES = ("model.language_model.", "language_model.model.", "model.", "")
LLAMA_HEAD_DIM = 128  # every Llama 3 size (ComfyUI fixes it too); it cannot be read from the shapes


@dataclass
class EncoderFile:
    kind: str  # "clip", "t5", "umt5" or "llama"
    path: Path
    prefix: str


def _weights_files(path: Path) -> list[Path]:
    return find_weights_file(path) if path.is_dir() else [path]


def _all_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for f in _weights_files(path):
        shapes.update(safetensors_shapes(f))
    return shapes


def identify_text_encoder(path: Path) -> EncoderFile:
    """Tell a CLIP text model from a T5 encoder by its keys."""
    shapes = _all_shapes(path)
    for p in CLIP_PREFIXES:
        if f"{p}text_model.embeddings.token_embedding.weight" in shapes:
            return EncoderFile("clip", path, p)
    if "embeddings.token_embedding.weight" in shapes and "final_layer_norm.weight" in shapes:
        return EncoderFile("clip", path, "")  # a tower saved without the `text_model.` level
    for p in T5_PREFIXES:
        if f"{p}encoder.block.0.layer.0.SelfAttention.q.weight" in shapes:
            # UMT5 (Wan's encoder) has a relative attention bias in every layer, T5 in the first only
            umt5 = (f"{p}encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in shapes
                    or "spiece_model" in shapes)  # ComfyUI's umt5 files carry their tokenizer
            return EncoderFile("umt5" if umt5 else "t5", path, p)
    for p in LLAMA_PREFIXES:
        if f"{p}layers.0.self_attn.q_proj.weight" in shapes and f"{p}embed_tokens.weight" in shapes:
            return EncoderFile("llama", path, p)
    sample = ", ".join(sorted(shapes)[:3])
    raise ModelFileError(f"{path}: not a CLIP, T5 or Llama text encoder (first keys: {sample})")


def _read(ef: EncoderFile, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The encoder's tensors (ComfyUI's scaled-fp8 files dequantized; a tokenizer stored inside left out)."""
    sd: dict[str, torch.Tensor] = {}
    for f in _weights_files(ef.path):
        sd.update(load_state_dict(f, dtype, ef.prefix))
    sd.pop("spiece_model", None)
    return dequantize_scaled_fp8(sd, str(ef.path))


def _count(sd_keys, pattern: str) -> int:
    n = 0
    while any(k.startswith(pattern.format(n)) for k in sd_keys):
        n += 1
    return n


def _pretrained_folder(ef: EncoderFile) -> bool:
    return ef.path.is_dir() and (ef.path / "config.json").exists()


def load_clip_text_model(ef: EncoderFile, dtype: torch.dtype, eos_token_id: int | None):
    from transformers import CLIPTextConfig, CLIPTextModel

    if _pretrained_folder(ef):
        model = CLIPTextModel.from_pretrained(str(ef.path), torch_dtype=dtype, local_files_only=True)
        return model.eval().requires_grad_(False)

    sd = _read(ef, dtype)
    if "text_model.embeddings.token_embedding.weight" not in sd:
        sd = {f"text_model.{k}": v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if k.startswith("text_model.")}
    emb = sd["text_model.embeddings.token_embedding.weight"]
    hidden = emb.shape[1]
    cfg = CLIPTextConfig(
        vocab_size=emb.shape[0],
        hidden_size=hidden,
        intermediate_size=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count(sd, "text_model.encoder.layers.{}."),
        # CLIP text towers use 64-wide heads (L: 768/12, G: 1280/20)
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=sd["text_model.embeddings.position_embedding.weight"].shape[0],
        # OpenAI CLIP-L uses quick_gelu; OpenCLIP bigG uses gelu
        hidden_act="gelu" if hidden == 1280 else "quick_gelu",
        projection_dim=hidden,
        eos_token_id=eos_token_id if eos_token_id is not None else 2,
        bos_token_id=0,
        pad_token_id=eos_token_id if eos_token_id is not None else 1,
    )
    return materialize(CLIPTextModel, cfg, sd, dtype, "text_model.", ef.path, "CLIP text encoder")


def load_clip_projected(ef: EncoderFile, dtype: torch.dtype, eos_token_id: int | None, role: str,
                        identity_projection: bool = True):
    """CLIPTextModelWithProjection (SDXL pools CLIP-G, SD3 both CLIPs through their projections) from a
    transformers-layout or OpenCLIP-layout file, or a diffusers text_encoder folder. CLIP-L uses quick_gelu,
    CLIP-G gelu. A file without a projection gets the identity (as ComfyUI assumes) if `identity_projection`,
    else it is an error."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from .sdxl_layout import is_open_clip, open_clip_to_transformers

    if ef.path.is_dir() and (ef.path / "config.json").exists():
        model = CLIPTextModelWithProjection.from_pretrained(str(ef.path), torch_dtype=dtype, local_files_only=True)
        return model.eval().requires_grad_(False)
    sd: dict[str, torch.Tensor] = {}
    for f in (find_weights_file(ef.path) if ef.path.is_dir() else [ef.path]):
        sd.update(load_state_dict(f, dtype, ef.prefix))
    if is_open_clip(sd):
        sd = open_clip_to_transformers(sd)
    sd = {(k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}"): v for k, v in sd.items()
          if not k.endswith(("position_ids", "logit_scale"))}
    try:
        emb = sd["text_model.embeddings.token_embedding.weight"]
        hidden = emb.shape[1]
        if "text_projection.weight" not in sd and identity_projection:
            # what ComfyUI assumes for a CLIP file without one
            log.warning("%s: no text_projection; using the identity for the pooled %s embedding", ef.path, role)
            sd["text_projection.weight"] = torch.eye(hidden, dtype=emb.dtype)
        layers = 0
        while f"text_model.encoder.layers.{layers}.mlp.fc1.weight" in sd:
            layers += 1
        cfg = CLIPTextConfig(
            vocab_size=emb.shape[0], hidden_size=hidden,
            intermediate_size=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
            max_position_embeddings=sd["text_model.embeddings.position_embedding.weight"].shape[0],
            hidden_act="gelu" if role == "clip_g" else "quick_gelu",
            projection_dim=sd["text_projection.weight"].shape[0],  # KeyError: no projection
            eos_token_id=eos_token_id if eos_token_id is not None else 2, bos_token_id=0,
            pad_token_id=eos_token_id if eos_token_id is not None else 1,
        )
    except KeyError as e:
        raise ModelFileError(f"{ef.path}: not a complete CLIP text encoder (missing {e.args[0]})") from None
    return materialize(CLIPTextModelWithProjection, cfg, sd, dtype, "text_model.", ef.path, "CLIP text encoder")


def load_t5_encoder(ef: EncoderFile, dtype: torch.dtype):
    from transformers import T5Config, T5EncoderModel

    if _pretrained_folder(ef):
        model = T5EncoderModel.from_pretrained(str(ef.path), torch_dtype=dtype, local_files_only=True)
        return model.eval().requires_grad_(False)

    sd = _read(ef, dtype)
    try:
        cfg = T5Config(**t5_config_of(sd))
    except KeyError as e:
        raise ModelFileError(f"{ef.path}: not a complete T5 encoder (missing {e.args[0]})") from None
    return materialize(T5EncoderModel, cfg, sd, dtype, "", ef.path, "T5 encoder")


def t5_config_of(sd: dict) -> dict:
    """T5 / UMT5 encoder config keys from a state dict's shapes (the tied embedding filled in where a file keeps only
    one of `shared` / `encoder.embed_tokens`); a KeyError names a missing tensor."""
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    sd.setdefault("encoder.embed_tokens.weight", sd["shared.weight"])
    rel = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    heads = rel.shape[1]
    inner = sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    return dict(
        vocab_size=sd["shared.weight"].shape[0], d_model=sd["shared.weight"].shape[1], d_kv=inner // heads,
        d_ff=sd[f"encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight"].shape[0],
        num_layers=_count(sd, "encoder.block.{}."), num_heads=heads, relative_attention_num_buckets=rel.shape[0],
        feed_forward_proj="gated-gelu" if gated else "relu", is_encoder_decoder=False, use_cache=False,
    )


def load_umt5_encoder(ef: EncoderFile, dtype: torch.dtype):
    """UMT5 (Wan's text encoder) from ComfyUI's umt5_xxl file (fp16, bf16 or scaled fp8) or a diffusers folder;
    the config from the shapes."""
    from transformers import UMT5Config, UMT5EncoderModel

    if _pretrained_folder(ef):
        model = UMT5EncoderModel.from_pretrained(str(ef.path), torch_dtype=dtype, local_files_only=True)
        return model.eval().requires_grad_(False)
    sd = _read(ef, dtype)
    try:
        cfg = UMT5Config(**t5_config_of(sd))
    except KeyError as e:
        raise ModelFileError(f"{ef.path}: not a complete UMT5 encoder (missing {e.args[0]})") from None
    return materialize(UMT5EncoderModel, cfg, sd, dtype, "", ef.path, "UMT5 encoder")


def load_llama_encoder(ef: EncoderFile, dtype: torch.dtype, config_of=None):
    """A Llama text model (transformers' LlamaModel, no LM head) from ComfyUI's llava_llama3 file (fp16, or scaled
    fp8 dequantized), a LLaVA checkpoint's language model, a Llama checkpoint, or a diffusers text_encoder folder;
    the config from the shapes: `config_of(shapes, source)` where a family's Llama has its own settings (HiDream's
    Llama 3.1), else Llama 3's (128-wide heads, rope theta 500000)."""
    from transformers import LlamaModel

    if _pretrained_folder(ef):
        model = LlamaModel.from_pretrained(str(ef.path), torch_dtype=dtype, local_files_only=True)
        return model.eval().requires_grad_(False)
    sd = {k: v for k, v in _read(ef, dtype).items() if not k.startswith(("lm_head.", "vision", "multi_modal"))}
    sd.pop("tokenizer", None)
    cfg = (config_of or llama3_config)({k: tuple(v.shape) for k, v in sd.items()}, ef.path)
    model = materialize(LlamaModel, cfg, sd, dtype, "", ef.path, "Llama text encoder")
    # the rotary frequencies are a computed buffer (not in the file): built for real, not left as empty memory
    model.rotary_emb = type(model.rotary_emb)(cfg)
    return model


def llama3_config(shapes: dict[str, tuple[int, ...]], source):
    """Llama 3's config (llava-llama-3) from a decoder stack's shapes."""
    from transformers import LlamaConfig

    try:
        emb = shapes["embed_tokens.weight"]
        q, k = shapes["layers.0.self_attn.q_proj.weight"], shapes["layers.0.self_attn.k_proj.weight"]
        cfg = LlamaConfig(
            vocab_size=emb[0], hidden_size=emb[1],
            intermediate_size=shapes["layers.0.mlp.gate_proj.weight"][0], num_hidden_layers=_count(shapes, "layers.{}."),
            num_attention_heads=q[0] // LLAMA_HEAD_DIM, num_key_value_heads=k[0] // LLAMA_HEAD_DIM,
            head_dim=LLAMA_HEAD_DIM, rms_norm_eps=1e-5, max_position_embeddings=8192,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            attention_bias="layers.0.self_attn.q_proj.bias" in shapes, tie_word_embeddings=False,
        )
    except KeyError as e:
        raise ModelFileError(f"{source}: not a complete Llama text encoder (missing {e.args[0]})") from None
    if q[0] % LLAMA_HEAD_DIM or k[0] % LLAMA_HEAD_DIM:
        raise ModelFileError(f"{source}: Llama attention widths {q[0]} / {k[0]} are not multiples of"
                             f" its {LLAMA_HEAD_DIM}-wide heads")
    return cfg


@torch.no_grad()
def run_t5(tokenizer, encoder: torch.nn.Module, captions: list[str], max_length: int,
           masked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A T5 / UMT5 encoder's last hidden states (float, on the CPU) for captions padded to `max_length`, and the
    tokens' attention mask (b, max_length); `masked`: the encoder attends to the tokens only (as most pipelines run
    it; Flux's runs T5 over the padding too)."""
    tok = tokenizer(captions, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                    return_attention_mask=True, return_tensors="pt")
    dev = next(encoder.parameters()).device
    mask = tok.attention_mask.to(dev) if masked else None
    return encoder(tok.input_ids.to(dev), attention_mask=mask)[0].float().cpu(), tok.attention_mask


def spiece_tokenizer(path: Path):
    """The SentencePiece tokenizer ComfyUI's umt5 files carry inside (tensor `spiece_model`), as a T5 tokenizer
    (pad 0, eos 1, unk 2); None if the file holds none."""
    import tempfile

    from safetensors import safe_open
    from transformers import T5Tokenizer

    if path.is_dir():
        return None
    with safe_open(str(path), framework="pt") as f:
        if "spiece_model" not in f.keys():
            return None
        data = f.get_tensor("spiece_model").numpy().tobytes()
    with tempfile.TemporaryDirectory() as d:
        model_file = Path(d) / "spiece.model"
        model_file.write_bytes(data)
        tok = T5Tokenizer(vocab_file=str(model_file), extra_ids=0, legacy=False)
    return tok


def materialize(cls, cfg, sd: dict, dtype: torch.dtype, level: str, path: Path, what: str) -> torch.nn.Module:
    """`cls(cfg)` with the weights of `sd` (keys under `level`, e.g. `text_model.`; transformers 5 drops that level
    in some towers, so it is matched to the model), position-id buffers rebuilt; missing weights are an error."""
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    if not any(k.startswith(level) for k in model.state_dict()):
        sd = {k[len(level):] if k.startswith(level) else k: v for k, v in sd.items()}
    missing, _ = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise ModelFileError(f"{path}: incomplete {what}, missing {len(missing)} tensors (e.g. {missing[0]})")
    for name, buf in model.named_buffers():
        if name.endswith("position_ids"):
            buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
    return model.eval().requires_grad_(False)


# --- tokenizers -------------------------------------------------------------------------------

COMFY_TOKENIZER_DIRS = {
    "clip": ("comfy/sd1_tokenizer",),
    "t5": ("comfy/text_encoders/t5_tokenizer", "comfy/t5_tokenizer"),
    "llama": ("comfy/text_encoders/llama_tokenizer",),
    "qwen25": ("comfy/text_encoders/qwen25_tokenizer",),
}
TOKENIZER_NAMES = {"clip": "CLIP", "t5": "T5", "llama": "Llama", "qwen25": "Qwen2.5"}
# what a folder must hold to be a tokenizer of that kind (a Llama 3 tokenizer is its tokenizer.json: a folder with
# only its tokenizer_config.json cannot load)
TOKENIZER_FILES = {"llama": ("tokenizer.json",), "qwen25": ("tokenizer.json", "vocab.json")}


def _looks_like_tokenizer(folder: Path, kind: str = "") -> bool:
    names = TOKENIZER_FILES.get(kind, ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer_config.json"))
    return folder.is_dir() and any((folder / n).exists() for n in names)


def find_tokenizer(kind: str, explicit: Path | None, folder_candidates: list[Path], near: list[Path]) -> Path:
    """The first tokenizer folder found: explicit path, then model folders, then a ComfyUI install."""
    tried: list[str] = []
    for c in ([explicit] if explicit else []) + folder_candidates:
        if c is None:
            continue
        tried.append(str(c))
        if _looks_like_tokenizer(c, kind):
            return c
    for root in comfyui_roots(*near):
        for rel in COMFY_TOKENIZER_DIRS[kind]:
            c = root / rel
            tried.append(str(c))
            if _looks_like_tokenizer(c, kind):
                return c
    name = TOKENIZER_NAMES[kind]
    raise ModelFileError(
        f"no {name} tokenizer found (looked in: {', '.join(tried) or 'nothing'}). Set model.tokenizer_paths to a"
        f" local tokenizer folder, keep the model files inside a ComfyUI install, or set COMFYUI_PATH to a ComfyUI"
        f" checkout (its comfy/ folder ships the tokenizers)."
    )


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises many kinds here
        raise ModelFileError(f"{folder}: cannot load tokenizer ({e})") from None
