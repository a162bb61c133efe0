"""Repeated blocks of a denoiser: choosing some over depth, and wrapping their forward (checkpointing)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.utils.checkpoint
from torch import nn


def spread_over_depth(blocks: list[nn.Module], fraction: float) -> list[nn.Module]:
    """round(fraction * n) of the blocks, spread evenly over depth (0: none, 1: all)."""
    n = len(blocks)
    k = max(0, min(n, round(fraction * n))) if fraction > 0 else 0
    return [blocks[round(i * n / k)] for i in range(k)] if k else []


class BlockForwards:
    """Blocks whose forward is wrapped (e.g. checkpointed); `wrap` undoes the previous wrapping first, so the
    setting can change (the session, a second prepare) without stacking wrappers."""

    def __init__(self) -> None:
        self._wrapped: list[nn.Module] = []

    def wrap(self, blocks: list[nn.Module], wrapper: Callable[[Callable], Callable]) -> None:
        self.restore()
        for b in blocks:
            b.forward = wrapper(b.forward)  # an instance attribute shadows the class's forward
            self._wrapped.append(b)

    def restore(self) -> None:
        for b in self._wrapped:
            b.__dict__.pop("forward", None)
        self._wrapped = []

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self._wrapped)


def checkpointed(forward: Callable) -> Callable:
    """`forward` under non-reentrant activation checkpointing while grad is enabled (keyword arguments kept)."""

    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    run.checkpointed = True  # tests and the prepare report read it
    return run


def is_checkpointed(block: nn.Module) -> bool:
    return bool(getattr(block.__dict__.get("forward"), "checkpointed", False))
