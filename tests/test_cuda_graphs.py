"""train.cuda_graphs: the graphed step trains exactly as the plain step (same LoRA after the same steps, every
bucket shape, gradient accumulation), stops with the reason where a capture fails, and is refused beside the
settings and for the families it cannot work with, the keys named.

The equivalence tests need a CUDA card (graphs do not exist on the CPU): on a machine without one they skip, and
they are run on the device (bench/gpu_tests_h200.log: the last run, without the compiled variants)."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import job_dict, make_images, quiet
from trainer.config import load_job_dict
from trainer.errors import ConfigError
from trainer.job import build_trainer
from trainer.train.cuda_graphs import GraphedMicroStep, signature

# read when cuBLAS starts, so before any test of this module touches the card (deterministic matmuls need it)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA card (run on the"
                                " device: python -m pytest tests/test_cuda_graphs.py)")


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> dict:
    from sdxl_helpers import write_tiny_sdxl

    return write_tiny_sdxl(tmp_path_factory.mktemp("sdxl"))


@pytest.mark.parametrize("key, value, named", [
    ("blocks_to_swap", 1, "train.blocks_to_swap"),
    ("offload_activations", True, "train.offload_activations"),
    ("train_text_encoder", True, "train.train_text_encoder"),  # sdxl trains its text encoders
])
def test_refused_beside_what_it_cannot_work_with(tiny_sdxl, images, tmp_path, key, value, named):
    d = job_dict(tiny_sdxl, images, tmp_path, cuda_graphs=True, **{key: value})
    with pytest.raises(ConfigError) as e:
        build_trainer(load_job_dict(d), report=quiet)
    assert "train.cuda_graphs" in str(e.value) and named in str(e.value)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("*.safetensors"))


def test_refused_without_a_cuda_device(tiny_flux, images, tmp_path):
    d = job_dict(tiny_flux, images, tmp_path, cuda_graphs=True)  # device: cpu
    with pytest.raises(ConfigError, match=r"train\.cuda_graphs: CUDA graphs need a CUDA device; this run is on cpu"):
        build_trainer(load_job_dict(d), report=quiet)


def test_signature_tells_shapes_apart_and_refuses_what_a_graph_cannot_hold():
    a = (torch.zeros(1, 4, 8, 8), {"t5": torch.zeros(1, 7, 32), "mask": None}, 1, 2)
    same = (torch.ones(1, 4, 8, 8), {"mask": None, "t5": torch.ones(1, 7, 32)}, 1, 2)
    assert signature(a) == signature(same)
    assert signature(a) != signature((torch.zeros(1, 4, 8, 12), a[1], 1, 2))  # another bucket
    assert signature(a) != signature((a[0], a[1], 2, 2))  # another item count: a Python value baked into the graph
    assert signature(a) != signature((a[0].half(), a[1], 1, 2))
    assert signature((torch.zeros(2, requires_grad=True),)) is None  # a trained encoder's output
    assert signature((object(),)) is None


# --- on a CUDA card -----------------------------------------------------------------------------------------------

@pytest.fixture()
def deterministic():
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
              torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled())
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # the fused attention backwards are not deterministic
        yield
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[1:4]
    torch.use_deterministic_algorithms(before[4])


def _train(d: dict, steps: int) -> tuple[dict[str, torch.Tensor], list[float], object]:
    d["config"]["process"][0]["train"]["steps"] = steps
    trainer = build_trainer(load_job_dict(d), report=quiet)
    state = trainer.train()
    weights = {k: v.detach().float().cpu().clone() for k, v in trainer.network.state_dict().items()}
    return weights, state.losses, trainer.graphs


def _cuda_job(model: dict, data, out, **train) -> dict:
    d = job_dict(model, data, out, disable_sampling=True, **train)
    p = d["config"]["process"][0]
    p["device"] = "cuda"
    p["datasets"][0]["resolution"] = [32, 48]  # two bucket shapes: two graphs
    p["save"]["save_every"] = 1000
    return d


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@needs_cuda
@pytest.mark.parametrize("family", ["flux", "sdxl"])
@pytest.mark.parametrize("accumulation, compile_", [(1, False), (2, False), (1, True)])
def test_graphed_step_trains_as_the_plain_step(family, accumulation, compile_, tiny_flux, tiny_sdxl, tmp_path,
                                               deterministic):
    """Two bucket shapes, 10 steps: every shape warms up, is captured and replayed; the LoRA after the run and every
    step's loss equal the plain step's within 1e-5 (fp32, TF32 off, deterministic kernels and math attention: without
    them two plain runs of the UNet differed by ~1e-4 already on an H200)."""
    model = tiny_flux if family == "flux" else tiny_sdxl
    data = make_images(tmp_path / "data", n=4, size=(64, 64))
    extra = {"gradient_accumulation": accumulation, "compile": compile_}
    plain, plain_losses, _ = _train(_cuda_job(model, data, tmp_path / "plain", **extra), 10)
    again, _, _ = _train(_cuda_job(model, data, tmp_path / "again", **extra), 10)
    graphed, graphed_losses, graphs = _train(_cuda_job(model, data, tmp_path / "graph", cuda_graphs=True, **extra), 10)
    assert len(graphs.graphs) == 2 and graphs.replays > 0 and not graphs.eager, graphs.summary()
    assert plain.keys() == graphed.keys()
    # within 1e-5, or within twice what two plain runs differ by where a kernel is not deterministic even so
    # (compiled UNet kernels)
    noise = max(_rel(again[k], plain[k]) for k in plain)
    worst = max(_rel(graphed[k], plain[k]) for k in plain)
    assert worst < max(1e-5, 2 * noise), (worst, noise)
    for a, b in zip(graphed_losses, plain_losses):
        assert a == pytest.approx(b, rel=1e-5)
    # the LoRA moved: equal because both trained, not because neither did
    start, _, _ = _train(_cuda_job(model, data, tmp_path / "start"), 1)
    assert max(_rel(graphed[k], start[k]) for k in start if "up" in k or "lora_B" in k) > 1e-3


@needs_cuda
def test_a_parameter_a_graph_does_not_reach_keeps_no_gradient(deterministic):
    """Two graphs, one reaching both layers and one only the first: after a replay of the second, the other layer's
    gradient is None as without graphs (AdamW would move a zero gradient by its momentum), and micro-batches of one
    step accumulate across graphs and eager steps as the plain steps do."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    a, b = torch.nn.Linear(16, 16).to(dev), torch.nn.Linear(16, 16).to(dev)
    params = [*a.parameters(), *b.parameters()]

    def micro_step(inputs):
        x, both = inputs
        y = a(x)
        if both:
            y = b(y)
        loss = (y ** 2).mean()
        loss.backward()
        return loss.detach()

    def plain(calls):
        for p in params:
            p.grad = None
        for c in calls:
            micro_step(c)
        return [None if p.grad is None else p.grad.clone() for p in params]

    x = torch.randn(4, 16, device=dev)
    graphed = GraphedMicroStep(micro_step, dev, params)
    for _ in range(3):  # two eager warm-ups, then the capture, for each of the two signatures
        for both in (True, False):
            for p in params:
                p.grad = None
            graphed((x, both))
    assert len(graphed.graphs) == 2 and graphed.replays == 2
    for calls in ([(x, False)], [(x, True)], [(x, False), (x, True)], [(x, True), (x, False), (x * 2, False)]):
        want = plain(calls)
        for p in params:
            p.grad = None
        for c in calls:
            graphed(c)
        got = [p.grad for p in params]
        for w, g in zip(want, got):
            assert (w is None) == (g is None), calls
            if w is not None:
                torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
    assert graphed.replays > 2


