"""LoRA (and LoCon on conv layers): W' = W + (alpha / rank) * up @ down, beside the base layer.

The base layer is never read or modified, so it may be any module that maps (..., in) -> (..., out):
a plain Linear, ComfyUI's ops layers, or a quantized layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Adapter


class LoRAAdapter(Adapter):
    type_name = "lora"

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0,
                 kernel: tuple[int, int] | None = None, conv: dict | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha, self.dropout = rank, float(alpha), dropout
        self.conv = conv
        k = tuple(kernel) if kernel else ()
        # conv: down is a k x k conv to `rank` channels, up a 1x1 conv (LoCon)
        self.lora_down = nn.Parameter(torch.empty(rank, in_features, *k))
        self.lora_up = nn.Parameter(torch.zeros(out_features, rank, *((1, 1) if k else ())))
        nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout)
        if self.conv is not None:
            h = F.conv2d(x, self.lora_down.to(x.dtype), **self.conv)
            return F.conv2d(h, self.lora_up[rows].to(x.dtype)) * self.scale
        h = F.linear(x, self.lora_down.to(x.dtype))
        return F.linear(h, self.lora_up[rows].to(x.dtype)) * self.scale

    def delta_weight(self) -> torch.Tensor:
        up, down = self.lora_up.flatten(1), self.lora_down.flatten(1)
        return (up @ down).reshape(self.out_features, *self.lora_down.shape[1:]) * self.scale

    def export(self) -> dict[str, torch.Tensor]:
        return {"lora_down.weight": self.lora_down.detach(), "lora_up.weight": self.lora_up.detach(),
                "alpha": torch.tensor(self.alpha)}

    def import_(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        self._copy_in(tensors, {"lora_down.weight": self.lora_down, "lora_up.weight": self.lora_up}, where)
