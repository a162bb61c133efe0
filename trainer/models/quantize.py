"""Base weights stored in float8 (e4m3) with one scale per output row: `model.quantize: true`.

The block linears of a 12B Flux take 23.8 GB in bf16 and 11.9 GB in fp8, which is what lets it train on a
24 GB card. Each layer dequantizes its weight on the fly (w8 * scale, in the activation dtype) inside one
autograd function that keeps only the fp8 weight for backward, so no full-precision copy of any weight
outlives its own matmul, with or without gradient checkpointing. Adapters see the layer as before: they hook
its output, and read_weight() (DoRA) gets the dequantized weight through `dequantize_weight`.

`model.fp8_matmul: true` (opt-in, on top of model.quantize) switches those layers (`layer.fp8_matmul`) to matmuls
in fp8 with torch._scaled_mm (rowwise scales) instead of the dequantized weight: the activations are quantized per
token, the weight's own per-row scale is the kernel's; see `fp8_linear` and `fp8_input_grad`. Shapes the kernel
cannot take fall back to the dequantized matmul, call by call.
"""

from __future__ import annotations

import os

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
        fn = _Fp8MatmulLinear if layer.fp8_matmul else _Fp8Linear
        return fn.apply(x, layer.weight, layer.weight_scale, layer.bias)

    return forward


