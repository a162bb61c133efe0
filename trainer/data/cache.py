"""Latent and text-embedding caches.

Latents are keyed by image content, bucket, flip and the VAE's fingerprint, so a disk cache written by
one run is reused by the next and never confused with another VAE's.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

import torch

from ..fileio import save_safetensors_atomic
from ..models.base import Conditioning, TrainingModel, split_conditioning
from .dataset import Dataset, Entry, load_pixels

log = logging.getLogger("trainer")

CACHE_DIR = "_latent_cache"


def module_fingerprint(module: torch.nn.Module) -> str:
    """A short id of a module's architecture and weights (samples of a few tensors, not a full hash)."""
    h = hashlib.sha1(type(module).__name__.encode())
    cfg = getattr(module, "config", None)
    if cfg is not None:
        h.update(json.dumps(dict(cfg), sort_keys=True, default=str).encode())
    params = list(module.state_dict().items())
    for name, t in params[:: max(1, len(params) // 8)]:
        flat = t.detach().flatten()
        h.update(name.encode())
        h.update(flat[:: max(1, flat.numel() // 64)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class LatentCache:
    def __init__(self, datasets: list[Dataset], vae_id: str) -> None:
        self.datasets = datasets
        self.vae_id = vae_id
        self.mem: dict[str, torch.Tensor] = {}

    def key(self, ds: Dataset, e: Entry) -> str:
        im = ds.images[e.image]
        return f"{im.digest}_{e.bucket[0]}x{e.bucket[1]}_{int(e.flip)}_{self.vae_id}"

    def _disk_path(self, ds: Dataset, key: str) -> Path:
        return Path(ds.cfg.folder_path).expanduser() / CACHE_DIR / f"{key}.safetensors"

    def get(self, dataset: int, e: Entry, model: TrainingModel) -> torch.Tensor:
        ds = self.datasets[dataset]
        k = self.key(ds, e)
        if k in self.mem:
            return self.mem[k]
        lat = model.encode_pixels(load_pixels(ds.images[e.image], e.bucket, e.flip)[None])[0]
        if ds.cfg.cache_latents or ds.cfg.cache_latents_to_disk:
            self.mem[k] = lat
        return lat

    def prepare(self, model: TrainingModel, progress: Callable[[int, int], None] | None = None) -> None:
        """Fill the cache for every dataset that caches (from disk where present)."""
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
            lat = None
            if ds.cfg.cache_latents_to_disk and path.exists():
                try:
                    from safetensors.torch import load_file

                    lat = load_file(str(path))["latent"]
                except Exception as err:  # a damaged cache file is rebuilt
                    log.warning("rebuilding damaged latent cache file %s (%s)", path, err)
            if lat is None:
                lat = model.encode_pixels(load_pixels(ds.images[e.image], e.bucket, e.flip)[None])[0].contiguous()
                if ds.cfg.cache_latents_to_disk:
                    save_safetensors_atomic({"latent": lat}, path)
            self.mem[k] = lat
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
