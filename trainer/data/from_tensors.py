"""A dataset from images already in memory (ComfyUI's IMAGE and MASK batches) with their captions: written once as
a folder the dataset reader takes (PNG images with .txt captions; control images and masks in folders of their own,
under the same names), so in-graph datasets train exactly as folder datasets do, and their latents are cached the
same way.

The folder is named by a hash of the content (pixels, captions, controls, masks): the same inputs write nothing new
and find their cached latents again; changed inputs get another folder. Writing is atomic per file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from ..errors import DatasetError
from ..fileio import write_text_atomic


def split_captions(text: str, n: int) -> list[str]:
    """One caption per line for `n` images; a single line (or none) is every image's caption."""
    lines = [ln.strip() for ln in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) <= 1:
        return [lines[0] if lines else ""] * n
    if len(lines) != n:
        raise DatasetError(f"captions: {len(lines)} lines for {n} images; give one caption per line, or one line for"
                           " all of them")
    return lines


def _as_hwc(images: torch.Tensor, what: str) -> torch.Tensor:
    """(b, h, w, c) in [0, 1] (ComfyUI's IMAGE), c 3 or 4 (alpha dropped); (b, h, w) masks become one channel."""
    if images.dim() == 3:
        images = images[..., None]
    if images.dim() != 4 or images.shape[-1] not in (1, 3, 4):
        raise DatasetError(f"{what}: expected an image batch (b, h, w, 3) or a mask batch (b, h, w), got shape"
                           f" {tuple(images.shape)}")
    return images[..., :3].float().clamp(0, 1)


def _png(path: Path, pixels: torch.Tensor) -> None:
    from PIL import Image

    arr = (pixels.cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr, "L" if arr.shape[-1] == 1 else "RGB")
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)


def write_image_dataset(root: Path, images: torch.Tensor, captions: list[str], controls: torch.Tensor | None = None,
                        masks: torch.Tensor | None = None) -> dict[str, str]:
    """Write the batch under `root/<content hash>/` (once) and return the dataset keys that read it: folder_path, and
    control_path / mask_path when given. Controls and masks pair with the images by index (one for all, or one each)."""
    images = _as_hwc(images, "images")
    n = images.shape[0]
    if len(captions) != n:
        raise DatasetError(f"captions: {len(captions)} captions for {n} images")
    parts = {"": images}
    for name, t in (("control", controls), ("mask", masks)):
        if t is None:
            continue
        t = _as_hwc(t, name)
        if t.shape[0] not in (1, n):
            raise DatasetError(f"{name}: {t.shape[0]} {name} images for {n} images; give one for all, or one each")
        parts[name] = t.expand(n, -1, -1, -1) if t.shape[0] == 1 else t
    h = hashlib.sha1()
    for name, t in parts.items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update((t * 255).round().to(torch.uint8).numpy().tobytes())
    for c in captions:
        h.update(c.encode("utf-8") + b"\0")
    folder = Path(root) / h.hexdigest()[:16]
    out = {"folder_path": str(folder)}
    for name, t in parts.items():
        sub = folder / name if name else folder
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            p = sub / f"{i:05d}.png"
            if not p.exists():
                _png(p, t[i])
        if name:
            out[f"{name}_path"] = str(sub)
    for i, c in enumerate(captions):
        p = folder / f"{i:05d}.txt"
        if not p.exists():
            write_text_atomic(p, c)
    return out
