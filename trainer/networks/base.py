"""What every adapter type provides, and how adapters read a base layer without assuming its type."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn


def read_weight(module: nn.Module) -> torch.Tensor:
    """The base layer's weight as a float tensor, whatever holds it (plain, ComfyUI ops, quantized)."""
    w = getattr(module, "weight", None)
    if w is None:
        raise TypeError(f"{type(module).__name__} has no weight to read")
    # quantized storage (torch quantized tensors, tensor subclasses such as ComfyUI's QuantizedTensor)
    if getattr(w, "is_quantized", False) or type(w) not in (torch.Tensor, nn.Parameter):
        fn = getattr(w, "dequantize", None)
        if callable(fn):
            return fn().float()
    fn = getattr(module, "dequantize_weight", None)
    if callable(fn):
        return fn().float()
    w = w.detach().float()
    scale = getattr(module, "scale_weight", None)  # ComfyUI's scaled-fp8 layers: weight * scale_weight
    if isinstance(scale, torch.Tensor):
        w = w * scale.float().to(w.device)
    return w


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """dim = m * n with m <= n: m = factor when it divides dim, else the most balanced split with m <= factor."""
    if factor > 0 and dim % factor == 0:
        m, n = factor, dim // factor
        return (m, n) if m <= n else (n, m)
    limit = dim if factor <= 0 else factor
    best = (1, dim)
    m = 2
    while m * m <= dim:
        if dim % m == 0 and m <= limit:
            best = (m, dim // m)
        m += 1
    return best


class Adapter(nn.Module, ABC):
    """A trainable update of one (possibly fused) layer.

    `delta(x, rows)` is the update's contribution to output rows `rows` for input x;
    `delta_weight()` the full update of the fused weight; `export()` the tensors under ComfyUI's suffixes.
    """

    type_name = ""
    conv: dict | None = None  # stride/padding/dilation of a conv base layer

    @abstractmethod
    def delta_weight(self) -> torch.Tensor: ...

    def delta(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        w = self.delta_weight()[rows].to(x.dtype)
        if self.conv is not None:
            return F.conv2d(x, w, **self.conv)
        return F.linear(x, w)

    @abstractmethod
    def export(self) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def import_(self, tensors: dict[str, torch.Tensor], where: str) -> None: ...

    def _copy_in(self, tensors: dict[str, torch.Tensor], names: dict[str, nn.Parameter], where: str) -> None:
        for key, param in names.items():
            t = tensors.get(key)
            if t is None:
                raise KeyError(f"{where}: missing {key}")
            if tuple(t.shape) != tuple(param.shape):
                raise ValueError(f"{where}: {key} has shape {tuple(t.shape)}, this network needs {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(t.float())
        if "alpha" in tensors:
            self.alpha = float(tensors["alpha"].float().item())


def conv_params(module: nn.Module) -> dict | None:
    if isinstance(module, nn.Conv2d) or (hasattr(module, "kernel_size") and hasattr(module, "stride")):
        return dict(stride=module.stride, padding=module.padding, dilation=module.dilation)
    return None
