"""Random OmniGen2 files in the layouts ComfyUI users keep: the transformer (`diffusion_models`, ComfyUI's names), a
Qwen2.5-style language model (`model.layers.N...`, with a vision-tower tensor beside it as ComfyUI's
qwen_2.5_vl file has), a Flux-layout VAE, and a word-level tokenizer with Qwen's chat tokens.

ComfyUI fixes OmniGen2's config at full size (4B), so a small file is detected as OmniGen2 but loads only into
ComfyUI's model class built at the same small size (tests/integration/test_comfyui_omnigen2.py does that).
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import torch

from ..fileio import save_safetensors_atomic
from ..models.omnigen2 import TEMPLATE
from . import tiny

QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def omnigen2_config(hidden: int = 240, layers: int = 2, refiner_layers: int = 1, kv_heads: int = 1,
                    text_dim: int = 64) -> dict:
    """Heads of 120 (OmniGen2's rope axes 40 + 40 + 40): 240 wide is two heads."""
    return dict(hidden_size=hidden, num_layers=layers, num_refiner_layers=refiner_layers,
                num_attention_heads=hidden // 120, num_kv_heads=kv_heads, text_feat_dim=text_dim)


def make_omnigen2_file(path: Path, cfg: dict, seed: int = 71, dtype: torch.dtype = torch.float32) -> None:
    from ..models.omnigen2_transformer import OmniGen2Transformer

    shapes = tiny.module_shapes(OmniGen2Transformer, cfg)
    # modulation tables and index embeddings visible (not zero), so a misplaced gate or reference shows
    sd = tiny.random_weights(shapes, seed, dtype, bias_std=0.05, norm_std=0.1, std={"image_index_embedding": 0.5})
    save_safetensors_atomic(sd, path)


def build_qwen_tokenizer(folder: Path, words: tuple[str, ...] = tuple(tiny.WORDS)):
    """A word-level tokenizer with Qwen's chat tokens as special tokens, nothing added around a text (Qwen2 adds
    no bos / eos), padded with <|endoftext|>; the template's words are in its vocabulary."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    template_words = re.findall(r"[a-z]+", TEMPLATE.lower())
    vocab = {"<unk>": 0}
    for w in dict.fromkeys([w.lower() for w in words] + template_words + list(string.ascii_lowercase)
                           + list(string.digits) + list(string.punctuation)):
        vocab[w] = len(vocab)
    for s in QWEN_SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=QWEN_SPECIALS[0], eos_token=QWEN_SPECIALS[2],
                                   unk_token="<unk>", additional_special_tokens=list(QWEN_SPECIALS[1:]),
                                   model_max_length=32768)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return fast


def make_qwen_file(path: Path, vocab: int, hidden: int, layers: int = 1, seed: int = 72,
                   dtype: torch.dtype = torch.float32, heads: int = 1, kv_heads: int = 1) -> None:
    """A Qwen2 decoder with random weights, heads of 128 (one by default), under `model.` like ComfyUI's file
    (ComfyUI's detection reads Qwen2.5-VL-3B from a k_proj bias 256 wide: kv_heads=2)."""
    from transformers import Qwen2Config, Qwen2Model

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=128, rms_norm_eps=1e-6,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    sd = {f"model.{k}": v.to(dtype) for k, v in Qwen2Model(cfg).state_dict().items()}
    sd["visual.patch_embed.proj.weight"] = torch.zeros(8, 3, 2, 2, dtype=dtype)  # never loaded
    save_safetensors_atomic(sd, path)


def write_omnigen2_files(folder: Path, cfg: dict, seed: int = 71) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_qwen_tokenizer(folder / "qwen25_tokenizer")
    paths = {n: folder / f"{n}.safetensors" for n in ("omnigen2_demo", "qwen_2.5_vl_demo", "omnigen2_demo_vae")}
    make_omnigen2_file(paths["omnigen2_demo"], cfg, seed)
    make_qwen_file(paths["qwen_2.5_vl_demo"], len(tok), cfg["text_feat_dim"], seed=seed + 1)
    tiny.make_vae_file(paths["omnigen2_demo_vae"], [32, 32], latent=16, seed=seed + 2)
    return {"arch": "omnigen2", "name_or_path": str(paths["omnigen2_demo"]),
            "text_encoder_paths": [str(paths["qwen_2.5_vl_demo"])], "tokenizer_paths": [str(folder / "qwen25_tokenizer")],
            "vae_path": str(paths["omnigen2_demo_vae"])}


def write_omnigen2_demo(folder: Path) -> dict:
    if (folder / "omnigen2_demo.safetensors").exists() and (folder / "qwen25_tokenizer").exists():
        return {"arch": "omnigen2", "name_or_path": str(folder / "omnigen2_demo.safetensors"),
                "text_encoder_paths": [str(folder / "qwen_2.5_vl_demo.safetensors")],
                "tokenizer_paths": [str(folder / "qwen25_tokenizer")],
                "vae_path": str(folder / "omnigen2_demo_vae.safetensors")}
    return write_omnigen2_files(folder, omnigen2_config())
