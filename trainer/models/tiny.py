"""Small random models in the layouts users keep on disk, for the demo and the tests.

Everything here is built locally from a config and a seed: tokenizers from a word list, text
encoders, a KL VAE in the original (LDM) layout and a Flux transformer in the original (BFL) layout.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from ..fileio import save_safetensors_atomic

WORDS = (
    "a an the of and with on in at by to from photo picture image painting drawing render sketch portrait "
    "red green blue yellow orange purple pink black white gray brown gold silver dark light bright "
    "circle square triangle stripe stripes dot dots shape shapes pattern gradient background center corner "
    "cat dog bird tree house car flower mountain river sky sun moon star city street person man woman face "
    "small large big tiny round sharp soft style detailed simple abstract colorful striped spotted "
    "sks ohwx p3r5on token trigger lora test demo toy sample training one two three four five"
).split()


def build_tokenizer(folder: Path, style: str, words: tuple[str, ...] = tuple(WORDS), model_max_length: int | None = None):
    """A word-level tokenizer saved as a fast tokenizer folder.

    style "clip": <|startoftext|> ... <|endoftext|>, padded with <|endoftext|> (the highest id, as in CLIP);
    style "t5": ... </s>, padded with <pad> = 0.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab_words = list(dict.fromkeys([w.lower() for w in words] + list(string.ascii_lowercase) + list(string.digits)))
    if style == "clip":
        vocab = {"<unk>": 0}
        for w in vocab_words:
            vocab[w] = len(vocab)
        vocab["<|startoftext|>"] = len(vocab)
        vocab["<|endoftext|>"] = len(vocab)
        bos, eos, pad, unk = "<|startoftext|>", "<|endoftext|>", "<|endoftext|>", "<unk>"
        post = TemplateProcessing(single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
        max_len = model_max_length or 77
    elif style == "t5":
        vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
        for w in vocab_words:
            vocab[w] = len(vocab)
        bos, eos, pad, unk = None, "</s>", "<pad>", "<unk>"
        post = TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, 1)])
        max_len = model_max_length or 512
    else:
        raise ValueError(style)
    tok = Tokenizer(WordLevel(vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = post
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk, model_max_length=max_len
    )
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return fast


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_clip_file(path: Path, vocab_size: int, hidden: int = 64, layers: int = 1, seed: int = 1,
                   dtype: torch.dtype = torch.float32) -> None:
    """A CLIP text model with random weights, saved with ComfyUI's `text_model.` keys."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=hidden, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )
    model = CLIPTextModel(cfg)
    # ComfyUI's clip_l files keep the `text_model.` prefix whatever the transformers version
    sd = {
        (k if k.startswith("text_model.") else f"text_model.{k}"): v.to(dtype)
        for k, v in model.state_dict().items()
        if not k.endswith("position_ids")
    }
    save_safetensors_atomic(sd, path)


def make_t5_file(path: Path, vocab_size: int, d_model: int = 64, layers: int = 1, heads: int = 2, d_kv: int = 16,
                 d_ff: int = 128, seed: int = 2, dtype: torch.dtype = torch.float32) -> None:
    """A T5 v1.1-style (gated-gelu) encoder with random weights, saved with ComfyUI's t5xxl keys."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers, num_heads=heads,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
    )
    model = T5EncoderModel(cfg)
    sd = {k: v.to(dtype) for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_safetensors_atomic(sd, path)


def ldm_vae_shapes(widths: list[int], layers: int, latent: int, in_ch: int = 3) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a KL VAE in the original (LDM / BFL ae) layout, without quant convs."""
    s: dict[str, tuple[int, ...]] = {}

    def norm(p: str, c: int) -> None:
        s[f"{p}.weight"] = (c,)
        s[f"{p}.bias"] = (c,)

    def conv(p: str, cin: int, cout: int, k: int = 3) -> None:
        s[f"{p}.weight"] = (cout, cin, k, k)
        s[f"{p}.bias"] = (cout,)

    def resnet(p: str, cin: int, cout: int) -> None:
        norm(f"{p}.norm1", cin)
        conv(f"{p}.conv1", cin, cout)
        norm(f"{p}.norm2", cout)
        conv(f"{p}.conv2", cout, cout)
        if cin != cout:
            conv(f"{p}.nin_shortcut", cin, cout, 1)

    def mid(p: str, c: int) -> None:
        resnet(f"{p}.mid.block_1", c, c)
        norm(f"{p}.mid.attn_1.norm", c)
        for n in ("q", "k", "v", "proj_out"):
            conv(f"{p}.mid.attn_1.{n}", c, c, 1)
        resnet(f"{p}.mid.block_2", c, c)

    levels = len(widths)
    conv("encoder.conv_in", in_ch, widths[0])
    cin = widths[0]
    for i, w in enumerate(widths):
        for j in range(layers):
            resnet(f"encoder.down.{i}.block.{j}", cin, w)
            cin = w
        if i < levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", w, w)
    mid("encoder", widths[-1])
    norm("encoder.norm_out", widths[-1])
    conv("encoder.conv_out", widths[-1], 2 * latent)
    conv("decoder.conv_in", latent, widths[-1])
    mid("decoder", widths[-1])
    cin = widths[-1]
    for i in reversed(range(levels)):
        w = widths[i]
        for j in range(layers + 1):
            resnet(f"decoder.up.{i}.block.{j}", cin, w)
            cin = w
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv", w, w)
    norm("decoder.norm_out", widths[0])
    conv("decoder.conv_out", widths[0], in_ch)
    return s


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Weights with sane scales: 1/sqrt(fan_in) for matrices and kernels, ones for norm scales, zero biases."""
    g = _seeded(seed)
    out = {}
    for k, shape in sorted(shapes.items()):
        if len(shape) >= 2:
            fan_in = 1
            for d in shape[1:]:
                fan_in *= d
            t = torch.randn(shape, generator=g) / fan_in**0.5
        elif k.endswith((".scale",)) or ".norm" in k and k.endswith(".weight"):
            t = torch.ones(shape)
        else:
            t = torch.zeros(shape)
        out[k] = t.to(dtype)
    return out


def make_vae_file(path: Path, widths: list[int], layers: int = 1, latent: int = 16, seed: int = 3,
                  dtype: torch.dtype = torch.float32) -> None:
    save_safetensors_atomic(random_state_dict(ldm_vae_shapes(widths, layers, latent), seed, dtype), path)


def flux_diffusers_config(hidden: int, head_dim: int, double: int, single: int, context_dim: int, pooled_dim: int,
                          guidance: bool, in_channels: int = 64) -> dict:
    from .flux_layout import rope_axes

    return dict(
        patch_size=1, in_channels=in_channels, num_layers=double, num_single_layers=single,
        attention_head_dim=head_dim, num_attention_heads=hidden // head_dim, joint_attention_dim=context_dim,
        pooled_projection_dim=pooled_dim, guidance_embeds=guidance, axes_dims_rope=rope_axes(head_dim),
    )


def make_flux_file(path: Path, cfg: dict, seed: int = 4, dtype: torch.dtype = torch.bfloat16) -> None:
    """A Flux transformer with random weights in the original single-file layout ComfyUI loads."""
    from diffusers import FluxTransformer2DModel

    from .flux_layout import diffusers_to_original

    with torch.device("meta"):
        model = FluxTransformer2DModel(**cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd = random_state_dict(shapes, seed, dtype)
    save_safetensors_atomic(diffusers_to_original(sd, cfg), path)
