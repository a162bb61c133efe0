"""Every random choice of a run derives from (train.seed, what it is for, where it is): one place for it."""

from __future__ import annotations

import hashlib
import random

import torch


def derived_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that is a pure function of `seed` and `keys` (stable across processes and platforms)."""
    h = hashlib.sha256(repr((int(seed), *(int(k) for k in keys))).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def step_rng(seed: int, *keys: int) -> random.Random:
    """A Python RNG for the choices of one (seed, keys): batch order, caption dropout, shuffled tags."""
    return random.Random(derived_seed(seed, *keys))


def torch_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU torch generator for (seed, keys); with no keys, seeded with `seed` itself (preview noise)."""
    return torch.Generator().manual_seed(derived_seed(seed, *keys) if keys else int(seed))
