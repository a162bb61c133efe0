"""Base weights stored in float8 (e4m3) with one scale per output row: `model.quantize: true`.

The block linears of a 12B Flux take 23.8 GB in bf16 and 11.9 GB in fp8, which is what lets it train on a
24 GB card. Each layer dequantizes its weight on the fly (w8 * scale, in the activation dtype) inside one
autograd function that keeps only the fp8 weight for backward, so no full-precision copy of any weight
outlives its own matmul, with or without gradient checkpointing. Adapters see the layer as before: they hook
its output, and read_weight() (DoRA) gets the dequantized weight through `dequantize_weight`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


def _dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return q.to(dtype) * scale.to(dtype)


class _Fp8Linear(torch.autograd.Function):
    """y = x W^T + b with W = q * scale; the base is frozen, so only x gets a gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        ctx.save_for_backward(q, scale)
        return F.linear(x, _dequantize(q, scale, x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, scale = ctx.saved_tensors
        return grad @ _dequantize(q, scale, grad.dtype), None, None, None


def _fp8_forward(layer: nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return _Fp8Linear.apply(x, layer.weight, layer.weight_scale, layer.bias)

    return forward


def store_fp8(layer: nn.Linear) -> None:
    """Replace the layer's weight by float8 e4m3 values and a float32 scale per output row (amax / 448)."""
    w = layer.weight.detach()
    scale = (w.float().abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
    q = (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    layer.weight = nn.Parameter(q, requires_grad=False)
    layer.register_buffer("weight_scale", scale)
    layer.dequantize_weight = lambda: _dequantize(layer.weight, layer.weight_scale, torch.float32)
    layer.forward = _fp8_forward(layer)


def quantize_blocks(blocks: list[nn.Module]) -> tuple[int, int]:
    """Store every nn.Linear inside `blocks` in fp8. Returns (layers, bytes saved)."""
    n = saved = 0
    for block in blocks:
        for m in block.modules():
            if isinstance(m, nn.Linear) and m.weight.dtype != FP8:
                before = m.weight.numel() * m.weight.element_size()
                store_fp8(m)
                saved += before - m.weight.numel() - m.weight_scale.numel() * 4
                n += 1
    return n, saved
