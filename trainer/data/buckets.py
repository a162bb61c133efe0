"""Aspect-ratio buckets: each image goes to the bucket of its resolution closest in aspect, never upscaled."""

from __future__ import annotations

import math

from PIL import Image


def bucket_sizes(resolution: int, factor: int, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """(width, height) pairs, sides multiples of `factor`, area at most resolution², aspect within max_ratio."""
    area = resolution * resolution
    out = set()
    w = factor
    while w <= resolution * max_ratio:
        h = (area // w) // factor * factor
        if h >= factor and max(w / h, h / w) <= max_ratio:
            out.add((w, h))
        w += factor
    return sorted(out)


def bucket_for(width: int, height: int, resolution: int, factor: int) -> tuple[int, int]:
    """The bucket an image of this size trains in at `resolution`.

    The bucket closest in aspect ratio that the image covers without upscaling; an image smaller than
    every such bucket keeps its own size, cropped down to multiples of `factor`.
    """
    ar = math.log(width / height)
    best = None
    for bw, bh in bucket_sizes(resolution, factor):
        if bw > width or bh > height:
            continue  # would need upscaling
        # must cover the bucket after resizing with scale <= 1: scale = max(bw/width, bh/height) <= 1
        score = (abs(math.log(bw / bh) - ar), -(bw * bh))
        if best is None or score < best[0]:
            best = (score, (bw, bh))
    if best is not None:
        return best[1]
    bw, bh = width // factor * factor, height // factor * factor
    if bw < factor or bh < factor:
        return (0, 0)
    return (bw, bh)


def resize_and_crop(img: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to cover (width, height), then center-crop to it."""
    scale = max(width / img.width, height / img.height)
    nw, nh = max(width, round(img.width * scale)), max(height, round(img.height * scale))
    if (nw, nh) != img.size:
        img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - width) // 2, (nh - height) // 2
    return img.crop((left, top, left + width, top + height))
