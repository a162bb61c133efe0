"""Constants a training step reads (position ids, size ids, schedule tables), made once per device and kept.

A step that builds such a tensor in host memory and copies it to the card pays a host sync every step, and
cannot be replayed from a CUDA graph (train.cuda_graphs): a copy from host memory is not something a graph
captures. Built here on the first call (eagerly, before any capture) and read from the cache after.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable

import torch

_KEPT = 256  # distinct constants kept (bucket shapes x devices); the oldest is dropped beyond
_cache: "OrderedDict[tuple, tuple[object, torch.Tensor]]" = OrderedDict()


def on_device(key: Hashable, make: Callable[[], torch.Tensor], device: torch.device | str,
              dtype: torch.dtype | None = None, anchor: object = None) -> torch.Tensor:
    """`make()` (a tensor built anywhere) on `device` in `dtype`, made once per (key, device, dtype). The result is
    shared: callers never write into it. `anchor`: an object the key names by id(), kept alive with the entry (so
    its id cannot be taken by another object while the entry lasts)."""
    device = torch.device(device)
    k = (key, device, dtype)
    hit = _cache.get(k)
    if hit is None:
        hit = (anchor, make().to(device=device, dtype=dtype))
        _cache[k] = hit
        if len(_cache) > _KEPT:
            _cache.popitem(last=False)
    else:
        _cache.move_to_end(k)
    return hit[1]
