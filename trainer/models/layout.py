"""Layout tables: how an original (BFL / Stability / ComfyUI) checkpoint's tensors map onto a diffusers module.

A family describes its layout once, as LinearMaps (an original linear = the row-wise concatenation of one or
more diffusers linears: Flux `qkv` = to_q, to_k, to_v) and ParamMaps (a renamed parameter). The same table
loads a single-file checkpoint into the diffusers module, writes one back (demo and test files), and names the
trainable layers by ComfyUI's keys (a fused weight as several members, each computing a slice of its rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ModelFileError
from .base import Target, TargetMember

# where the diffusion model's tensors sit in the single files users keep
ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")


@dataclass(frozen=True)
class LinearMap:
    """Original linear `original` = row-wise concatenation of the diffusers linears `parts`."""

    original: str
    parts: tuple[str, ...]
    block: bool = False  # inside a double/single block: a default LoRA target
    swap_halves: bool = False  # diffusers orders (scale, shift) where the original has (shift, scale)


@dataclass(frozen=True)
class ParamMap:
    original: str
    diffusers: str


def _swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def count_blocks(keys, prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def split_original(sd: dict[str, torch.Tensor], lin: list[LinearMap], par: list[ParamMap],
                   model_shapes: dict[str, tuple[int, ...]], source: str, family: str) -> dict[str, torch.Tensor]:
    """Original-layout tensors -> diffusers names (fused linears split by the diffusers module sizes)."""
    out: dict[str, torch.Tensor] = {}
    try:
        for m in lin:
            for suffix in ("weight", "bias"):
                t = sd.pop(f"{m.original}.{suffix}")
                if m.swap_halves:
                    t = _swap(t)
                sizes = [model_shapes[f"{p}.{suffix}"][0] for p in m.parts]
                for p, piece in zip(m.parts, torch.split(t, sizes, dim=0)):
                    out[f"{p}.{suffix}"] = piece.contiguous()
        for m in par:
            out[m.diffusers] = sd.pop(m.original)
    except KeyError as e:
        raise ModelFileError(f"{source}: not a complete {family} checkpoint (missing {e.args[0]})") from None
    return out


def join_original(sd: dict[str, torch.Tensor], lin: list[LinearMap], par: list[ParamMap]) -> dict[str, torch.Tensor]:
    """Diffusers-named tensors -> the original layout (fused linears concatenated)."""
    out: dict[str, torch.Tensor] = {}
    for m in lin:
        for suffix in ("weight", "bias"):
            t = torch.cat([sd[f"{p}.{suffix}"] for p in m.parts], dim=0)
            out[f"{m.original}.{suffix}"] = _swap(t) if m.swap_halves else t
    for m in par:
        out[m.original] = sd[m.diffusers]
    return out


def block_targets(denoiser: torch.nn.Module, lin: list[LinearMap]) -> list[Target]:
    """Trainable targets named by ComfyUI's keys: every block linear of `lin`, a fused one as several members."""
    modules = dict(denoiser.named_modules())
    out = []
    for m in lin:
        if not m.block:
            continue
        members, row = [], 0
        parts = [modules[p] for p in m.parts]
        for mod in parts:
            members.append(TargetMember(mod, slice(row, row + mod.out_features)))
            row += mod.out_features
        out.append(Target(key=f"diffusion_model.{m.original}", in_features=parts[0].in_features, out_features=row,
                          members=members, aliases=tuple(f"transformer.{p}" for p in m.parts)))
    return out
