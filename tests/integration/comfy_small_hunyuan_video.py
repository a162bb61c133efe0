"""HunyuanVideo T2V on ComfyUI's MODEL, small: ComfyUI's HunyuanVideo entry (its HunyuanVideo model, guidance
embedding on: the T2V model is guidance-distilled) at hidden 64 in 2 heads of 32 (RoPE axes 8+12+12 = 32), 2 double
and 2 single blocks, patch 1x2x2; ComfyUI's own text encoders of the entry (llava-llama-3 layer -3 with the prompt
template ComfyUI crops, CLIP-L pooled) at Llama hidden 32, 4 layers (the least its layer -3 takes), one head (ComfyUI
fixes heads of 128), CLIP-L hidden 32, 1 layer; ComfyUI's HunyuanVideo VAE (16 channels, 8x spatial, 4x temporal) at
the size ComfyUI fixes it (its widths 128-512 are not read from the state dict), random. Clips of 5 frames at 64 px are
2 latent frames of 8x8. Trained with `timestep_type: shift` (ComfyUI's sampling shift of the model, 7).

ComfyUI's Llama 3 tokenizer.json is empty in this ComfyUI checkout (comfy/text_encoders/llama_tokenizer holds only its
tokenizer_config.json), and nothing may be fetched: while ComfyUI's CLIP is built, the class ComfyUI's LLAMA3Tokenizer
loads that folder through reads a small word-level tokenizer.json built here instead, whose special tokens are ComfyUI's
own (their Llama 3 ids, from that tokenizer_config.json) and whose "user" and "\\n\\n" have Llama 3's ids 882 and 271,
the ids ComfyUI's encoder looks for to crop the template. The template, its crop, the encoders and the conditioning are
ComfyUI's."""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch

from comfy_small import SmallFamily, fill_random, small_clip, small_model

TEXT = 32  # the Llama width, the model's context_in_dim
POOLED = 32  # the CLIP-L width, the model's vec_in_dim
UNET = {"image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "patch_size": [1, 2, 2],
        "vec_in_dim": POOLED, "context_in_dim": TEXT, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2,
        "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 256, "qkv_bias": True, "guidance_embed": True,
        "byt5": False, "meanflow": False, "use_cond_type_embedding": False, "vision_in_dim": None,
        "meanflow_sum": False}
LLAMA = {"hidden_size": TEXT, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 1,
         "num_key_value_heads": 1}
CLIP_L = {"hidden_size": POOLED, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1,
          "projection_dim": POOLED}

EXPECT = {"detected": "HunyuanVideo", "model_class": "HunyuanVideo", "stacks": ["double_blocks", "single_blocks"],
          "text_keys": ["cross_attn", "cross_attn__shape", "pooled_output", "pooled_output__shape"],
          "latent_shapes": [[16, 2, 8, 8]], "sample_shape": [3, 5, 64, 64], "not_targets": ["txt_in"],
          "condition_effects": ["guidance_effect", "pooled_effect"]}

# Llama 3's ids of the pieces ComfyUI's HunyuanVideo encoder reads beside the special tokens
LLAMA3_IDS = {"\n": 198, "\n\n": 271, "user": 882}


def _llama_words() -> list[str]:
    from trainer.demo import tiny
    from trainer.models.hunyuan_video import PROMPT_TEMPLATE  # the same template ComfyUI's tokenizer formats

    template = re.sub(r"<\|\w+\|>", " ", PROMPT_TEMPLATE.replace("{}", " ")).lower()
    pieces = [w.lower() for w in tiny.WORDS] + re.findall(r"\w+|[^\w\s]", template) + list("abcdefghijklmnopqrstuvwxyz")
    return list(dict.fromkeys(pieces + list("0123456789.,:;!?-'")))


def write_llama_tokenizer(folder: Path, comfyui: str) -> Path:
    """A word-level tokenizer.json with Llama 3's ids: ComfyUI's special tokens (its tokenizer_config.json) at theirs,
    BOS added in front, "\\n", "\\n\\n" and "user" at Llama 3's; the other words from 1000 up."""
    from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.processors import TemplateProcessing

    config = json.loads((Path(comfyui) / "comfy/text_encoders/llama_tokenizer/tokenizer_config.json").read_text())
    special = {v["content"]: int(k) for k, v in config["added_tokens_decoder"].items()}
    vocab = dict(LLAMA3_IDS)
    for w in _llama_words():
        vocab.setdefault(w, 1000 + len(vocab))
    vocab.update(special)
    tok = Tokenizer(WordLevel(vocab, unk_token=config["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n+|\w+|[^\w\s]"), behavior="removed", invert=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    bos = config["bos_token"]
    tok.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, special[bos])])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    keys = ("bos_token", "eos_token", "pad_token", "unk_token", "padding_side")
    (folder / "tokenizer_config.json").write_text(json.dumps({k: config[k] for k in keys}))
    return folder


@contextmanager
def comfy_llama_tokenizer(folder: Path):
    """While inside, ComfyUI's LLAMA3Tokenizer (comfy.text_encoders.hunyuan_video) loads `folder` where it asks for
    its own llama_tokenizer folder: its tokenizer class reads the tokenizer.json there as it is."""
    import comfy.text_encoders.hunyuan_video as hv
    from transformers import PreTrainedTokenizerFast

    class LlamaTokenizerHere(PreTrainedTokenizerFast):
        @classmethod
        def from_pretrained(cls, path, *args, **kwargs):
            if Path(path).name == "llama_tokenizer":
                path = folder
            return PreTrainedTokenizerFast.from_pretrained(str(path), *args, **kwargs)

    comfy_class = hv.LlamaTokenizerFast
    hv.LlamaTokenizerFast = LlamaTokenizerHere
    try:
        yield
    finally:
        hv.LlamaTokenizerFast = comfy_class


def comfy_vae(detection: dict[str, torch.Tensor], seed: int):
    """ComfyUI's VAE as comfy.sd.VAE builds it for the state-dict keys it detects the VAE by (`detection`), at the
    size ComfyUI fixes, its weights then seeded random in place (one copy: HunyuanVideo 1.5's is 1.26B weights)."""
    import comfy.sd

    vae = comfy.sd.VAE(sd=detection)
    fill_random(vae.first_stage_model, seed)
    return vae


def hunyuan_video_vae():
    """ComfyUI's HunyuanVideo VAE (its LDM AutoencoderKL with 3D convolutions, 16 latent channels)."""
    detection = {"decoder.conv_in.conv.weight": torch.zeros(512, 16, 3, 3, 3),
                 "post_quant_conv.weight": torch.zeros(16, 16, 1, 1, 1)}
    return comfy_vae(detection, seed=9)


def build(cache: Path, comfyui: str) -> SmallFamily:
    patcher = small_model("HunyuanVideo", UNET)
    with comfy_llama_tokenizer(write_llama_tokenizer(cache / "hunyuan_video_llama_tokenizer_v1", comfyui)):
        clip = small_clip(patcher, {"llama": LLAMA, "clip_l": CLIP_L})
    # timestep_type shift: the training sigmas shifted by ComfyUI's own sampling shift for the model (7)
    return SmallFamily(patcher, clip, hunyuan_video_vae(), latent_shape=(1, 16, 2, 8, 8), video_frames=5,
                       settings={"timestep_type": "shift"})
