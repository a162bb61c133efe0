"""Where `model.fp8_matmul` goes wrong on a card: the fp8 layer per shape, and the tiny Flux job that diverged.

(a) For each (M, K, N) the fp8 layer's forward and input gradient on random bf16 inputs against the dequantized
    weight in float64, in two modes: "guarded" (trainer/models/quantize.py as it is: shapes it does not take fall
    back to the dequantized matmul) and "raw" (the row rule lifted, FP8_MATMUL_ROWS = 1: every shape whose K and N
    are multiples of 16 goes to torch._scaled_mm, as before the fix). Each call runs twice with the allocator's
    cache filled with NaN in between, so an output the kernel leaves unwritten shows as NaN or as a mismatch.
(b) The tiny Flux job of tests/test_fp8_matmul.py::test_job_with_fp8_matmul_switches_the_blocks_and_trains (hidden 32,
    1 double + 1 single block, bf16, LoRA r4, lr 1e-3, 32x32 images), 3 steps with fp8_matmul on, in both modes:
    every fp8 matmul call is recorded (layer, forward/backward, shape, path, finite, error against the dequantized
    matmul), plus forward hooks on the layers (their output with the adapters) and gradient hooks on the LoRA;
    the first non-finite value is named.

One JSON line per case / step / run on stdout.

    python3 bench/fp8_matmul_check.py                                   # on a CUDA card (8.9+)
    ERIDIFFUSION_FP8_MATMUL_ON_CPU=1 python3 bench/fp8_matmul_check.py  # CPU (torch 2.13's _scaled_mm; big shapes skipped)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from trainer.models import quantize  # noqa: E402
from trainer.models.quantize import FP8, FP8_MATMUL_CPU_ENV, fp8_matmul_problem, store_fp8  # noqa: E402

MS = (1, 8, 64, 72, 4096)
KN = ((32, 32), (32, 96), (64, 32), (3072, 9216))
CPU_MAX_MACS = 2 ** 31  # on the CPU a (4096, 3072, 9216) matmul in float64 takes minutes: skipped there


def emit(**rec) -> None:
    print(json.dumps(rec), flush=True)


@contextlib.contextmanager
def raw_mode(on: bool):
    """on: the row rule lifted (FP8_MATMUL_ROWS = 1), i.e. the fp8 path as it was before the fix."""
    old = quantize.FP8_MATMUL_ROWS
    quantize.FP8_MATMUL_ROWS = 1 if on else old
    try:
        yield
    finally:
        quantize.FP8_MATMUL_ROWS = old


def stats(t: torch.Tensor) -> dict:
    t = t.detach()
    fin = torch.isfinite(t)
    f = t[fin].float()
    return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "nonfinite": int((~fin).sum()),
            "nan": int(torch.isnan(t).sum()), "amax": float(f.abs().max()) if f.numel() else None,
            "mean_abs": float(f.abs().mean()) if f.numel() else None}


def errors(a: torch.Tensor, ref: torch.Tensor) -> dict:
    a, ref = a.detach().double(), ref.detach().double()
    fin = torch.isfinite(a)
    if not fin.all():
        return {"max_abs": None, "rel": None, "max_rel_to_amax": None}
    d = (a - ref).abs()
    return {"max_abs": float(d.max()), "rel": float((a - ref).norm() / ref.norm().clamp_min(1e-300)),
            "max_rel_to_amax": float(d.max() / ref.abs().max().clamp_min(1e-300))}


def poison_cache(device: torch.device) -> None:
    """Fill freed allocator blocks with NaN: an output buffer the kernel does not write then reads as NaN."""
    if device.type != "cuda":
        return
    junk = [torch.full((n,), float("nan"), device=device, dtype=torch.bfloat16) for n in (1 << 10, 1 << 16, 1 << 22)]
    del junk


def make_layer(k: int, n: int, device: torch.device, seed: int = 0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * torch.logspace(-2, 0.5, n)[:, None] / k ** 0.5)
        lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
    store_fp8(lin)
    lin.requires_grad_(False)
    lin.fp8_matmul = True
    return lin.to(device)


def layer_case(m: int, k: int, n: int, device: torch.device, raw: bool) -> dict:
    lin = make_layer(k, n, device)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-2, 1, m)[:, None]).to(device, torch.bfloat16)
    grad = torch.randn(m, n, generator=g).to(device, torch.bfloat16)
    w = lin.weight.double() * lin.weight_scale.double()
    ref_y = x.double() @ w.t() + lin.bias.double()
    ref_gx = grad.double() @ w
    rec = {"part": "a", "mode": "raw" if raw else "guarded", "M": m, "K": k, "N": n}
    with raw_mode(raw):
        rec["path_fwd"] = "fp8" if quantize.fp8_matmul_takes(x, k, n) else "fallback"
        rec["path_bwd"] = "fp8" if quantize.fp8_matmul_takes(grad, n, k) else "fallback"
        runs = []
        try:
            for _ in range(2):
                poison_cache(device)
                xi = x.clone().requires_grad_()
                y = lin(xi)
                y.backward(grad)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                runs.append((y.detach(), xi.grad.detach()))
        except Exception as e:  # a kernel that refuses the shape: what it said
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            return rec
    (y, gx), (y2, gx2) = runs
    rec["y"] = {**errors(y, ref_y), "nonfinite": int((~torch.isfinite(y)).sum())}
    rec["grad_x"] = {**errors(gx, ref_gx), "nonfinite": int((~torch.isfinite(gx)).sum())}
    rec["repeat_equal"] = bool(torch.equal(y, y2) and torch.equal(gx, gx2))
    rec["ok"] = (rec["y"]["nonfinite"] == 0 and rec["grad_x"]["nonfinite"] == 0 and rec["repeat_equal"]
                 and rec["y"]["rel"] < 0.06 and rec["grad_x"]["rel"] < 0.06)
    return rec


def part_a(device: torch.device) -> None:
    for k, n in KN:
        for m in MS:
            if device.type == "cpu" and m * k * n > CPU_MAX_MACS:
                emit(part="a", M=m, K=k, N=n, skipped="too big for the CPU")
                continue
            for raw in (False, True):
                emit(**layer_case(m, k, n, device, raw))


# --- (b) the tiny Flux job --------------------------------------------------------------------------------------

class Recorder:
    """Every fp8 matmul call (forward: fp8_linear, backward: fp8_input_grad) with its layer's name, found by the fp8
    weight's storage; the first call whose output is non-finite (and whether its input already was)."""

    def __init__(self, names: dict[int, str]):
        self.names = names
        self.step = 0
        self.calls: list[dict] = []
        self.first_bad: dict | None = None
        self.first_bad_hook: dict | None = None
        self.first_bad_grad: dict | None = None

    def _record(self, op: str, inp: torch.Tensor, out: torch.Tensor, q, scale, k: int, n: int, ref_fn) -> None:
        name = self.names.get(q.data_ptr(), "?")
        path = "fp8" if quantize.fp8_matmul_takes(inp, k, n) else "fallback"
        si, so = stats(inp), stats(out)
        rec = {"step": self.step + 1, "layer": name, "op": op, "path": path, "in": si, "out": so}
        if so["nonfinite"] == 0:
            with torch.no_grad():
                rec["rel_err_vs_dequantized"] = errors(out, ref_fn())["rel"]
        self.calls.append(rec)
        if self.first_bad is None and so["nonfinite"]:
            self.first_bad = {**rec, "input_was_finite": si["nonfinite"] == 0}

    def install(self):
        orig_lin, orig_grad = quantize.fp8_linear, quantize.fp8_input_grad
        rec = self

        def fp8_linear(x, q, scale, bias):
            y = orig_lin(x, q, scale, bias)
            w = lambda: x.double() @ (q.double() * scale.double()).t() + (0 if bias is None else bias.double())  # noqa: E731
            rec._record("forward", x, y, q, scale, q.shape[1], q.shape[0], w)
            return y

        def fp8_input_grad(grad, q, scale):
            gx = orig_grad(grad, q, scale)
            w = lambda: grad.double() @ (q.double() * scale.double())  # noqa: E731
            rec._record("backward", grad, gx, q, scale, q.shape[0], q.shape[1], w)
            return gx

        quantize.fp8_linear, quantize.fp8_input_grad = fp8_linear, fp8_input_grad
        return lambda: (setattr(quantize, "fp8_linear", orig_lin), setattr(quantize, "fp8_input_grad", orig_grad))


