"""`model.fp8_matmul`: the fp8 layers of `model.quantize` run their forward and input-gradient matmuls in fp8
(torch._scaled_mm with rowwise scales) instead of on the dequantized weight.

The layer tests run on every device whose torch runs _scaled_mm: the CPU (torch 2.13 has a CPU _scaled_mm that
checks no layout or size rule, so the path's own 16-multiple rule is what decides there) and a CUDA card with fp8
tensor cores (compute capability 8.9+), where the kernels' layout rules are checked too:

    python -m pytest -q -p no:cacheprovider tests/test_fp8_matmul.py        # on an H100 / H200: the cuda cases run

Measured (this file's shapes, seeds fixed): the fp8 forward and input gradient are within 2.7% (relative Frobenius)
of the same layer's dequantized matmul in float32, against 0.3% for the bf16 dequantized path; the bound asserted
is 4%. Against the same quantization emulated in float32 they agree to the bf16 output's rounding (< 0.5%).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import job_dict
from trainer.config import load_job_dict
from trainer.errors import ConfigError
from trainer.job import build_trainer
from trainer.models.quantize import (FP8, FP8_MATMUL_CPU_ENV, FP8_MAX, card_problem, cpu_scaled_mm_runs,
                                     fp8_input_grad, fp8_linear, fp8_matmul_problem, rowwise_fp8, set_fp8_matmul,
                                     store_fp8)


def _cuda_fp8() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not cpu_scaled_mm_runs(), reason="this torch has no CPU _scaled_mm")),
    pytest.param("cuda", marks=pytest.mark.skipif(not _cuda_fp8(), reason="needs a CUDA card with fp8 tensor cores"
                                                  " (compute capability 8.9+: RTX 40xx, H100 / H200)")),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of a against the reference b."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _layer(in_f: int, out_f: int, device: str, seed: int = 0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():  # rows of any scale, as trained weights have
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * torch.logspace(-2, 0.5, out_f)[:, None])
        lin.bias.copy_(torch.randn(out_f, generator=g))
    store_fp8(lin)
    lin.requires_grad_(False)  # the base is frozen
    return lin.to(device)


def _inputs(shape: tuple[int, ...], device: str, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # tokens of different magnitudes: each gets its own scale
    x = torch.randn(shape, generator=g) * torch.logspace(-2, 1, shape[-2])[:, None]
    return x.to(device, dtype)


def _dequantized(lin: nn.Linear) -> torch.Tensor:
    return lin.weight.float() * lin.weight_scale.float()


# --- the quantization pieces, against float32 references -------------------------------------------------------

def test_rowwise_fp8_scale_is_amax_over_448_and_rounds_within_e4m3():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(6, 64, generator=g) * torch.tensor([1e-6, 1e-3, 1.0, 7.0, 300.0, 1.0])[:, None]
    t[5] = 0.0  # a row of zeros
    q, s = rowwise_fp8(t)
    assert q.dtype == FP8 and q.is_contiguous() and s.dtype == torch.float32 and s.shape == (6, 1)
    amax = t.abs().amax(dim=1, keepdim=True)
    assert torch.equal(s[:5], amax[:5] / FP8_MAX)
    assert (q[5].float() == 0).all() and s[5].item() > 0
    # each row's largest value lands on +-448; e4m3 keeps 3 mantissa bits: within 1/16 of itself, or half a
    # subnormal step (2^-10 of the scale) near zero
    assert torch.equal(q.float().abs().amax(dim=1)[:5], torch.full((5,), FP8_MAX))
    back = q.float() * s
    assert ((back - t).abs() <= torch.maximum(t.abs() / 16, s * 2.0 ** -10) * (1 + 1e-6)).all()


def test_rowwise_fp8_leaves_an_fp32_input_untouched():
    t = torch.randn(4, 32) * 1000
    before = t.clone()
    rowwise_fp8(t)
    assert torch.equal(t, before)


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_forward_is_the_rowwise_quantized_product(device):
    """fp8_linear computes exactly: x quantized per row, times the fp8 weight, scaled by both row scales (emulated in
    float32 here), plus the bias; only the bf16 output rounds."""
    lin = _layer(64, 48, device)
    x = _inputs((3, 32, 64), device, torch.bfloat16)
    y = fp8_linear(x, lin.weight, lin.weight_scale, lin.bias)
    xq, xs = rowwise_fp8(x.reshape(-1, 64))
    ref = (xq.float() * xs) @ _dequantized(lin).t() + lin.bias.float()
    assert y.shape == (3, 32, 48) and y.dtype == torch.bfloat16
    assert _rel(y.reshape(-1, 48), ref) < 5e-3


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_input_grad_folds_the_weight_scale_into_the_gradient(device):
    """grad @ (q * scale) = (grad * scale^T) @ q: the weight's per-output-row scale is folded into the gradient,
    which is quantized per row; emulated in float32 the result is the same to the bf16 output's rounding, and it
    is the input gradient of the dequantized weight to fp8's precision."""
    lin = _layer(64, 48, device)
    grad = _inputs((3, 32, 48), device, torch.bfloat16, seed=2)
    gx = fp8_input_grad(grad, lin.weight, lin.weight_scale)
    folded = grad.reshape(-1, 48).float() * lin.weight_scale.float().reshape(1, -1)
    gq, gs = rowwise_fp8(folded)
    emulated = (gq.float() * gs) @ lin.weight.float()
    assert gx.shape == (3, 32, 64) and gx.dtype == torch.bfloat16
    assert _rel(gx.reshape(-1, 64), emulated) < 5e-3
    assert _rel(gx.reshape(-1, 64), grad.reshape(-1, 48).float() @ _dequantized(lin)) < 0.04


