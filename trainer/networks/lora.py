"""LoRA: W' = W + (alpha / rank) * up @ down, applied as an extra path beside the base layer.

The base layer is never read or modified, so it may be any module that maps (..., in) -> (..., out):
a plain Linear, ComfyUI's ops layers, or a quantized layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRAAdapter(nn.Module):
    type_name = "lora"

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank = rank
        self.alpha = float(alpha)
        self.dropout = dropout
        self.lora_down = nn.Parameter(torch.empty(rank, in_features))
        self.lora_up = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """The adapter's contribution to output rows `rows` of the adapted layer."""
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout)
        h = F.linear(x, self.lora_down.to(x.dtype))
        return F.linear(h, self.lora_up[rows].to(x.dtype)) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_up @ self.lora_down) * self.scale

    def export(self) -> dict[str, torch.Tensor]:
        """Tensors under ComfyUI's suffixes for this type."""
        return {
            "lora_down.weight": self.lora_down.detach(),
            "lora_up.weight": self.lora_up.detach(),
            "alpha": torch.tensor(self.alpha),
        }

    def import_(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        down, up = tensors.get("lora_down.weight"), tensors.get("lora_up.weight")
        if down is None or up is None:
            raise KeyError(f"{where}: missing lora_down/lora_up")
        if tuple(down.shape) != tuple(self.lora_down.shape) or tuple(up.shape) != tuple(self.lora_up.shape):
            raise ValueError(
                f"{where}: shapes {tuple(down.shape)}/{tuple(up.shape)} do not match rank {self.rank}"
                f" over {self.in_features}->{self.out_features}"
            )
        with torch.no_grad():
            self.lora_down.copy_(down.float())
            self.lora_up.copy_(up.float())
            if "alpha" in tensors:
                self.alpha = float(tensors["alpha"].float().item())
