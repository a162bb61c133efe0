"""Per-sample loss weights that depend on the noise level, and the share of the schedule an expert trains (the levels
themselves: models/schedules.py)."""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import UserError


def _bell(s: torch.Tensor) -> torch.Tensor:
    return torch.exp(-((s - 0.5) ** 2) / (2 * 0.25**2))


# mean of the bell over uniform sigma, so that linear_timesteps weights average to 1
_BELL_MEAN = float(_bell(torch.linspace(0, 1, 100001, dtype=torch.float64)).mean())


def linear_timestep_weights(sigmas: torch.Tensor) -> torch.Tensor:
    """`linear_timesteps`: emphasize mid noise levels with a bell curve whose mean over uniform sigma is 1."""
    return _bell(sigmas) / _BELL_MEAN


def expert_window(expert: str | None, boundary: float | None) -> tuple[float, float] | None:
    """The share of the schedule (0: clean, 1: pure noise) a Wan 2.2 expert trains: high_noise at and above the
    boundary, low_noise below it; None: the whole schedule."""
    if expert is None:
        return None
    if boundary is None:
        raise ValueError("an expert needs its boundary")
    return (boundary, 1.0) if expert == "high_noise" else (0.0, boundary)


def in_window(draw: Callable[[int], torch.Tensor], position: Callable[[torch.Tensor], torch.Tensor], batch: int,
              window: tuple[float, float], tries: int = 200) -> torch.Tensor:
    """`batch` noise levels from `draw` (the family's training distribution) kept to those whose schedule position
    lies in `window` [lo, hi) (hi = 1 included): the distribution conditioned on the window, as an expert of Wan 2.2
    sees it. Deterministic for a seeded `draw`."""
    lo, hi = window
    kept: list[torch.Tensor] = []
    have = 0
    for _ in range(tries):
        s = draw(max(8, 4 * batch))
        pos = position(s)
        ok = (pos >= lo) & ((pos < hi) | (hi >= 1.0))
        kept.append(s[ok])
        have += int(ok.sum())
        if have >= batch:
            return torch.cat(kept)[:batch]
    raise UserError(f"the training noise levels almost never fall in [{lo:g}, {hi:g}] of the schedule (model.expert's"
                    " share); widen model.expert_boundary's share or use train.timestep_type: uniform")
