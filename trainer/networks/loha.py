"""LoHa: W' = W + (alpha / rank) * (w1_a @ w1_b) * (w2_a @ w2_b), a Hadamard product of two low-rank pairs."""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter


class LoHaAdapter(Adapter):
    type_name = "loha"

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0,
                 kernel: tuple[int, int] | None = None, conv: dict | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha = rank, float(alpha)
        self.conv = conv
        self.kernel = tuple(kernel) if kernel else ()
        cols = in_features * (self.kernel[0] * self.kernel[1] if self.kernel else 1)
        self.hada_w1_a = nn.Parameter(torch.randn(out_features, rank) * 0.1)
        self.hada_w1_b = nn.Parameter(torch.randn(rank, cols))
        self.hada_w2_a = nn.Parameter(torch.zeros(out_features, rank))  # zero: training starts at W
        self.hada_w2_b = nn.Parameter(torch.randn(rank, cols))

    def delta_weight(self) -> torch.Tensor:
        w = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * (self.alpha / self.rank)
        return w.reshape(self.out_features, self.in_features, *self.kernel)

    def export(self) -> dict[str, torch.Tensor]:
        out = {n: getattr(self, n).detach() for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
        out["alpha"] = torch.tensor(self.alpha)
        return out

    def import_(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        names = {n: getattr(self, n) for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
        self._copy_in(tensors, names, where)
