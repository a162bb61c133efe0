"""Latent and text-embedding caches.

Latents are keyed by image content, bucket, flip and the VAE's fingerprint, so a disk cache written by
one run is reused by the next and never confused with another VAE's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from ..errors import DatasetError
from ..fileio import save_safetensors_atomic
from ..models.base import Conditioning, TrainingModel, split_conditioning
from .dataset import BatchItem, Dataset, Entry, control_dropped, load_control_pixels, load_pixels

log = logging.getLogger("trainer")

CACHE_DIR = "_latent_cache"


class LatentCache:
    """Latents of the training entries, and the latents of their control images where a dataset has them."""

    def __init__(self, datasets: list[Dataset], vae_id: str) -> None:
        self.datasets = datasets
        self.vae_id = vae_id
        self.mem: dict[str, torch.Tensor] = {}
        self.controls: dict[str, torch.Tensor] = {}

    def key(self, ds: Dataset, e: Entry) -> str:
        im = ds.images[e.image]
        ctrl = f"_c{im.control_digest}" if im.control is not None else ""
        return f"{im.digest}{ctrl}_{e.bucket[0]}x{e.bucket[1]}_{int(e.flip)}_{self.vae_id}"

    def check_model(self, model: TrainingModel) -> None:
        """Control images need a family that takes them; say so before anything is encoded."""
        if model.takes_control:
            return
        for ds in self.datasets:
            if ds.cfg.control_path is not None:
                raise DatasetError(
                    f"config.process[0].datasets[{ds.index}].control_path: model.arch {model.arch!r} takes no"
                    " control images (flex2 does); remove control_path or use a family that takes them"
                )

    def _encode(self, ds: Dataset, e: Entry, model: TrainingModel) -> tuple[torch.Tensor, torch.Tensor | None]:
        im = ds.images[e.image]
        lat = model.encode_pixels(load_pixels(im, e.bucket, e.flip)[None])[0].contiguous()
        ctrl = None
        if im.control is not None:
            ctrl = model.encode_pixels(load_control_pixels(im, e.bucket, e.flip)[None])[0].contiguous()
        return lat, ctrl

    def _disk_path(self, ds: Dataset, key: str) -> Path:
        return Path(ds.cfg.folder_path).expanduser() / CACHE_DIR / f"{key}.safetensors"

    def get(self, dataset: int, e: Entry, model: TrainingModel) -> torch.Tensor:
        ds = self.datasets[dataset]
        k = self.key(ds, e)
        if k in self.mem:
            return self.mem[k]
        lat, ctrl = self._encode(ds, e, model)
        if ds.cfg.cache_latents or ds.cfg.cache_latents_to_disk:
            self.mem[k] = lat
            if ctrl is not None:
                self.controls[k] = ctrl
        return lat

    def get_control(self, dataset: int, e: Entry, model: TrainingModel) -> torch.Tensor | None:
        """The control latent of an entry, or None if its dataset has no control images."""
        ds = self.datasets[dataset]
        if ds.images[e.image].control is None:
            return None
        k = self.key(ds, e)
        if k not in self.controls:
            return self._encode(ds, e, model)[1]
        return self.controls[k]

    def controls_for_batch(self, batch: list[BatchItem], model: TrainingModel, seed: int, index: int) -> torch.Tensor | None:
        """Control latents of the `index`-th batch, stacked; None when no item has one.

        An item without control (its dataset has none, or control_dropout chose it) gets zeros: the
        "no control" input of the families that take control latents (Flex.2's reference pipeline).
        """
        ctrls = [self.get_control(it.dataset, it.entry, model) for it in batch]
        if all(c is None for c in ctrls):
            return None
        like = next(c for c in ctrls if c is not None)
        dropped = control_dropped(self.datasets, batch, seed, index)
        return torch.stack([
            torch.zeros_like(like) if c is None or drop else c for c, drop in zip(ctrls, dropped)
        ]).float()

    def prepare(self, model: TrainingModel, progress: Callable[[int, int], None] | None = None) -> None:
        """Fill the cache for every dataset that caches (from disk where present)."""
        self.check_model(model)
        todo: list[tuple[Dataset, Entry, str]] = []
        seen = set()
        for ds in self.datasets:
            if not (ds.cfg.cache_latents or ds.cfg.cache_latents_to_disk):
                continue
            for e in ds.entries:
                k = self.key(ds, e)
                if k in seen:
                    continue
                seen.add(k)
                todo.append((ds, e, k))
        for n, (ds, e, k) in enumerate(todo):
            path = self._disk_path(ds, k)
            wants_control = ds.images[e.image].control is not None
            lat = ctrl = None
            if ds.cfg.cache_latents_to_disk and path.exists():
                try:
                    from safetensors.torch import load_file

                    saved = load_file(str(path))
                    lat, ctrl = saved["latent"], saved["control"] if wants_control else None
                except Exception as err:  # a damaged cache file is rebuilt
                    log.warning("rebuilding damaged latent cache file %s (%s)", path, err)
                    lat = ctrl = None
            if lat is None:
                lat, ctrl = self._encode(ds, e, model)
                if ds.cfg.cache_latents_to_disk:
                    save_safetensors_atomic({"latent": lat, **({"control": ctrl} if ctrl is not None else {})}, path)
            self.mem[k] = lat
            if ctrl is not None:
                self.controls[k] = ctrl
            if progress:
                progress(n + 1, len(todo))


class TextCache:
    """Embeddings of fixed captions, so the text encoders can leave memory."""

    def __init__(self) -> None:
        self.mem: dict[str, Conditioning] = {}

    def prepare(self, model: TrainingModel, captions: list[str], batch_size: int = 8) -> None:
        todo = sorted({c for c in captions if c not in self.mem})
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            for c, cond in zip(chunk, split_conditioning(model.encode_text(chunk))):
                self.mem[c] = cond

    def get(self, caption: str) -> Conditioning:
        return self.mem[caption]


def sample_control_latent(model: TrainingModel, path: str, width: int, height: int, key: str) -> torch.Tensor:
    """The control latent of a preview sample: the image scaled and center-cropped to the sample's size
    (rounded as the sampler rounds it), encoded like the training latents. (1, c, h, w) on the CPU."""
    from ..errors import ConfigError
    from .dataset import image_pixels

    if not model.takes_control:
        raise ConfigError(f"{key}: model.arch {model.arch!r} takes no control image (flex2 does)")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{key}: control image {str(p)!r} does not exist")
    size = model.snap_size(width, height)
    try:
        pixels = image_pixels(p, size)
    except Exception as e:  # PIL raises many kinds for broken files
        raise ConfigError(f"{key}: control image {p} cannot be read ({e})") from None
    with torch.no_grad():
        return model.encode_pixels(pixels[None]).float().cpu()
