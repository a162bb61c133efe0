"""Synthetic video datasets for the demo and the tests: colored shapes moving over a background, with captions
that describe them, written as H.264 .mp4 through PyAV."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from ..data.media import write_video

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
          "purple": (140, 50, 180), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color) -> None:
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)


def moving_shape_frames(size: tuple[int, int], frames: int, fg: str, bg: str, shape: str,
                        rng: random.Random) -> list[Image.Image]:
    """A shape crossing the frame along a straight line."""
    w, h = size
    r = min(w, h) / 5
    x0, y0 = rng.uniform(r, w - r), rng.uniform(r, h - r)
    x1, y1 = rng.uniform(r, w - r), rng.uniform(r, h - r)
    out = []
    for i in range(frames):
        t = i / max(1, frames - 1)
        im = Image.new("RGB", size, COLORS[bg])
        draw_shape(ImageDraw.Draw(im), shape, x0 + (x1 - x0) * t, y0 + (y1 - y0) * t, r, COLORS[fg])
        out.append(im)
    return out


def make_video_dataset(folder: Path, n: int = 4, size: tuple[int, int] = (64, 48), frames: int = 24, fps: float = 16,
                       seed: int = 0) -> Path:
    """`n` captioned clips of a shape moving over a background (`frames` frames at `fps`)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(COLORS)
    for i in range(n):
        fg, bg = rng.sample(names, 2)
        shape = SHAPES[i % len(SHAPES)]
        write_video(folder / f"clip_{i:02d}.mp4", moving_shape_frames(size, frames, fg, bg, shape, rng), fps)
        (folder / f"clip_{i:02d}.txt").write_text(f"a {fg} {shape} moving on a {bg} background")
    return folder