def store_fp8(layer: nn.Linear) -> None:
    """Replace the layer's weight by float8 e4m3 values and a float32 scale per output row (amax / 448)."""
    w = layer.weight.detach()
    scale = (w.float().abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
    q = (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    layer.weight = nn.Parameter(q, requires_grad=False)
    layer.register_buffer("weight_scale", scale)
    layer.dequantize_weight = lambda: _dequantize(layer.weight, layer.weight_scale, torch.float32)
    layer.fp8_matmul = False  # model.fp8_matmul: set_fp8_matmul
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


# --- model.fp8_matmul: the fp8 layers' matmuls in fp8 (torch._scaled_mm, rowwise scales) -------------------------

FP8_MATMUL_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell
# a test seam: the CPU's _scaled_mm (torch 2.13 has one) runs the same math, slowly; for the tests and the --tiny
# smoke run of bench/fp8_curve.py only
FP8_MATMUL_CPU_ENV = "ERIDIFFUSION_FP8_MATMUL_ON_CPU"
FP8_MATMUL_ROWS = 16  # the fp8 path needs M (rows, tokens) a multiple of this: see fp8_matmul_takes
_MIN_AMAX = float(torch.finfo(torch.float32).tiny) * FP8_MAX  # the scale amax / 448 stays a normal float32


def rowwise_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D tensor as e4m3 values and a float32 scale per row (amax / 448): t ~= q * scale. Row-major (contiguous),
    as _scaled_mm's first operand must be. A row of zeros gets a tiny scale and stays zeros."""
    # the largest |value| of each row in one pass (no |t| copy); exact in any float dtype
    amax = torch.linalg.vector_norm(t, ord=float("inf"), dim=1, keepdim=True).float()
    # the scale is floored at a normal float32 (amax 0, or subnormal: no 0/0 and no x/denormal overflowing to inf),
    # and the quotient is clamped to +-448 before the cast (e4m3fn has no inf: torch 2.13's CPU cast saturates, but
    # c10's older cast, which other builds and devices may use, turns out-of-range values into NaN)
    scale = amax.clamp_min(_MIN_AMAX) / FP8_MAX
    q = torch.div(t, scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)  # float32 by promotion, without a float32 copy of t
    return q.contiguous(), scale.contiguous()


def fp8_matmul_takes(t: torch.Tensor, k: int, n: int) -> bool:
    """Whether _scaled_mm takes `t` [..., k] times a [k, n] matrix: both dims multiples of 16 (the CUDA kernels'
    rule, kept on every device so that a shape takes the same path everywhere), rows to multiply, a float input.

    The rows (M, the tokens) must be a multiple of 16 too. torch checks nothing on M, but the H200 run
    (torch 2.11+cu130: rowwise goes to cuBLASLt's outer-vector scaling on sm90) diverged in the tiny Flux job, whose
    fp8 layers see M = 1 (the modulation linears' input, one vector per sample), 8 (text tokens) and 72 (the single
    blocks' 64 + 8), while the layer tests that passed there only had M >= 60; the tensor-core tiles are 16+ rows,
    and with M a multiple of 16 no shape outside what was checked on the card takes the kernel. Real jobs lose
    nothing: Flux's image and text token counts (4096, 512, 4608 at 1024^2) are multiples of 16, and the
    modulation matmuls (M = batch) are tiny. bench/fp8_matmul_check.py measures each case on the card."""
    rows = t.numel() // t.shape[-1] if t.dim() and t.shape[-1] else 0
    return (t.shape[-1] == k and k % 16 == 0 and n % 16 == 0 and rows > 0 and rows % FP8_MATMUL_ROWS == 0
            and t.dtype in (torch.bfloat16, torch.float16, torch.float32))


def _weight_scale_row(scale: torch.Tensor, out_f: int) -> torch.Tensor:
    """The weight's per-output-row scale ([out, 1] from store_fp8) as scale_b wants it: float32, (1, out), contiguous."""
    return scale.float().reshape(1, out_f).contiguous()


def fp8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b with W = q * scale ([out, in], e4m3 and a float32 scale per output row), in fp8: x quantized per
    token (row) to e4m3 with its own float32 scale, and W's row scales are the kernel's column scales (scale_b), so
    y[m, o] = xs[m] * ws[o] * sum_i xq[m, i] q[o, i] is one rowwise _scaled_mm. The output is bf16 (what rowwise
    _scaled_mm gives on every CUDA path), cast to x's dtype; the bias is added after, in x's dtype as F.linear adds it."""
    out_f, in_f = q.shape
    if not fp8_matmul_takes(x, in_f, out_f):
        return F.linear(x, _dequantize(q, scale, x.dtype), None if bias is None else bias.to(x.dtype))
    xq, xs = rowwise_fp8(x.reshape(-1, in_f))
    # mat2 [in, out] column-major: the transpose of the row-major q, a view. scale_b: float32 (1, N) contiguous (a
    # weight_scale cast with the model or stored as (N,) would otherwise reach the kernel with another layout)
    y = torch._scaled_mm(xq, q.contiguous().t(), scale_a=xs, scale_b=_weight_scale_row(scale, out_f),
                         out_dtype=torch.bfloat16)
    y = y.to(x.dtype).reshape(*x.shape[:-1], out_f)
    return y if bias is None else y + bias.to(x.dtype)


def fp8_input_grad(grad: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad_x = grad @ W = grad @ (q * scale) = (grad * scale^T) @ q, in fp8. W's scale runs along the contracted
    dim here (its output rows), where _scaled_mm has no scale: it is folded into the gradient first, which is then
    quantized per row. e4m3 for the gradient too, not e5m2: each row (token) gets its own scale, which is the range
    that e5m2's wider exponent buys a per-tensor scale, so e4m3's extra mantissa bit is worth more (torchao's rowwise
    recipe does the same); and every rowwise kernel takes e4m3 as either operand (CUTLASS's takes e5m2 only as the
    first, cuBLASLt's is not checked here with it)."""
    out_f, in_f = q.shape
    if not fp8_matmul_takes(grad, out_f, in_f):
        return grad @ _dequantize(q, scale, grad.dtype)
    gq, gs = rowwise_fp8(torch.mul(grad.reshape(-1, out_f), _weight_scale_row(scale, out_f)))  # float32 by promotion
    # mat2 [out, in] must be column-major: a transposed copy of q on every call (1 byte a parameter, freed after it)
    qc = q.t().contiguous().t()
    ones = torch.ones(1, in_f, dtype=torch.float32, device=q.device)
    y = torch._scaled_mm(gq, qc, scale_a=gs, scale_b=ones, out_dtype=torch.bfloat16)
    return y.to(grad.dtype).reshape(*grad.shape[:-1], in_f)


class _Fp8MatmulLinear(torch.autograd.Function):
    """_Fp8Linear with both matmuls in fp8; it saves the same fp8 weight and its scale, nothing else."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        ctx.save_for_backward(q, scale)
        return fp8_linear(x, q, scale, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, scale = ctx.saved_tensors
        return fp8_input_grad(grad, q, scale), None, None, None


def set_fp8_matmul(module: nn.Module, on: bool = True) -> int:
    """Switch every layer store_fp8 made inside `module` to fp8 matmuls (or back). Returns how many."""
    n = 0
    for m in module.modules():
        if isinstance(m, nn.Linear) and hasattr(m, "fp8_matmul") and m.weight.dtype == FP8:
            m.fp8_matmul = on
            n += 1
    return n


def card_problem(name: str, capability: tuple[int, int]) -> str | None:
    """Why a CUDA card cannot run fp8 matmuls (None: it can)."""
    if tuple(capability) >= FP8_MATMUL_CAPABILITY:
        return None
    return f"{name} (compute capability {capability[0]}.{capability[1]}) has no fp8 tensor cores"


def cpu_scaled_mm_runs() -> bool:
    try:
        a = torch.zeros(16, 16).to(FP8)
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
        return True
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


def fp8_matmul_problem(device: torch.device) -> str | None:
    """Why model.fp8_matmul cannot run on `device` (None: it can): it needs a CUDA card of compute capability 8.9 or
    newer. The CPU only where FP8_MATMUL_CPU_ENV asks for it (tests) and this torch has a CPU _scaled_mm."""
    device = torch.device(device)
    if device.type == "cpu" and os.environ.get(FP8_MATMUL_CPU_ENV) == "1":
        return None if cpu_scaled_mm_runs() else f"this torch ({torch.__version__}) has no _scaled_mm on the CPU"
    if device.type != "cuda":
        return f"the training device is {device}, not a CUDA card"
    if getattr(torch.version, "hip", None):
        return f"{torch.cuda.get_device_name(device)} is a ROCm card (its fp8 is another format; not supported here)"
    return card_problem(torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))