def part_b(device: torch.device, raw: bool, steps: int = 3) -> None:
    from helpers import job_dict, make_images, write_tiny_flux
    from trainer.config import load_job_dict
    from trainer.errors import TrainingDiverged
    from trainer.job import build_trainer

    mode = "raw" if raw else "guarded"
    with tempfile.TemporaryDirectory() as tmp, raw_mode(raw):
        tmp = Path(tmp)
        model = write_tiny_flux(tmp / "tiny_flux")
        images = make_images(tmp / "data")
        d = job_dict({**model, "quantize": True, "fp8_matmul": True}, images, tmp / "out", steps=steps, dtype="bf16")
        d["config"]["process"][0]["device"] = str(device)
        trainer = build_trainer(load_job_dict(d), report=lambda s: None)
        layers = {n: m for n, m in trainer.model.denoiser.named_modules()
                  if isinstance(m, nn.Linear) and getattr(m, "fp8_matmul", False) and m.weight.dtype == FP8}
        rec = Recorder({m.weight.data_ptr(): n for n, m in layers.items()})
        uninstall = rec.install()
        handles = []

        def fwd_hook(name):
            def hook(mod, args, out):
                if rec.first_bad_hook is None and isinstance(out, torch.Tensor) and not torch.isfinite(out).all():
                    rec.first_bad_hook = {"step": rec.step + 1, "layer": name, "in": stats(args[0]), "out": stats(out)}
            return hook

        for name, m in layers.items():
            handles.append(m.register_forward_hook(fwd_hook(name)))
        net = dict(trainer.network.named_parameters())

        def grad_hook(name):
            def hook(g):
                if rec.first_bad_grad is None and not torch.isfinite(g).all():
                    rec.first_bad_grad = {"step": rec.step + 1, "param": name, "grad": stats(g)}
            return hook

        for name, p in net.items():
            if p.requires_grad:
                handles.append(p.register_hook(grad_hook(name)))

        losses: list[float] = []

        def on_step(step, loss):
            losses.append(loss)
            sd = trainer.network.state_dict()
            bad = [k for k, v in sd.items() if not torch.isfinite(v).all()]
            calls = [c for c in rec.calls if c["step"] == step]
            emit(part="b", mode=mode, step=step, loss=loss, loss_finite=bool(torch.isfinite(torch.tensor(loss))),
                 lora_finite=not bad, lora_nonfinite=bad[:5],
                 fp8_calls=sum(c["path"] == "fp8" for c in calls), fallback_calls=sum(c["path"] == "fallback" for c in calls),
                 max_rel_err=max((c.get("rel_err_vs_dequantized") or 0.0) for c in calls) if calls else None)
            rec.step = step

        error = None
        t0 = time.perf_counter()
        try:
            trainer.train(on_step=on_step)
        except TrainingDiverged as e:
            error = f"TrainingDiverged: {e}"
        finally:
            uninstall()
            for h in handles:
                h.remove()
        shapes = sorted({(c["layer"], c["op"], tuple(c["in"]["shape"]), c["path"]) for c in rec.calls})
        emit(part="b", mode=mode, summary=True, device=str(device), steps_done=len(losses), losses=losses,
             losses_finite=all(map(lambda v: v == v and abs(v) != float("inf"), losses)), error=error,
             first_nonfinite_fp8_call=rec.first_bad, first_nonfinite_layer_output=rec.first_bad_hook,
             first_nonfinite_lora_grad=rec.first_bad_grad, seconds=round(time.perf_counter() - t0, 2),
             calls_per_shape=[{"layer": s[0], "op": s[1], "in_shape": list(s[2]), "path": s[3]} for s in shapes])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("a", "b", "all"), default="all")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem = fp8_matmul_problem(device)
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
            "name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "capability": list(torch.cuda.get_device_capability()) if device.type == "cuda" else None,
            "fp8_matmul_problem": problem}
    emit(part="env", **info)
    if problem:
        sys.exit(f"fp8_matmul cannot run here: {problem} (CPU: set {FP8_MATMUL_CPU_ENV}=1)")
    t0 = time.perf_counter()
    if a.part in ("a", "all"):
        part_a(device)
    if a.part in ("b", "all"):
        for raw in (False, True):
            try:
                part_b(device, raw)
            except Exception:
                emit(part="b", mode="raw" if raw else "guarded", crashed=traceback.format_exc()[-2000:])
    emit(part="done", seconds=round(time.perf_counter() - t0, 1))


if __name__ == "__main__":
    main()
