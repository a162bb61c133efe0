"""DoRA: LoRA plus a learned magnitude per input channel.

W' = m * (W + dW) / ||W + dW||, the norm taken per input column over all output rows of the (fused)
weight: LyCORIS's `wd_on_out=False`, which ComfyUI applies for a `dora_scale` of shape [1, in]. The
norm is treated as a constant in the backward pass (as the DoRA paper suggests, to save memory).

Applied with hooks: the input is scaled per channel by c = m / ||W + dW|| before the base layer runs,
then the LoRA path sees the same scaled input, so y = (W + dW)(c * x) + b, with no second base matmul.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .lora import LoRAAdapter


class DoRAAdapter(LoRAAdapter):
    type_name = "dora"

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0,
                 base_weight: Callable[[], torch.Tensor] | None = None) -> None:
        super().__init__(in_features, out_features, rank, alpha, dropout)
        if base_weight is None:
            raise ValueError("DoRA needs the base layer's weight")
        self._base_weight = base_weight  # the fused (out, in) weight, read on demand
        with torch.no_grad():
            self.dora_scale = nn.Parameter(base_weight().float().norm(dim=0, keepdim=True))
        self._norm_cache: tuple | None = None

    def _norm(self) -> torch.Tensor:
        key = (self.lora_up._version, self.lora_down._version, self.alpha, self.lora_up.data_ptr())
        if self._norm_cache is None or self._norm_cache[0] != key:
            with torch.no_grad():
                w = self._base_weight().float().to(self.lora_up.device) + self.delta_weight().float()
                self._norm_cache = (key, w.norm(dim=0, keepdim=True))
        return self._norm_cache[1]

    def input_scale(self) -> torch.Tensor:
        """c = m / ||W + dW|| per input channel, differentiable in m."""
        return (self.dora_scale / self._norm()).reshape(-1)

    def export(self) -> dict[str, torch.Tensor]:
        out = super().export()
        out["dora_scale"] = self.dora_scale.detach()
        return out

    def import_(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        self._copy_in(tensors, {"lora_down.weight": self.lora_down, "lora_up.weight": self.lora_up,
                                "dora_scale": self.dora_scale}, where)
        self._norm_cache = None
