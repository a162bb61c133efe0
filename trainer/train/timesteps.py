"""Per-sample loss weights that depend on the noise level (the levels themselves: models/schedules.py)."""

from __future__ import annotations

import torch


def _bell(s: torch.Tensor) -> torch.Tensor:
    return torch.exp(-((s - 0.5) ** 2) / (2 * 0.25**2))


# mean of the bell over uniform sigma, so that linear_timesteps weights average to 1
_BELL_MEAN = float(_bell(torch.linspace(0, 1, 100001, dtype=torch.float64)).mean())


def linear_timestep_weights(sigmas: torch.Tensor) -> torch.Tensor:
    """`linear_timesteps`: emphasize mid noise levels with a bell curve whose mean over uniform sigma is 1."""
    return _bell(sigmas) / _BELL_MEAN
