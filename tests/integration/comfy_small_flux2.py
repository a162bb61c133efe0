"""Flux.2 on ComfyUI's MODEL, small: ComfyUI's Flux2 entry (its Flux model with the settings its detection gives
Flux.2: patch 1 over 128-channel latents, 4 RoPE axes, theta 2000, shared modulation, SiLU-gated MLPs, no biases,
reference images by index) at hidden 64, 2 heads of 32 (4 RoPE axes of 8), 2 double and 2 single blocks, guidance
embedded as in Flux.2 dev. Its text encoder is the one ComfyUI's CLIPLoader builds for Flux.2 (the Flux2 entry's own
clip_target is a TODO returning None in v0.8.0): ComfyUI's pruned Mistral-3 24B (`flux2_te(pruned=True)`, the
layout of Comfy-Org's Flux.2 text encoder) at hidden 32 with 30 layers, the fewest it takes: it stacks the hidden
states before layers 10, 20 and 30 (so 3 x 32 = 96 is the model's context width), with its own Flux2Tokenizer over a
byte-level tekken vocabulary of our making (the real one is Mistral's). The VAE is ComfyUI's Flux.2 VAE built from a
random state dict: the ldm KL VAE at ComfyUI's fixed widths with 32 latent channels, quant convs and the batch-norm
statistics whose presence makes ComfyUI patchify 2x2 into 128 channels at 16x.

ComfyUI v0.8.0's Mistral tokenizer was written against transformers <= 5.14: from 5.15 on the MistralConverter it
calls takes a tekken file instead of the vocabulary, and the Llama tokenizer it wraps no longer adds <s> to an
empty text (ComfyUI fixed it upstream after v0.8.0). Where ComfyUI's own construction fails for that reason, and
only then, the tokenizer is built by the same ComfyUI classes with transformers' converter given the old calling
convention for the length of that construction (`_tekken_converter_compat`): every ComfyUI line still runs."""

from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path

import torch

from comfy_small import SmallFamily, small_clip, small_model

TE_WIDTH = 32  # the text encoder's hidden size; the model's context is 3 stacked layers of it
UNET = {"image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None,
        "context_in_dim": 3 * TE_WIDTH, "hidden_size": 64, "mlp_ratio": 3.0, "num_heads": 2, "depth": 2,
        "depth_single_blocks": 2, "axes_dim": [8, 8, 8, 8], "theta": 2000, "patch_size": 1, "qkv_bias": False,
        "guidance_embed": True, "txt_ids_dims": [3], "global_modulation": True, "mlp_silu_act": True,
        "ops_bias": False, "default_ref_method": "index", "ref_index_scale": 10.0}
# Mistral's special tokens at their tekken ranks (the template's, <s> and <pad>); the rest fillers
SPECIALS = {0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 11: "<pad>", 17: "[SYSTEM_PROMPT]",
            18: "[/SYSTEM_PROMPT]"}
N_SPECIAL = 20
MISTRAL = {"vocab_size": N_SPECIAL + 256, "hidden_size": TE_WIDTH, "intermediate_size": 64, "num_hidden_layers": 30,
           "num_attention_heads": 1, "num_key_value_heads": 1}
TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
                  r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|[\p{N}]| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")

EXPECT = {"detected": "Flux2", "model_class": "Flux2", "stacks": ["double_blocks", "single_blocks"],
          "text_keys": ["attention_mask", "attention_mask__shape", "cross_attn", "cross_attn__shape"],
          "references": True}  # reference images as reference_latents: a second run trains with a control folder


def tekken_json() -> bytes:
    """A byte-level tekken vocabulary (every byte a token, no merges) with Mistral's special tokens, as the bytes
    ComfyUI's Flux.2 text encoder files carry in their `tekken_model` tensor."""
    specials = [SPECIALS.get(i, f"<SPECIAL_{i}>") for i in range(N_SPECIAL)]
    data = {"config": {"pattern": TEKKEN_PATTERN, "default_vocab_size": N_SPECIAL + 256,
                       "default_num_special_tokens": N_SPECIAL},
            "special_tokens": [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(specials)],
            "vocab": [{"rank": i, "token_bytes": base64.b64encode(bytes([i])).decode()} for i in range(256)]}
    return json.dumps(data).encode()


