"""Short, stable ids of modules and files: what the latent cache and the resume check key on."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch


def module_fingerprint(module: torch.nn.Module) -> str:
    """A short id of a module's architecture and weights (a few samples of each of a few tensors, in a fixed
    order), the same in every process: no hash of unordered or process-salted data."""
    h = hashlib.sha1(type(module).__name__.encode())
    cfg = getattr(module, "config", None)
    if cfg is not None:
        h.update(json.dumps(_plain(dict(cfg)), sort_keys=True, default=str).encode())
    params = sorted(module.state_dict().items())
    for name, t in params[:: max(1, len(params) // 8)]:
        flat = t.detach().flatten()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(flat[:: max(1, flat.numel() // 64)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _plain(value):
    """Config values with sets and tuples in a fixed order (diffusers keeps some as lists built from sets)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def file_fingerprint(path: str | os.PathLike, samples: int = 16, block: int = 1 << 16) -> str:
    """Size plus a hash of the head, the tail and `samples` blocks spread over a file: seconds for any size, and
    it changes when the file is replaced by another (a different model, a re-download)."""
    p = Path(path)
    if p.is_dir():
        h = hashlib.sha1(b"dir")
        for f in sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in (".safetensors", ".json", ".bin")):
            h.update(str(f.relative_to(p)).encode())
            h.update(file_fingerprint(f, samples=4).encode())
        return h.hexdigest()[:20]
    size = p.stat().st_size
    h = hashlib.sha1(str(size).encode())
    with open(p, "rb") as f:
        for i in range(samples + 1):
            f.seek(0 if i == 0 else max(0, (size - block) * i // samples))
            h.update(f.read(block))
    return h.hexdigest()[:20]
