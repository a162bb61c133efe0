"""Noise-level schedules shared by the flow families: shifts, Flux's resolution-dependent mu, and the
distributions `train.timestep_type` names."""

from __future__ import annotations

import math

import torch

SIGMA_MIN = 1e-4
FIXED_SHIFT = 3.0
TIMESTEP_TYPES = ("sigmoid", "linear", "shift", "flux_shift")


def time_shift_exponential(mu: float, sigmas: torch.Tensor) -> torch.Tensor:
    """Resolution-dependent shift used by Flux: exp(mu) / (exp(mu) + (1/s - 1))."""
    s = sigmas.clamp(1e-7, 1.0)
    return math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0))


def time_shift_linear(shift: float, sigmas: torch.Tensor) -> torch.Tensor:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def linear_mu(seq_len: int, base_seq: int = 256, max_seq: int = 4096, base_shift: float = 0.5,
              max_shift: float = 1.15) -> float:
    m = (max_shift - base_shift) / (max_seq - base_seq)
    return seq_len * m + (base_shift - m * base_seq)


def sample_flow_sigmas(kind: str | None, batch: int, gen: torch.Generator, mu: float | None,
                       shift: float = FIXED_SHIFT) -> torch.Tensor:
    """sigma in (0, 1] per sample.

    sigmoid (also when train.timestep_type is unset): sigmoid of a standard normal (logit-normal, dense in the
    middle); linear: uniform; shift: uniform shifted by `shift` (toward noise); flux_shift: uniform with the
    family's resolution-dependent shift (`mu`; the fixed shift where the family has none).
    """
    if kind in (None, "sigmoid"):
        s = torch.sigmoid(torch.randn(batch, generator=gen))
    else:
        s = torch.rand(batch, generator=gen)
        if kind == "shift":
            s = time_shift_linear(shift, s)
        elif kind == "flux_shift":
            s = time_shift_exponential(mu, s) if mu is not None else time_shift_linear(shift, s)
        elif kind != "linear":
            raise ValueError(kind)
    return s.clamp(SIGMA_MIN, 1.0)


def flow_sample_sigmas(steps: int, mu: float | None = None, shift: float = 1.0) -> torch.Tensor:
    """Descending sampling sigmas linspace(1, 1/steps), shifted (by `mu` exponentially, else by `shift`), then 0."""
    sig = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    if mu is not None:
        sig = time_shift_exponential(mu, sig)
    elif shift != 1.0:
        sig = time_shift_linear(shift, sig)
    return torch.cat([sig, torch.zeros(1, dtype=sig.dtype)]).float()


def flow_match_euler_sigmas(steps: int, shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps) (SD3, Wan): evenly spaced from 1 to its
    smallest training sigma (shift(1/1000)), shifted, then 0."""
    lowest = time_shift_linear(shift, torch.tensor(1.0 / num_train_timesteps, dtype=torch.float64))
    sig = time_shift_linear(shift, torch.linspace(1.0, float(lowest), steps, dtype=torch.float64))
    return torch.cat([sig, torch.zeros(1, dtype=sig.dtype)]).float()


def comfy_simple_sigmas(steps: int, shift: float, timesteps: int = 1000) -> torch.Tensor:
    """ComfyUI's `simple` scheduler over its discrete flow sigmas (ModelSamplingDiscreteFlow with `shift`): every
    (timesteps / steps)-th entry of the shifted table, from the top, then 0. The sigmas ComfyUI's KSampler uses for
    flow families without a diffusers scheduler of their own (OmniGen2)."""
    table = time_shift_linear(shift, torch.arange(1, timesteps + 1, dtype=torch.float32) / timesteps)
    stride = timesteps / steps
    return torch.tensor([float(table[-(1 + int(i * stride))]) for i in range(steps)] + [0.0])
