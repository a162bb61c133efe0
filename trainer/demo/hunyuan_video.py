"""Random HunyuanVideo files in the layouts ComfyUI loads: the transformer (`diffusion_models`, the original key
layout), a small Llama 3 text model in the llava_llama3 file's layout and CLIP-L (`text_encoders`), the VAE in
ComfyUI's LDM layout (`vae`), and the two tokenizers (a Llama 3-style one with the chat template's special tokens)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..fileio import save_safetensors_atomic
from ..models.flux_layout import rope_axes
from ..models.hunyuan_video import PROMPT_TEMPLATE
from ..models.hunyuan_video_layout import diffusers_to_original, vae_key_to_comfy
from . import tiny

LLAMA_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                 "<unk>", "<pad>")


def hunyuan_diffusers_config(hidden: int = 128, double: int = 2, single: int = 2, text_dim: int = 128,
                             pooled_dim: int = 768, guidance: bool = True) -> dict:
    """A HunyuanVideoTransformer3DModel config ComfyUI can build: heads of 128, 2 refiner blocks, MLP ratio 4,
    pooled width 768 (ComfyUI fixes those); depth, width and text width are free."""
    return dict(in_channels=16, out_channels=16, num_attention_heads=hidden // 128, attention_head_dim=128,
                num_layers=double, num_single_layers=single, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2,
                patch_size_t=1, qk_norm="rms_norm", guidance_embeds=guidance, text_embed_dim=text_dim,
                pooled_projection_dim=pooled_dim, rope_theta=256.0, rope_axes_dim=rope_axes(128))


def make_hunyuan_file(path: Path, cfg: dict, seed: int = 41, dtype: torch.dtype = torch.float32,
                      comfy_names: bool = False) -> None:
    """A HunyuanVideo transformer with random weights in the original layout (or under ComfyUI's names)."""
    from diffusers import HunyuanVideoTransformer3DModel

    shapes = tiny.module_shapes(HunyuanVideoTransformer3DModel, cfg)
    sd = tiny.random_weights(shapes, seed, dtype, bias_std=0.02, norm_std=0.1)
    save_safetensors_atomic(diffusers_to_original(sd, cfg, comfy_names=comfy_names), path)


def make_hunyuan_vae_file(path: Path, widths: tuple[int, ...] = (32, 32, 32, 32), layers: int = 1, seed: int = 42,
                          dtype: torch.dtype = torch.float32) -> None:
    """A HunyuanVideo VAE (16 latent channels) with random weights in ComfyUI's LDM layout (the mid-block attention
    projections as 1x1x1 convolutions)."""
    from diffusers import AutoencoderKLHunyuanVideo

    shapes = tiny.module_shapes(AutoencoderKLHunyuanVideo, dict(block_out_channels=widths, layers_per_block=layers))
    sd = tiny.random_weights(shapes, seed, dtype, bias_std=0.02)
    out = {}
    for k, v in sd.items():
        name = vae_key_to_comfy(k, len(widths))
        out[name] = v[:, :, None, None, None].contiguous() if ".mid.attn_1." in name and v.dim() == 2 else v
    save_safetensors_atomic(out, path)


def build_llama_tokenizer(folder: Path, model_max_length: int = 4096):
    """A word-level tokenizer shaped like llava-llama-3's: the chat template's special tokens kept whole, BOS
    `<|begin_of_text|>` added in front, `<pad>` for padding; the template's words are in its vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    template_words = re.findall(r"\w+|[^\w\s]", re.sub(r"<\|\w+\|>", " ", PROMPT_TEMPLATE.replace("{}", " ")).lower())
    words = list(dict.fromkeys([w.lower() for w in tiny.WORDS] + template_words + list("abcdefghijklmnopqrstuvwxyz0123456789.,:;!?-'") + ["\n", "\n\n"]))
    vocab = {w: i for i, w in enumerate(words)}
    for t in LLAMA_SPECIAL:
        vocab[t] = len(vocab)
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    # words, single punctuation marks and runs of newlines (Llama 3 has a token for "\n\n") are the pieces
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n+|\w+|[^\w\s]"), behavior="removed", invert=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA_SPECIAL])
    bos = "<|begin_of_text|>"
    tok.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|end_of_text|>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=model_max_length)
    fast.padding_side = "right"
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return fast


def make_llama_file(path: Path, vocab_size: int, hidden: int = 128, layers: int = 3, intermediate: int = 256,
                    kv_heads: int = 1, seed: int = 43, dtype: torch.dtype = torch.float32) -> None:
    """A Llama 3-structured text model (heads of 128) with random weights, in ComfyUI's llava_llama3 key layout
    (`model.layers.N...`, with an LM head the trainer leaves out)."""
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=kv_heads,
                      head_dim=128, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    shapes = {k: tuple(v.shape) for k, v in LlamaModel(cfg).state_dict().items()}
    sd = {f"model.{k}": v for k, v in tiny.random_weights(shapes, seed, dtype, norm_std=0.1).items()}
    sd["lm_head.weight"] = torch.zeros(vocab_size, hidden, dtype=dtype)
    save_safetensors_atomic(sd, path)


def write_hunyuan_files(folder: Path, dtype: torch.dtype = torch.float32, name: str = "hunyuan_video",
                        hidden: int = 128, double: int = 2, single: int = 2, text_dim: int = 128,
                        clip_hidden: int = 768, comfy_names: bool = False) -> dict:
    """A random HunyuanVideo in the files users keep, with its tokenizers; sized so ComfyUI detects and builds it
    (heads of 128, pooled width 768). Returns the `model:` config."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {n: folder / f"{name}_{n}.safetensors" for n in ("transformer", "llama", "clip_l", "vae")}
    tok_llama, tok_clip = folder / f"{name}_tokenizer_llama", folder / f"{name}_tokenizer_clip"
    llama_tok = build_llama_tokenizer(tok_llama)
    clip_tok = tiny.build_tokenizer(tok_clip, "clip")
    make_hunyuan_file(paths["transformer"], hunyuan_diffusers_config(hidden, double, single, text_dim, clip_hidden),
                      dtype=dtype, comfy_names=comfy_names)
    make_llama_file(paths["llama"], len(llama_tok), hidden=text_dim, dtype=dtype)
    tiny.make_clip_file(paths["clip_l"], len(clip_tok), hidden=clip_hidden, layers=1, dtype=dtype)
    make_hunyuan_vae_file(paths["vae"], dtype=dtype)
    return {"arch": "hunyuan_video", "name_or_path": str(paths["transformer"]),
            "text_encoder_paths": [str(paths["llama"]), str(paths["clip_l"])], "vae_path": str(paths["vae"]),
            "tokenizer_paths": [str(tok_llama), str(tok_clip)]}


def write_hunyuan_video_demo(folder: Path) -> dict:
    name = "hunyuan_video_demo"
    transformer = folder / f"{name}_transformer.safetensors"
    if transformer.exists():
        return {"arch": "hunyuan_video", "name_or_path": str(transformer),
                "text_encoder_paths": [str(folder / f"{name}_llama.safetensors"),
                                       str(folder / f"{name}_clip_l.safetensors")],
                "vae_path": str(folder / f"{name}_vae.safetensors"),
                "tokenizer_paths": [str(folder / f"{name}_tokenizer_llama"), str(folder / f"{name}_tokenizer_clip")]}
    return write_hunyuan_files(folder, dtype=torch.bfloat16, name=name)
