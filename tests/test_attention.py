"""The attention self-test (trainer/attention.py) and the compile cache: the probe's reference and layouts are
right (the default backend passes it on the CPU, a non-finite result fails it), the verdict turns cuDNN on only
when it is correct and faster and the child ended well, the child runs as the trainer starts it, the shapes
Flux declares are the shapes its forward really passes to SDPA, and the compile cache goes to the user's cache
folder unless the user named one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer import attention
from trainer.config import ModelConfig
from trainer.models.flux import load_flux
from trainer.prepare import persistent_compile_cache

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_backend_passes_the_probe_on_cpu(dtype):
    lines = []
    shapes = [(1, 4, 40, 40, 32), (2, 3, 24, 77, 16)]  # self-attention, and cross-attention to 77 text tokens
    attention.probe(shapes, dtype, torch.device("cpu"), backends=("default",), emit=lines.append)
    results = [json.loads(ln) for ln in lines]
    assert [r["shape"] for r in results] == [list(s) for s in shapes]
    tol = attention.TOLERANCE[str(dtype).removeprefix("torch.")]
    assert all(r["ok"] and r["err"] < tol / 2 for r in results), results


def test_a_non_finite_result_fails():
    ref = torch.randn(8)
    bad = ref.clone()
    bad[3] = float("nan")
    assert attention._rel(bad, ref) == float("inf")
    assert attention._rel(ref, ref) == 0.0


def _line(shape, backend, ok, err, s):
    return json.dumps({"shape": shape, "backend": backend, "ok": ok, "err": err, "s": s})


FLUX = [1, 24, 4608, 4608, 128]


def test_verdict_turns_cudnn_on_only_when_correct_and_faster():
    fast = [_line(FLUX, "default", True, 4e-3, 2.0e-3), _line(FLUX, "cudnn", True, 4e-3, 1.5e-3)]
    assert attention.verdict(fast, 0, "")["cudnn"] is True
    slow = [_line(FLUX, "default", True, 4e-3, 2.0e-3), _line(FLUX, "cudnn", True, 4e-3, 1.99e-3)]
    assert attention.verdict(slow, 0, "")["cudnn"] is False  # within MIN_GAIN: not worth a less proven kernel
    wrong = [_line(FLUX, "default", True, 4e-3, 2.0e-3), _line(FLUX, "cudnn", False, "non-finite", None)]
    v = attention.verdict(wrong, 0, "")
    assert v["cudnn"] is False and "wrong" in v["why"]
    # an illegal memory access ends the child: whatever it printed before, cuDNN stays off
    crashed = attention.verdict(fast[:1], 1, "torch.AcceleratorError: CUDA error: an illegal memory access")
    assert crashed["cudnn"] is False and "illegal memory access" in crashed["why"]
    none = [_line(FLUX, "default", True, 4e-3, 2.0e-3), _line(FLUX, "cudnn", None, "unsupported", None)]
    assert attention.verdict(none, 0, "")["cudnn"] is False


def test_the_child_runs_as_the_trainer_starts_it():
    spec = {"shapes": [[1, 2, 16, 16, 8]], "dtype": "float32", "device": "cpu"}
    p = subprocess.run([sys.executable, "-m", "trainer.attention", json.dumps(spec)], capture_output=True, text=True,
                       cwd="/", env={**os.environ, "PYTHONPATH": attention._pythonpath()}, timeout=300)
    assert p.returncode == 0, p.stderr
    v = attention.verdict(p.stdout.splitlines(), p.returncode, p.stderr)
    assert [r["backend"] for r in v["results"]] == ["default"] and v["results"][0]["ok"]
    assert v["cudnn"] is False  # no cuDNN on the CPU


class _RecordSDPA(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q = args[0] if args else kwargs["query"]
            k = args[1] if len(args) > 1 else kwargs["key"]
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            self.calls.append(((q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3]), mask is None))
        return func(*args, **kwargs)


def test_flux_declares_the_shapes_its_forward_attends_at(tiny_flux):
    model = load_flux(ModelConfig(**{k: v for k, v in tiny_flux.items() if k != "arch"}), "cpu", torch.float32)
    sizes = [(64, 32, 1), (48, 48, 1)]
    seen = set()
    for w, h, f in sizes:
        cond = model.encode_text(["a red cat", "a dog"])
        x = torch.randn(2, *model.latent_shape(w, h, f)[1:])
        rec = _RecordSDPA()
        with torch.no_grad(), rec:
            model.predict(x, torch.tensor([0.5, 0.3]), cond)
        assert rec.calls and all(unmasked for _, unmasked in rec.calls)
        seen |= {shape for shape, _ in rec.calls}
    assert sorted(seen) == model.attention_shapes(sizes, 2)


def test_compile_cache_in_the_user_cache_unless_set(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("ERIDIFFUSION_CACHE", str(tmp_path / "c"))
    assert persistent_compile_cache() == str(tmp_path / "c" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert persistent_compile_cache() == str(tmp_path / "mine")


def test_unset_cudnn_attention_is_off_for_an_eager_step_and_the_self_tests_for_a_compiled_one():
    """Eager Flux with cuDNN on went NaN on an H200 though the self-test passed: unset, an eager step keeps it off;
    a compiled step asks the self-test (None); a setting is kept either way."""
    from trainer.prepare import cudnn_setting

    assert cudnn_setting(None, compiled=False) is False
    assert cudnn_setting(None, compiled=True) is None
    assert cudnn_setting(True, compiled=False) is True
    assert cudnn_setting(False, compiled=True) is False
