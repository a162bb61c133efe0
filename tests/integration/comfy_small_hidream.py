"""HiDream-I1 on ComfyUI's MODEL, small: ComfyUI's HiDream entry (its HiDreamImageTransformer2DModel, which detection
fixes at 17B: width 2560, 16 double + 32 single stream blocks, 4 routed experts of which 2 run per token) at width 64
(2 heads of 32, rope axes (16, 8, 8): ComfyUI's (64, 32, 32) for heads of 128, scaled down; the width must split into
the heads and the axes must sum to a head), 2 double and 2 single stream blocks, each block's image feed-forward still
ComfyUI's MoE (a shared expert plus 2 routed experts, 1 chosen per token by its gate: the least that still routes);
its feed-forwards are 256 wide whatever the width (ComfyUI rounds them up to multiples of 256).

The four text encoders are ComfyUI's own, through the clip_target ComfyUI's CLIP loader builds for HiDream's four files
(text_encoders.hidream: hidream_clip + HiDreamTokenizer; `supported_models.HiDream.clip_target()` is ComfyUI's TODO):
CLIP-L at hidden 32, CLIP-G at hidden 64 with 3 layers (it reads the penultimate, which ComfyUI asserts is not the
first; pooled: their projections side by side, 96 = the model's text_emb_dim), T5-XXL at d_model 32 (the context),
Llama-3.1-8B at hidden 48 with 2 layers (its head width stays 128: ComfyUI's Llama2Config fixes it). ComfyUI passes
each Llama layer's output as `conditioning_llama3` (1, 2, 128, 48) and each block reads one of them (llama_layers
[0, 1, 1, 1], as ComfyUI's [0..31, 31 ...]).

This ComfyUI checkout lacks `comfy/text_encoders/llama_tokenizer/tokenizer.json` (a file over the 4 MiB its snapshot
keeps), so ComfyUI's LLAMA3Tokenizer reads a small one this module writes: characters as tokens (transformers'
LlamaTokenizer is BPE over the file's vocabulary) with Llama-3's special ids (<|begin_of_text|> 128000, <|eot_id|>
128009, ComfyUI's pad for HiDream). Only the folder it reads is redirected; its arguments (start token, pad, 128 tokens
at least) are ComfyUI's. The VAE is the 16-channel Flux one.
"""

from __future__ import annotations

import json
import string
from contextlib import contextmanager
from pathlib import Path

from comfy_small import SmallFamily, flux_vae, small_clip, small_model

T5_DIM, LLAMA_DIM, POOLED = 32, 48, 32 + 64  # T5's d_model, Llama's hidden size, CLIP-L + CLIP-G projections
DOUBLE, SINGLE, LLAMA_LAYERS = 2, 2, 2
UNET = {"image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": DOUBLE,
        "num_single_layers": SINGLE, "attention_head_dim": 32, "num_attention_heads": 2,
        "caption_channels": [T5_DIM, LLAMA_DIM], "text_emb_dim": POOLED, "num_routed_experts": 2,
        "num_activated_experts": 1, "axes_dims_rope": [16, 8, 8], "max_resolution": [128, 128],
        "llama_layers": [min(i, LLAMA_LAYERS - 1) for i in range(DOUBLE + SINGLE)]}
ENCODERS = {
    "clip_l": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    "clip_g": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 2},
    "t5xxl": {"d_model": T5_DIM, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 2},
    "llama": {"hidden_size": LLAMA_DIM, "intermediate_size": 96, "num_hidden_layers": LLAMA_LAYERS,
              "num_attention_heads": 1, "num_key_value_heads": 1},
}
LLAMA3_SPECIALS = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|eot_id|>": 128009}

EXPECT = {"detected": "HiDream", "model_class": "HiDream", "stacks": ["double_stream_blocks", "single_stream_blocks"],
          "text_keys": ["conditioning_llama3", "conditioning_llama3__shape", "cross_attn", "cross_attn__shape",
                        "pooled_output", "pooled_output__shape"],
          "llama_shape": [LLAMA_LAYERS, 128, LLAMA_DIM]}  # one caption's conditioning_llama3: layers, tokens, width


def write_llama_tokenizer(folder: Path) -> Path:
    """A character-level Llama-3-style tokenizer folder: every printable character a token, <|begin_of_text|>
    prepended, Llama-3's special ids."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import BPE
    from tokenizers.processors import TemplateProcessing

    if (folder / "tokenizer.json").exists():
        return folder
    vocab = {"<unk>": 0, "\u2581": 1}  # Metaspace's word boundary
    for ch in string.printable.strip():
        vocab.setdefault(ch, len(vocab))
    vocab.update(LLAMA3_SPECIALS)
    tok = Tokenizer(BPE(vocab, [], unk_token="<unk>"))
    tok.add_special_tokens([AddedToken(t, special=True) for t in LLAMA3_SPECIALS])
    bos = "<|begin_of_text|>"
    tok.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, LLAMA3_SPECIALS[bos])])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "unk_token": "<unk>",
              "pad_token": "<|eot_id|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@contextmanager
def llama_tokenizer_in(folder: Path):
    """ComfyUI's LLAMA3Tokenizer reads the `llama_tokenizer` folder beside its module's file: for the while, that file
    is taken to sit beside `folder` (named llama_tokenizer)."""
    import comfy.text_encoders.hunyuan_video as hv

    assert folder.name == "llama_tokenizer", folder
    real = hv.__file__
    hv.__file__ = str(folder.parent / Path(real).name)
    try:
        yield
    finally:
        hv.__file__ = real


def hidream_tokenizer(llama_folder: Path):
    """ComfyUI's HiDreamTokenizer with its Llama-3 part reading `llama_folder`."""
    from comfy.text_encoders.hidream import HiDreamTokenizer

    class HiDreamTokenizerSmallLlama(HiDreamTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            with llama_tokenizer_in(llama_folder):
                super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)

    return HiDreamTokenizerSmallLlama


def build(cache: Path, comfyui: str) -> SmallFamily:
    import comfy.supported_models_base
    import comfy.text_encoders.hidream

    patcher = small_model("HiDream", UNET)
    tokenizer = hidream_tokenizer(write_llama_tokenizer(cache / "hidream_small" / "llama_tokenizer"))
    # what comfy.sd.load_clip builds for HiDream's four encoder files (all four present)
    target = comfy.supported_models_base.ClipTarget(tokenizer, comfy.text_encoders.hidream.hidream_clip())
    clip = small_clip(patcher, ENCODERS, clip_target=target)
    return SmallFamily(patcher, clip, flux_vae(cache), latent_shape=(1, 16, 8, 8))
