"""Random HiDream-I1 files in the layouts ComfyUI users keep: the transformer (`diffusion_models`, ComfyUI's module
names), CLIP-L and CLIP-G with their projections and 248 positions (HiDream's long CLIPs), T5, a Llama-3.1-style
decoder (`model.layers.N...`, as ComfyUI's llama file), a Flux-layout VAE, and the tokenizers (CLIP, T5, and a
word-level Llama-3 one: <|begin_of_text|> first, padded with <|eot_id|>).

ComfyUI fixes HiDream's config at full size (17B), so a small file is detected as HiDream but only loads into
ComfyUI's model class built at the same small size (tests/integration/test_comfyui_hidream.py does that).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from ..fileio import save_safetensors_atomic
from ..models.hidream_layout import ACTIVE_EXPERTS, HEAD_DIM, MAX_RESOLUTION, PATCH, ROPE_AXES, llama_layer_of_blocks
from ..models.hidream_text import LLAMA31
from . import tiny

LLAMA_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")


def hidream_diffusers_config(heads: int = 1, double: int = 2, single: int = 2, experts: int = 4, t5_dim: int = 32,
                             llama_dim: int = 64, llama_layers: int = 2, pooled: int = 80) -> dict:
    return dict(patch_size=PATCH, in_channels=16, out_channels=16, num_layers=double, num_single_layers=single,
                attention_head_dim=HEAD_DIM, num_attention_heads=heads, caption_channels=[t5_dim, llama_dim],
                text_emb_dim=pooled, num_routed_experts=experts, num_activated_experts=ACTIVE_EXPERTS,
                axes_dims_rope=ROPE_AXES, max_resolution=MAX_RESOLUTION,
                llama_layers=llama_layer_of_blocks(double + single, llama_layers))


def make_hidream_file(path: Path, cfg: dict, seed: int = 41, dtype: torch.dtype = torch.float32) -> None:
    """A HiDream transformer with random weights under ComfyUI's (and diffusers') names, no prefix."""
    from diffusers import HiDreamImageTransformer2DModel

    shapes = tiny.module_shapes(HiDreamImageTransformer2DModel, cfg)
    save_safetensors_atomic(tiny.random_weights(shapes, seed, dtype, bias_std=0.02, norm_std=0.1), path)


def build_llama_tokenizer(folder: Path, words: tuple[str, ...] = tuple(tiny.WORDS)):
    """A word-level tokenizer with Llama-3's special tokens: <|begin_of_text|> prepended, no end token appended,
    <|eot_id|> as eos and pad (HiDream's pad), saved as a fast tokenizer folder."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0}
    for w in dict.fromkeys([w.lower() for w in words] + list(string.ascii_lowercase) + list(string.digits)):
        vocab[w] = len(vocab)
    for s in LLAMA_SPECIALS:
        vocab[s] = len(vocab)
    bos, eos = LLAMA_SPECIALS[0], LLAMA_SPECIALS[2]
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos,
                                   unk_token="<unk>", model_max_length=131072)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return fast


def make_long_clip_file(path: Path, vocab: int, hidden: int, layers: int, act: str, seed: int,
                        dtype: torch.dtype = torch.float32) -> None:
    """A CLIP text tower with a text projection and 248 positions (HiDream's clip_l / clip_g), ComfyUI's keys."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), max_position_embeddings=248, hidden_act=act,
                         projection_dim=hidden, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    sd = CLIPTextModelWithProjection(cfg).state_dict()
    sd = {(k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v.to(dtype)
          for k, v in sd.items() if not k.endswith("position_ids")}
    save_safetensors_atomic(sd, path)


def llama_test_config(vocab: int, hidden: int = 64, layers: int = 2, inter: int = 128):
    """A small Llama with Llama-3.1's rope, norm and bias settings (one head: the width is under 128)."""
    from transformers import LlamaConfig

    head = HEAD_DIM if hidden % HEAD_DIM == 0 else hidden
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=hidden // head, num_key_value_heads=max(1, hidden // head // 4),
                       head_dim=head, **LLAMA31)


def make_llama_file(path: Path, cfg, seed: int = 43, dtype: torch.dtype = torch.float32) -> None:
    """A Llama decoder stack with random weights under ComfyUI's llama keys (`model.`; no LM head)."""
    from transformers import LlamaModel

    torch.manual_seed(seed)
    sd = {f"model.{k}": v.to(dtype) for k, v in LlamaModel(cfg).state_dict().items()}
    save_safetensors_atomic(sd, path)


def write_hidream_files(folder: Path, name: str = "hidream_i1_full", dtype: torch.dtype = torch.float32,
                        heads: int = 1, double: int = 2, single: int = 2, llama_layers: int = 2) -> dict:
    """A random HiDream-I1 with tiny encoders in the files users keep; returns the `model:` config."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {n: folder / f"{name}_{n}.safetensors" for n in ("transformer", "clip_l", "clip_g", "t5", "llama", "vae")}
    toks = {n: folder / f"{name}_tokenizer_{n}" for n in ("clip", "t5", "llama")}
    clip_tok = tiny.build_tokenizer(toks["clip"], "clip", model_max_length=248)
    t5_tok = tiny.build_tokenizer(toks["t5"], "t5")
    llama_tok = build_llama_tokenizer(toks["llama"])
    make_long_clip_file(paths["clip_l"], len(clip_tok), 32, 1, "quick_gelu", seed=44, dtype=dtype)
    make_long_clip_file(paths["clip_g"], len(clip_tok), 48, 2, "gelu", seed=45, dtype=dtype)
    tiny.make_t5_file(paths["t5"], len(t5_tok), d_model=32, seed=46, dtype=dtype)
    make_llama_file(paths["llama"], llama_test_config(len(llama_tok), layers=llama_layers), dtype=dtype)
    tiny.make_vae_file(paths["vae"], [32, 32, 32, 32], layers=1, latent=16, dtype=dtype)
    cfg = hidream_diffusers_config(heads=heads, double=double, single=single, llama_layers=llama_layers)
    make_hidream_file(paths["transformer"], cfg, dtype=dtype)
    return {"arch": "hidream", "name_or_path": str(paths["transformer"]),
            "text_encoder_paths": [str(paths[n]) for n in ("clip_l", "clip_g", "t5", "llama")],
            "vae_path": str(paths["vae"]),
            "tokenizer_paths": [str(toks["clip"]), str(toks["clip"]), str(toks["t5"]), str(toks["llama"])],
            "t5_max_length": 32}


def write_hidream_demo(folder: Path) -> dict:
    """The demo's HiDream-I1 Full (the variant read from the file name; Full samples with CFG), in bf16."""
    name = "hidream_i1_full_demo"
    model = {"arch": "hidream", "name_or_path": str(folder / f"{name}_transformer.safetensors"),
             "text_encoder_paths": [str(folder / f"{name}_{n}.safetensors")
                                    for n in ("clip_l", "clip_g", "t5", "llama")],
             "vae_path": str(folder / f"{name}_vae.safetensors"),
             "tokenizer_paths": [str(folder / f"{name}_tokenizer_{n}") for n in ("clip", "clip", "t5", "llama")],
             "t5_max_length": 32}
    if all(Path(p).exists() for p in [model["name_or_path"], *model["text_encoder_paths"], model["vae_path"]]):
        return model
    return write_hidream_files(folder, name=name, dtype=torch.bfloat16)
