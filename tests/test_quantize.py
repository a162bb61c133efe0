"""`model.quantize`: block linears stored in float8 e4m3 (one scale per output row), dequantized per matmul."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import job_dict
from trainer.config import ModelConfig, load_job_dict
from trainer.job import build_trainer
from trainer.models.flux import load_flux
from trainer.models.quantize import FP8, quantize_blocks, store_fp8
from trainer.networks.base import read_weight
from trainer.networks.network import Network


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_fp8_linear_forward_and_input_gradient():
    g = torch.Generator().manual_seed(0)
    ref = nn.Linear(64, 48)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(48, 64, generator=g) * torch.linspace(0.01, 3, 48)[:, None])  # rows of any scale
    q = nn.Linear(64, 48)
    q.load_state_dict(ref.state_dict())
    store_fp8(q)
    assert q.weight.dtype == FP8 and q.weight_scale.shape == (48, 1)
    # e4m3 keeps 3 mantissa bits: each weight within 1/16 of itself, row scales exact
    assert _rel(read_weight(q), ref.weight.detach()) < 0.07
    assert ((read_weight(q) - ref.weight).abs() <= ref.weight.abs() / 16 + 1e-6).all()
    x = torch.randn(5, 64, generator=g, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    w = torch.randn(5, 48, generator=g)
    (q(x) * w).sum().backward()
    # against the same computation in full precision on the dequantized weight
    deq = nn.Linear(64, 48)
    deq.load_state_dict({"weight": read_weight(q), "bias": ref.bias.detach()})
    (deq(x2) * w).sum().backward()
    assert _rel(q(x.detach()), deq(x2.detach())) < 1e-6
    assert _rel(x.grad, x2.grad) < 1e-6
    assert q.weight.grad is None


def test_quantized_flux_trains_a_lora(tiny_flux):
    model = load_flux(ModelConfig(**{k: v for k, v in tiny_flux.items() if k != "arch"}), "cpu", torch.float32)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 8, 8, generator=g)
    cond = {"t5": torch.randn(1, 8, model.denoiser.config.joint_attention_dim, generator=g),
            "pooled": torch.randn(1, model.denoiser.config.pooled_projection_dim, generator=g)}
    sig = torch.tensor([0.5])
    with torch.no_grad():
        full = model.predict(latents, sig, cond, guidance=3.5)
    bytes_before = sum(p.numel() * p.element_size() for p in model.denoiser.parameters())
    n, saved = quantize_blocks(model.repeated_blocks())
    bytes_after = sum(p.numel() * p.element_size() for p in model.denoiser.parameters())
    assert n > 0 and bytes_before - bytes_after > 0.5 * saved > 0
    with torch.no_grad():
        quant = model.predict(latents, sig, cond, guidance=3.5)
    assert _rel(quant, full) < 0.1  # fp8 weights: close, not equal
    model.denoiser.requires_grad_(False)  # as make_network does: only the network trains
    net = Network(model.targets(), "dora", rank=4, alpha=4.0)  # DoRA reads the (dequantized) weights
    net.attach()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    target = torch.randn(latents.shape, generator=g)
    losses = []
    for _ in range(5):
        loss = ((model.predict(latents, sig, cond, guidance=3.5) - target) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert all(p.grad is None for p in model.denoiser.parameters())


def test_job_with_quantize_stores_fp8(tiny_flux, images, tmp_path):
    job = load_job_dict(job_dict({**tiny_flux, "quantize": True}, images, tmp_path / "out", steps=1))
    trainer = build_trainer(job, report=lambda s: None)
    linears = [m for b in trainer.model.repeated_blocks() for m in b.modules() if isinstance(m, nn.Linear)]
    assert linears and all(m.weight.dtype == FP8 for m in linears)
    state = trainer.train()
    assert state.step == 1 and trainer.run.final_path.exists()


@pytest.mark.parametrize("bad", ["int4"])
def test_unknown_quantize_value_is_a_config_error(tiny_flux, images, tmp_path, bad):
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="quantize"):
        load_job_dict(job_dict({**tiny_flux, "quantize": bad}, images, tmp_path / "out"))
