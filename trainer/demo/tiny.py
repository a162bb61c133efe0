"""Small random models in the layouts users keep on disk, for the demo and the tests: the shared pieces.

Everything here is built locally from a config and a seed: tokenizers from a word list, text encoders, a KL
VAE in the original (LDM) layout, and `random_weights`, the one writer of random tensors every family's
demo files use. Family-specific writers sit beside this module (demo/flux.py, demo/sdxl.py ...).
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
    style "t5": ... </s>, padded with <pad> = 0; style "gemma": <bos> ..., padded with <pad> = 0.
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
    elif style == "gemma":  # <bos> first, nothing appended, padded with <pad> = 0
        vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
        for w in vocab_words:
            vocab[w] = len(vocab)
        bos, eos, pad, unk = "<bos>", "<eos>", "<pad>", "<unk>"
        post = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 2)])
        max_len = model_max_length or 8192
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


def clip_state(vocab: int, hidden: int, layers: int, seed: int, bos: int, eos: int, projection: int | None = None,
               act: str = "quick_gelu") -> dict[str, torch.Tensor]:
    """A random CLIP text tower (with a text projection of width `projection`, if given) in ComfyUI's
    clip_l / clip_g key layout (`text_model.` kept whatever the transformers version)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), max_position_embeddings=77, hidden_act=act,
        projection_dim=projection or hidden, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
    )
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)
    return {(k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v
            for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def make_clip_file(path: Path, vocab_size: int, hidden: int = 64, layers: int = 1, seed: int = 1,
                   dtype: torch.dtype = torch.float32) -> None:
    """A CLIP text model (CLIP-L's structure) with random weights, saved with ComfyUI's `text_model.` keys."""
    sd = clip_state(vocab_size, hidden, layers, seed, bos=vocab_size - 2, eos=vocab_size - 1)
    save_safetensors_atomic({k: v.to(dtype) for k, v in sd.items()}, path)


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


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype, bias_std: float = 0.0,
                   norm_std: float = 0.0, std: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Random tensors with sane scales: matrices and kernels 1/sqrt(fan_in), norm scales (1-D `.weight` / `.scale`)
    1 + norm_std noise, other vectors bias_std noise; `std` names tensors drawn as plain noise of that scale.
    Nonzero bias_std / norm_std make a misplaced bias, scale or swap show in the outputs of a test."""
    g = _seeded(seed)
    out = {}
    for k, shape in sorted(shapes.items()):
        if std and k in std:
            t = std[k] * torch.randn(shape, generator=g)
        elif len(shape) >= 2:
            fan_in = 1
            for d in shape[1:]:
                fan_in *= d
            t = torch.randn(shape, generator=g) / fan_in**0.5
        elif k.endswith((".weight", ".scale")):
            t = 1 + norm_std * torch.randn(shape, generator=g) if norm_std else torch.ones(shape)
        else:
            t = bias_std * torch.randn(shape, generator=g) if bias_std else torch.zeros(shape)
        out[k] = t.to(dtype)
    return out


def module_shapes(cls, cfg: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of `cls(**cfg)`, built on the meta device (no memory)."""
    import warnings

    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        model = cls(**cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def make_vae_file(path: Path, widths: list[int], layers: int = 1, latent: int = 16, seed: int = 3,
                  dtype: torch.dtype = torch.float32) -> None:
    save_safetensors_atomic(random_weights(ldm_vae_shapes(widths, layers, latent), seed, dtype), path)


def build_spiece_model(words: tuple[str, ...] = tuple(WORDS), seed: int = 0) -> bytes:
    """A word-level SentencePiece model (pad 0, eos 1, unk 2: UMT5's ids), as the bytes ComfyUI's umt5 files hold
    in their `spiece_model` tensor."""
    import io
    import random

    import sentencepiece as spm

    rng = random.Random(seed)
    vocab = list(dict.fromkeys(w.lower() for w in words))
    sentences = [" ".join(rng.sample(vocab, min(12, len(vocab)))) for _ in range(400)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf, vocab_size=len(vocab) + 4,
                                   model_type="word", hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   minloglevel=2)
    return buf.getvalue()


def make_umt5_file(path: Path, d_model: int = 64, layers: int = 2, heads: int = 2, d_kv: int = 16, d_ff: int = 128,
                   seed: int = 5, dtype: torch.dtype = torch.float32) -> int:
    """A UMT5 encoder with random weights in ComfyUI's umt5_xxl layout, its SentencePiece tokenizer inside (as
    ComfyUI's files carry it). Returns the vocabulary size."""
    import sentencepiece as spm
    from transformers import UMT5Config, UMT5EncoderModel

    spiece = build_spiece_model()
    vocab = spm.SentencePieceProcessor(model_proto=spiece).get_piece_size()
    torch.manual_seed(seed)
    cfg = UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers, num_heads=heads,
                     feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    model = UMT5EncoderModel(cfg)
    sd = {k: v.to(dtype) for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    sd["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    save_safetensors_atomic(sd, path)
    return vocab
