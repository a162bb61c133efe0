"""Noise levels for training steps, and per-sample loss weights that depend on them."""

from __future__ import annotations

import torch

from ..models.base import time_shift_exponential, time_shift_linear

SIGMA_MIN = 1e-4
FIXED_SHIFT = 3.0


def sample_flow_sigmas(kind: str | None, batch: int, gen: torch.Generator, mu: float | None) -> torch.Tensor:
    """sigma in (0, 1] per sample.

    sigmoid (also when train.timestep_type is unset): sigmoid of a standard normal (logit-normal, dense in the middle);
    linear: uniform; shift: uniform shifted by 3 (toward noise);
    flux_shift: uniform with the family's resolution-dependent shift (falls back to shift 3).
    """
    if kind in (None, "sigmoid"):
        s = torch.sigmoid(torch.randn(batch, generator=gen))
    else:
        s = torch.rand(batch, generator=gen)
        if kind == "shift":
            s = time_shift_linear(FIXED_SHIFT, s)
        elif kind == "flux_shift":
            s = time_shift_exponential(mu, s) if mu is not None else time_shift_linear(FIXED_SHIFT, s)
        elif kind != "linear":
            raise ValueError(kind)
    return s.clamp(SIGMA_MIN, 1.0)


def _bell(s: torch.Tensor) -> torch.Tensor:
    return torch.exp(-((s - 0.5) ** 2) / (2 * 0.25**2))


# mean of the bell over uniform sigma, so that linear_timesteps weights average to 1
_BELL_MEAN = float(_bell(torch.linspace(0, 1, 100001, dtype=torch.float64)).mean())


def linear_timestep_weights(sigmas: torch.Tensor) -> torch.Tensor:
    """`linear_timesteps`: emphasize mid noise levels with a bell curve whose mean over uniform sigma is 1."""
    return _bell(sigmas) / _BELL_MEAN
