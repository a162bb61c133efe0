"""LoKr: W' = W + scale * kron(w1, w2), w2 low-rank (w2_a @ w2_b) unless full rank.

Shapes follow LyCORIS: out = out_l * out_k, in = in_m * in_n (factorization by `lokr_factor`),
w1 is (out_l, in_m), w2 is (out_k, in_n). scale = alpha / rank with a low-rank w2, 1 with a full w2
(as LyCORIS trains it and ComfyUI applies it).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Adapter, factorization


class LoKrAdapter(Adapter):
    type_name = "lokr"

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0,
                 kernel: tuple[int, int] | None = None, conv: dict | None = None, factor: int = -1,
                 full_rank: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha = rank, float(alpha)
        self.conv = conv
        self.kernel = tuple(kernel) if kernel else ()
        kk = self.kernel[0] * self.kernel[1] if self.kernel else 1
        in_m, in_n = factorization(in_features, factor)
        out_l, out_k = factorization(out_features, factor)
        self.lokr_w1 = nn.Parameter(torch.empty(out_l, in_m))
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        self.full = full_rank or rank >= max(out_k, in_n) / 2
        if self.full:
            self.lokr_w2 = nn.Parameter(torch.zeros(out_k, in_n * kk))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(out_k, rank))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, in_n * kk))

    def _names(self) -> tuple[str, ...]:
        return ("lokr_w1", "lokr_w2") if self.full else ("lokr_w1", "lokr_w2_a", "lokr_w2_b")

    @property
    def scale(self) -> float:
        return 1.0 if self.full else self.alpha / self.rank

    def delta_weight(self) -> torch.Tensor:
        w2 = self.lokr_w2 if self.full else self.lokr_w2_a @ self.lokr_w2_b
        if self.kernel:
            w2 = w2.reshape(w2.shape[0], -1, *self.kernel)
            w = torch.kron(self.lokr_w1[:, :, None, None], w2)
        else:
            w = torch.kron(self.lokr_w1, w2)
        return w * self.scale

    def export(self) -> dict[str, torch.Tensor]:
        out = {n: getattr(self, n).detach() for n in self._names()}
        if self.kernel:
            key = "lokr_w2" if self.full else None
            if key:
                out[key] = out[key].reshape(out[key].shape[0], -1, *self.kernel)
        if not self.full:
            out["alpha"] = torch.tensor(self.alpha)
        return out

    def import_(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        tensors = dict(tensors)
        if self.full and self.kernel and "lokr_w2" in tensors:
            tensors["lokr_w2"] = tensors["lokr_w2"].flatten(1)
        if self.full != ("lokr_w2" in tensors):
            raise ValueError(f"{where}: the file's LoKr is {'full' if 'lokr_w2' in tensors else 'low'}-rank, this network's is not")
        self._copy_in(tensors, {n: getattr(self, n) for n in self._names()}, where)