@contextlib.contextmanager
def _tekken_converter_compat(tekken_file: Path):
    """transformers' MistralConverter with the calling convention ComfyUI v0.8.0 uses (vocab=, additional_special_
    tokens=; the converted tokenizer adding <s>, as LlamaTokenizerFast did), over transformers' own converter of the
    same tekken file; restored on exit."""
    import transformers.integrations.mistral as mistral
    from tokenizers import processors

    current = mistral.MistralConverter

    class VocabConverter:
        def __init__(self, vocab=None, additional_special_tokens=None, **kwargs):
            self.inner = current(str(tekken_file))

        def converted(self):
            tok = self.inner.converted()
            bos = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
            tok.post_processor = processors.Sequence([tok.post_processor, bos])
            return tok

    mistral.MistralConverter = VocabConverter
    try:
        yield
    finally:
        mistral.MistralConverter = current


def flux2_clip(patcher, cache: Path):
    """ComfyUI's CLIP as its CLIPLoader builds it for a pruned Mistral-3 Flux.2 text encoder (ClipTarget of
    Flux2Tokenizer and flux2_te(pruned=True), the tekken vocabulary as tokenizer data), small."""
    import comfy.supported_models_base
    import comfy.text_encoders.flux as flux

    target = comfy.supported_models_base.ClipTarget(flux.Flux2Tokenizer, flux.flux2_te(pruned=True))
    raw = tekken_json()
    data = {"tekken_model": torch.frombuffer(bytearray(raw), dtype=torch.uint8)}
    try:
        return small_clip(patcher, {"mistral3_24b": MISTRAL}, clip_target=target, tokenizer_data=data)
    except (TypeError, IndexError):  # transformers >= 5.15 under ComfyUI v0.8.0's tokenizer: see the docstring
        path = cache / "tekken_small.json"
        cache.mkdir(parents=True, exist_ok=True)
        path.write_bytes(raw)
        with _tekken_converter_compat(path):
            return small_clip(patcher, {"mistral3_24b": MISTRAL}, clip_target=target, tokenizer_data=data)


def flux2_vae(cache: Path):
    """ComfyUI's Flux.2 VAE from a random state dict, as VAELoader loads it: 32 latent channels, quant convs, the
    latent batch norm's statistics (ComfyUI then patchifies 2x2: 128 channels at 16x)."""
    import comfy.sd
    import comfy.utils
    from trainer.demo import tiny
    from trainer.fileio import save_safetensors_atomic

    path = cache / "vae_flux2_v1.safetensors"
    if not path.exists():
        shapes = tiny.ldm_vae_shapes([128, 256, 512, 512], 2, 32)
        shapes.update({"quant_conv.weight": (64, 64, 1, 1), "quant_conv.bias": (64,),
                       "post_quant_conv.weight": (32, 32, 1, 1), "post_quant_conv.bias": (32,)})
        sd = tiny.random_weights(shapes, 4, torch.float32)
        g = torch.Generator().manual_seed(9)
        sd["bn.running_mean"] = 0.1 * torch.randn(128, generator=g)
        sd["bn.running_var"] = 1.0 + 0.2 * torch.rand(128, generator=g)
        sd["bn.num_batches_tracked"] = torch.tensor(1000)
        cache.mkdir(parents=True, exist_ok=True)
        save_safetensors_atomic(sd, path)
    with torch.inference_mode():
        return comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))


def build(cache: Path, comfyui: str) -> SmallFamily:
    patcher = small_model("Flux2", UNET)
    clip = flux2_clip(patcher, cache)
    return SmallFamily(patcher, clip, flux2_vae(cache), latent_shape=(1, 128, 4, 4))