CANNOT_CAPTURE = """
import torch
from trainer.train.cuda_graphs import CaptureFailed, GraphedMicroStep
dev = torch.device("cuda")
layer = torch.nn.Linear(16, 16).to(dev)
def micro_step(inputs):
    x, = inputs
    loss = (layer(x) ** 2).mean()
    if loss.item() >= 0:  # a host read, as some model code does
        loss.backward()
    return loss.detach()
step = GraphedMicroStep(micro_step, dev, list(layer.parameters()))
x = torch.randn(4, 16, device=dev)
losses = [float(step((x,))) for _ in range(2)]  # the two eager warm-ups train
try:
    step((x,))
except CaptureFailed as e:
    print("REFUSED", e)
"""


@needs_cuda
def test_a_step_that_cannot_be_captured_stops_with_the_reason():
    """A step that reads a value on the host (`.item()`) cannot be captured: CaptureFailed names the shape and the
    cause (the loop saves and stops on it). In its own process: a failed capture leaves the CUDA generator in its
    capture state, which is why the run cannot go on."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", CANNOT_CAPTURE], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("REFUSED")]
    assert line and "the step at 4x16 could not be captured in a CUDA graph" in line[0], r.stdout
    assert "capturing" in line[0]  # the first cause (the host read), not the capture's own end


def test_refused_for_a_family_whose_step_reads_the_host(tmp_path):
    from trainer.train.cuda_graphs import check_config

    for arch in ("chroma", "sana", "omnigen2", "hunyuan_video", "hidream"):
        d = job_dict({"arch": arch, "name_or_path": str(tmp_path / "m.safetensors")}, tmp_path, tmp_path,
                     cuda_graphs=True)
        with pytest.raises(ConfigError, match=rf"train\.cuda_graphs: not for model\.arch '{arch}': its step"):
            check_config(load_job_dict(d), torch.device("cuda"))
