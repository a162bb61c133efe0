"""train.compile_memory_budget: a compiled block keeps less for its backward under a lower budget, with the same
gradients; an unset budget is torch's default again (a session's next job does not inherit it); the key is refused
beside gradient_checkpointing auto and said to be ignored without compile. Compiled on the CPU (inductor's C++
backend), as the card compiles its blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import job_dict
from trainer.config import load_job_dict
from trainer.errors import ConfigError
from trainer.prepare import set_memory_budget


class Block(nn.Module):
    """A transformer MLP's shape of work: norm, two projections, pointwise ops between (cheap to recompute)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(64), nn.Linear(64, 256), nn.Linear(256, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(self.norm(x))
        return x + self.down(nn.functional.gelu(h) * torch.sigmoid(h))


def saved_bytes_and_grad(budget: float | None) -> tuple[int, torch.Tensor]:
    set_memory_budget(budget, lambda _m: None)
    torch.manual_seed(0)
    block = Block().requires_grad_(False)
    block.up.weight.requires_grad_(True)  # as a LoRA run: frozen weights, one trained path
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(8, 32, 64)
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = compiled(x)
    y.square().sum().backward()
    return total[0], block.up.weight.grad.clone()


def test_a_lower_budget_keeps_less_for_backward_with_the_same_gradients():
    try:
        full, g_full = saved_bytes_and_grad(None)
        low, g_low = saved_bytes_and_grad(0.1)
    finally:
        set_memory_budget(None, lambda _m: None)
        torch._dynamo.reset()
    weights = sum(p.numel() * p.element_size() for p in Block().parameters())
    assert low < full - weights  # activations, not a weight's worth of rounding
    torch.testing.assert_close(g_low, g_full, rtol=1e-5, atol=1e-5)
    import torch._functorch.config as functorch_config

    assert functorch_config.activation_memory_budget == 1.0  # unset again: torch's default


def test_the_key_beside_auto_checkpointing_and_without_compile(tiny_flux, images, tmp_path):
    with pytest.raises(ConfigError, match=r"train\.compile_memory_budget.*gradient_checkpointing auto"):
        load_job_dict(job_dict(tiny_flux, images, tmp_path, compile=True, compile_memory_budget=0.2,
                               gradient_checkpointing="auto"))
    job = load_job_dict(job_dict(tiny_flux, images, tmp_path, compile_memory_budget=0.2))
    assert any("compile_memory_budget: ignored without train.compile" in w for w in job.warnings)
    with pytest.raises(ConfigError, match=r"train\.compile_memory_budget"):
        load_job_dict(job_dict(tiny_flux, images, tmp_path, compile=True, compile_memory_budget=0))
