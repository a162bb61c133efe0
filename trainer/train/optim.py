"""Optimizers and learning-rate schedules by config name."""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError

KEY = "config.process[0].train"


def _adamw_default_kernel(params: list[torch.nn.Parameter] | list[dict], extra: dict) -> dict:
    """`fused=True` where every parameter is a floating tensor on the card (one kernel for all the LoRA tensors
    instead of foreach's few per chunk of them: 10% of the eager Flux 512² step, bench/flux_step_h200_levers.log);
    torch's default (foreach) elsewhere. `optimizer_params` naming `fused` or `foreach` overrides it."""
    if "fused" in extra or "foreach" in extra:
        return {}
    flat = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    on_card = bool(flat) and all(p.is_cuda and p.is_floating_point() for p in flat)
    return {"fused": True} if on_card else {}


def build_optimizer(name: str, params: list[torch.nn.Parameter] | list[dict], lr: float, extra: dict,
                    device: torch.device) -> torch.optim.Optimizer:
    """`params`: parameters, or param groups (dicts with `params` and their own `lr`)."""
    try:
        if name == "adamw":
            return torch.optim.AdamW(params, lr=lr, **_adamw_default_kernel(params, extra), **extra)
        if name == "adamw8bit":
            if device.type != "cuda":
                raise ConfigError(f"{KEY}.optimizer: adamw8bit needs a CUDA device (bitsandbytes); use adamw on {device.type}")
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise ConfigError(f"{KEY}.optimizer: adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
            return bnb.optim.AdamW8bit(params, lr=lr, **extra)
        if name == "prodigy":
            try:
                from prodigyopt import Prodigy
            except ImportError:
                raise ConfigError(f"{KEY}.optimizer: prodigy needs prodigyopt: pip install prodigyopt") from None
            return Prodigy(params, lr=lr, **extra)
        if name == "adafactor":
            from transformers.optimization import Adafactor

            opts = dict(relative_step=False, scale_parameter=False, warmup_init=False)
            opts.update(extra)
            return Adafactor(params, lr=lr, **opts)
    except TypeError as e:
        raise ConfigError(f"{KEY}.optimizer_params: not accepted by {name} ({e})") from None
    raise ConfigError(f"{KEY}.optimizer: unknown optimizer {name!r}")


def lr_factor(kind: str, step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    p = min(1.0, max(0.0, (step - warmup) / span))
    if kind == "linear":
        return min_ratio + (1 - min_ratio) * (1 - p)
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    raise ValueError(kind)


def build_scheduler(opt: torch.optim.Optimizer, kind: str, total: int, warmup: int, params: dict) -> torch.optim.lr_scheduler.LambdaLR:
    unknown = set(params) - {"min_lr_ratio"}
    if unknown:
        raise ConfigError(f"{KEY}.lr_scheduler_params: unknown keys {sorted(unknown)} (known: min_lr_ratio)")
    ratio = float(params.get("min_lr_ratio", 0.0))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(kind, s, total, warmup, ratio))