# --- the layer: close to the dequantized reference, no weight gradient, only fp8 kept ------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("device", DEVICES)
def test_fp8_matmul_layer_is_close_to_the_dequantized_one(device, dtype):
    lin = _layer(256, 192, device)
    x = _inputs((2, 40, 256), device, dtype).requires_grad_()
    grad = _inputs((2, 40, 192), device, dtype, seed=3)
    w = _dequantized(lin)
    ref_y = x.detach().double() @ w.double().t() + lin.bias.double()
    ref_gx = grad.double() @ w.double()
    lin.fp8_matmul = True
    y = lin(x)
    y.backward(grad)
    assert y.dtype == dtype and x.grad.dtype == dtype
    err_y, err_gx = _rel(y, ref_y), _rel(x.grad, ref_gx)
    # fp8 activations: a few percent off (measured 2.3-2.7%), and not the dequantized path (exact in float32)
    assert 0.01 < err_y < 0.04 and 0.01 < err_gx < 0.04, (err_y, err_gx)
    assert lin.weight.grad is None and lin.bias.grad is None and not lin.weight.requires_grad
    lin.fp8_matmul = False
    x2 = x.detach().clone().requires_grad_()
    lin(x2).backward(grad)
    assert _rel(x2.grad, ref_gx) < (4e-3 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_matmul_keeps_only_the_fp8_weight_for_backward(device):
    lin = _layer(128, 96, device)
    lin.fp8_matmul = True
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    x = _inputs((4, 16, 128), device, torch.bfloat16).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lin(x)
    assert sorted(saved, key=str) == sorted([(FP8, (96, 128)), (torch.float32, (96, 1))], key=str)
    y.sum().backward()
    assert x.grad is not None and lin.weight.grad is None


def _assert_fp8_path_equals_the_dequantized(lin, x: torch.Tensor, grad: torch.Tensor) -> None:
    """The layer's output and input gradient with fp8_matmul on equal those with it off, bit for bit."""
    out = {}
    for on in (False, True):
        lin.fp8_matmul = on
        xi = x.clone().requires_grad_()
        y = lin(xi)
        y.backward(grad)
        out[on] = (y.detach(), xi.grad)
    assert torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])


