"""Captions: reading, trigger words, dropout and token shuffling."""

from __future__ import annotations

import random
from pathlib import Path


def read_caption(image: Path, caption_ext: str) -> str | None:
    ext = caption_ext.lstrip(".")
    p = image.with_suffix(f".{ext}")
    if not p.is_file():
        return None
    return " ".join(p.read_text(encoding="utf-8", errors="replace").split())


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
