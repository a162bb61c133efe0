"""Captions: reading, trigger words, dropout and token shuffling."""

from __future__ import annotations

import codecs
import random
from pathlib import Path


def read_caption(image: Path, caption_ext: str) -> tuple[str, str | None] | None:
    """The caption of `image` with whitespace collapsed, and the encoding it was read with when that was a guess
    (None: UTF-8 or a byte-order mark said so); None when there is no caption file."""
    ext = caption_ext.lstrip(".")
    p = image.with_suffix(f".{ext}")
    if not p.is_file():
        return None
    text, guessed = decode_text(p.read_bytes())
    return " ".join(text.split()), guessed


def decode_text(data: bytes) -> tuple[str, str | None]:
    """Text by its byte-order mark (UTF-8, UTF-16), else UTF-8; bytes that are neither are read as UTF-16 when
    they look like it (every other byte zero) or as Windows-1252 / Latin-1, and that guess is returned."""
    for bom, enc in ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be")):
        if data.startswith(bom):
            return data[len(bom):].decode(enc, errors="replace"), None
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        pass
    if len(data) >= 4 and data.count(0) * 3 >= len(data):  # UTF-16 without a mark: ASCII text has zero high bytes
        enc = "utf-16-le" if data[1::2].count(0) > data[0::2].count(0) else "utf-16-be"
        return data.decode(enc, errors="replace"), enc
    try:
        return data.decode("cp1252"), "cp1252"
    except UnicodeDecodeError:  # the five bytes cp1252 leaves undefined
        return data.decode("latin-1"), "latin-1"


def apply_trigger(caption: str, trigger: str | None) -> str:
    """`[trigger]` is replaced; a trigger word not in the caption is put in front."""
    if not trigger:
        return caption.replace("[trigger]", "").strip(" ,")
    if "[trigger]" in caption:
        return caption.replace("[trigger]", trigger)
    if trigger in caption:
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def shuffle_tokens(caption: str, keep_tokens: int, rng: random.Random) -> str:
    """Shuffle comma-separated tags, keeping the first `keep_tokens` in place."""
    parts = [p.strip() for p in caption.split(",") if p.strip()]
    head, tail = parts[:keep_tokens], parts[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


def training_caption(caption: str, rng: random.Random, dropout_rate: float, shuffle: bool, keep_tokens: int) -> str:
    """The caption a training step sees: maybe dropped (empty), maybe shuffled."""
    if dropout_rate > 0 and rng.random() < dropout_rate:
        return ""
    if shuffle:
        return shuffle_tokens(caption, keep_tokens, rng)
    return caption