@pytest.mark.parametrize("in_f,out_f", [(90, 48), (64, 40), (40, 24)])
@pytest.mark.parametrize("device", DEVICES)
def test_shapes_scaled_mm_cannot_take_fall_back_to_the_dequantized_path_exactly(device, in_f, out_f):
    lin = _layer(in_f, out_f, device)
    x = _inputs((2, 7, in_f), device, torch.bfloat16)
    grad = _inputs((2, 7, out_f), device, torch.bfloat16, seed=4)
    _assert_fp8_path_equals_the_dequantized(lin, x, grad)


@pytest.mark.parametrize("lead,in_f,out_f", [((1,), 32, 192), ((1, 8), 32, 96), ((1, 72), 32, 224), ((3, 20), 64, 48)])
@pytest.mark.parametrize("device", DEVICES)
def test_rows_not_a_multiple_of_16_fall_back_to_the_dequantized_path_exactly(device, lead, in_f, out_f):
    """M (the rows: a modulation linear's one vector per sample, 8 text tokens, 64 + 8 tokens) not a multiple of 16:
    the dequantized matmul, bit for bit, forward and input gradient; the tiny Flux job that diverged on the H200
    had all three."""
    lin = _layer(in_f, out_f, device)
    x = _inputs((*lead, in_f), device, torch.bfloat16) if len(lead) > 1 else \
        torch.randn(*lead, in_f, generator=torch.Generator().manual_seed(1)).to(device, torch.bfloat16)
    grad = torch.randn(*lead, out_f, generator=torch.Generator().manual_seed(4)).to(device, torch.bfloat16)
    _assert_fp8_path_equals_the_dequantized(lin, x, grad)
    # a multiple of 16 rows of the same layer does take the fp8 path (not the dequantized numbers)
    x16 = torch.randn(16, in_f, generator=torch.Generator().manual_seed(1)).to(device, torch.bfloat16)
    lin.fp8_matmul = False
    ref = lin(x16)
    lin.fp8_matmul = True
    assert not torch.equal(lin(x16), ref)


def test_rowwise_fp8_stays_finite_on_zero_and_subnormal_rows():
    t = torch.zeros(4, 32)
    t[1, 0] = 1e-40  # float32 subnormal
    t[2, 3] = -float(torch.finfo(torch.float32).tiny)
    t[3] = torch.randn(32).clamp(-3, 3) * 1e38  # near float32's max: the quotient stays within +-448
    q, s = rowwise_fp8(t)
    assert torch.isfinite(q.float()).all() and torch.isfinite(s).all() and (s > 0).all()
    assert (q[0].float() == 0).all()
    assert ((q.float() * s - t).abs() <= t.abs() / 16 + s * 2.0 ** -9).all()
    qb, sb = rowwise_fp8(t.bfloat16())
    assert torch.isfinite(qb.float()).all() and torch.isfinite(sb).all()


@pytest.mark.skipif(not _cuda_fp8(), reason="needs a CUDA card with fp8 tensor cores (compute capability 8.9+)")
def test_fp8_matmul_compiles_on_the_card():
    """train.compile compiles the blocks: the fp8 path inside torch.compile gives the eager path's numbers (Flux's
    widths, a 1024² image's tokens)."""
    lin = _layer(3072, 9216, "cuda")
    lin.fp8_matmul = True
    x = _inputs((1, 4096, 3072), "cuda", torch.bfloat16)
    grad = _inputs((1, 4096, 9216), "cuda", torch.bfloat16, seed=5)
    res = {}
    for name, fn in (("eager", lin), ("compiled", torch.compile(lin, fullgraph=True))):
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.backward(grad)
        res[name] = (y.detach(), xi.grad)
    assert _rel(res["compiled"][0], res["eager"][0]) < 1e-2 and _rel(res["compiled"][1], res["eager"][1]) < 1e-2
    w = _dequantized(lin)
    assert _rel(res["eager"][0], x.float() @ w.t() + lin.bias.float()) < 0.04


# --- the switch and the config ---------------------------------------------------------------------------------

def test_set_fp8_matmul_switches_only_the_quantized_layers():
    block = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 16), nn.Linear(16, 8))
    store_fp8(block[0])
    store_fp8(block[1])
    assert set_fp8_matmul(block) == 2
    assert block[0].fp8_matmul and block[1].fp8_matmul and not hasattr(block[2], "fp8_matmul")
    assert set_fp8_matmul(block, on=False) == 2 and not block[0].fp8_matmul


def test_fp8_matmul_without_quantize_is_a_config_error(tiny_flux, images, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.fp8_matmul: needs model\.quantize: true"):
        load_job_dict(job_dict({**tiny_flux, "fp8_matmul": True}, images, tmp_path / "out"))
    job = load_job_dict(job_dict({**tiny_flux, "quantize": True}, images, tmp_path / "out"))
    assert job.process.model.fp8_matmul is False  # never the default


def test_fp8_matmul_needs_a_card_with_fp8_tensor_cores(tiny_flux, images, tmp_path, monkeypatch):
    monkeypatch.delenv(FP8_MATMUL_CPU_ENV, raising=False)
    job = load_job_dict(job_dict({**tiny_flux, "quantize": True, "fp8_matmul": True}, images, tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"model\.fp8_matmul: needs a CUDA card.*the training device is cpu"):
        build_trainer(job, report=lambda s: None)
    assert "cpu" in fp8_matmul_problem(torch.device("cpu"))
    for name, cap in (("NVIDIA A100-SXM4-80GB", (8, 0)), ("NVIDIA GeForce RTX 3090", (8, 6))):
        why = card_problem(name, cap)
        assert name in why and f"{cap[0]}.{cap[1]}" in why
    for name, cap in (("NVIDIA GeForce RTX 4090", (8, 9)), ("NVIDIA H200", (9, 0)), ("NVIDIA B200", (10, 0))):
        assert card_problem(name, cap) is None


def test_comfyui_model_refuses_fp8_matmul():
    from trainer.models.comfy import ComfyModel
    from trainer.prepare import require_fp8_matmul

    model = ComfyModel.__new__(ComfyModel)  # its class's answer; a real one needs ComfyUI (integration tests)
    with pytest.raises(ConfigError, match=r"model\.fp8_matmul: not on ComfyUI's MODEL"):
        require_fp8_matmul(model)


@pytest.mark.parametrize("device", DEVICES)
def test_job_with_fp8_matmul_switches_the_blocks_and_trains(tiny_flux, images, tmp_path, monkeypatch, device):
    """Through the trainer (the CPU allowed by the test seam; the card as it is): the prepare step switches every
    quantized block linear, a quantize-only job none, and steps train the LoRA through the fp8 input gradients."""
    if device == "cpu":
        monkeypatch.setenv(FP8_MATMUL_CPU_ENV, "1")
    lines = []
    runs = {}
    for on in (False, True):
        d = job_dict({**tiny_flux, "quantize": True, "fp8_matmul": on}, images, tmp_path / f"out{on}", steps=2,
                     dtype="bf16")
        d["config"]["process"][0]["device"] = device
        trainer = build_trainer(load_job_dict(d), report=lines.append)
        linears = [m for b in trainer.model.repeated_blocks() for m in b.modules() if isinstance(m, nn.Linear)]
        assert linears and all(m.weight.dtype == FP8 and m.fp8_matmul is on for m in linears)
        runs[on] = trainer
    assert any(ln.startswith("model.fp8_matmul: ") for ln in lines)
    before = {k: v.detach().clone() for k, v in runs[True].network.state_dict().items()}
    state = runs[True].train()
    after = runs[True].network.state_dict()
    # every LoRA tensor moved: the gradient reached the first block through the later blocks' fp8 input gradients
    assert all(torch.isfinite(after[k]).all() and not torch.equal(after[k], v) for k, v in before.items())
    assert state.step == 2 and runs[True].run.final_path.exists()
    assert all(p.grad is None for p in runs[True].model.denoiser.parameters() if p.dtype == FP8)
