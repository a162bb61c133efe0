"""What the end-to-end benchmarks share (flux_e2e.py, sdxl_e2e.py, sd3_e2e.py): random weights made on the card,
the job of a variant, `python -m trainer job.yaml` in its own process, the run's own metrics.jsonl read into one
JSON line, and the FLOPs of a step (counted on the meta device) for MFU.

A bench builds its files with `random_state` and the trainer's layout converters and hands `bench_main` its
variants (train / model keys over `job`'s defaults), its file builder (which returns the `model:` config) and a
function that counts a step's FLOPs for a gradient checkpointing fraction; `bench_main` parses the common options,
runs every chosen variant and prints a line each:

    {"variant", "res", "median_s_per_step", "mean_s_per_step", "first_step_s", "first_steps_s", "attention",
     "peak_gib", "wall_s", "device", "torch", "tflop_per_step", "mfu", ...the bench's own fields}

median / mean over the steps after --warmup; peak_gib is the largest peak_mem_gib of metrics.jsonl (on CUDA
torch.cuda.max_memory_allocated since the process started, so the caching phase is included; on the CPU the
process's peak RSS). MFU = tflop_per_step / median s per step / 790 TFLOP/s (step_harness.PEAK_TFLOPS, the bf16
rate the per-family step benches divide by).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
import yaml

PEAK_TFLOPS = 790.0  # as bench/step_harness.py


# a VAE for a TrainingModel on the meta device, which reads only its depth: four levels, latents at 1/8 of the pixels
VAE_8X = SimpleNamespace(config=SimpleNamespace(block_out_channels=[0, 0, 0, 0]))


def build_device() -> torch.device:
    """Where random weights are made: the card when there is one (seconds for billions of values), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def random_state(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, seed: int = 0,
                 device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Random tensors of tiny.random_weights' scales (matrices and kernels normal / sqrt(fan in), 1-D `.weight` /
    `.scale` 1, other vectors 0), drawn in `dtype` on `device` (default: the card) and returned on the CPU, ready
    for the trainer's layout converters and save_safetensors_atomic."""
    device = device or build_device()
    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for k, shape in sorted(shapes.items()):
        if len(shape) >= 2:
            t = torch.randn(shape, generator=g, device=device, dtype=dtype).div_(math.prod(shape[1:]) ** 0.5)
        elif k.endswith((".weight", ".scale")):
            t = torch.ones(shape, device=device, dtype=dtype)
        else:
            t = torch.zeros(shape, device=device, dtype=dtype)
        out[k] = t.cpu()
    return out


def job(name: str, model: dict, folder: Path, steps: int, res: int, extra: dict, device: str = "cuda",
        dtype: str = "bf16") -> dict:
    """The job of one variant: LoRA rank 16 on the family's targets, AdamW, batch 1, cached text embeddings, no
    previews, no saves before the end, gradient checkpointing on; `extra`: train keys over these, and `model` keys
    under "model"."""
    train = {"steps": steps, "lr": 1e-4, "optimizer": "adamw", "dtype": dtype, "gradient_checkpointing": True,
             "cache_text_embeddings": True, "disable_sampling": True}
    extra = dict(extra)
    model = {**model, **extra.pop("model", {})}
    train.update(extra)
    return {"job": "extension", "config": {"name": name, "process": [{
        "training_folder": str(folder / "runs"), "device": device,
        "network": {"type": "lora", "linear": 16, "linear_alpha": 16},
        "save": {"dtype": "bf16", "save_every": 100000},
        "datasets": [{"folder_path": str(folder / "data"), "resolution": [res], "caption_ext": "txt"}],
        "train": train, "model": model}]}}


def ckpt_of(extra: dict) -> float:
    """The gradient checkpointing fraction a variant trains with (job's default: every block)."""
    from trainer.prepare import checkpoint_fraction

    return checkpoint_fraction(extra.get("gradient_checkpointing", True))


def ckpt_arg(text: str) -> float | str:
    """--ckpt: a fraction of blocks, or `auto` (the trainer picks them under the card's free memory)."""
    return "auto" if text == "auto" else float(text)


def auto_fraction(line: str) -> float:
    """The share of blocks checkpointed, from train.gradient_checkpointing auto's report line (for the FLOPs count:
    the blocks it leaves unchecked are spread over depth, the counted fraction too)."""
    m = re.search(r"(\d+) of (\d+) blocks unchecked", line)
    return 1.0 if m is None else 1.0 - int(m.group(1)) / int(m.group(2))


def skip_reason(extra: dict, device: str) -> str | None:
    """Why a variant cannot run on this device (the trainer refuses train.cuda_graphs off CUDA), or None."""
    if extra.get("cuda_graphs") and device != "cuda":
        return f"train.cuda_graphs needs a CUDA device; this run is on {device}"
    return None


def meta_module(cls, cfg: dict, dtype: torch.dtype) -> torch.nn.Module:
    """`cls(**cfg)` on the meta device in `dtype`, frozen: a model to count FLOPs with."""
    with torch.device("meta"):
        m = cls(**cfg)
    return torch.nn.Module.to(m, dtype).requires_grad_(False)  # nn.Module's: diffusers' .to warns about dtypes


def step_flops(model, latent_shape: tuple[int, ...], cond: dict, ckpt: float, rank: int = 16) -> float:
    """FLOPs of one LoRA training step as the loop takes it (the family's predict, the loss, backward; the
    optimizer's few left out), counted by torch's FlopCounterMode with `model` (a TrainingModel) built on the meta
    device: no memory, seconds for a 12B model. `latent_shape` and `cond` (on the CPU) are what the run's cache
    holds for one item.

    The meta device runs attention as the math backend, whose backward is 4 matmuls; on the card flash / memory-
    efficient attention is counted (FlopCounterMode's formula) at 5, the scores recomputed: that matmul is added
    once per attention backward, so the count is the card's (bench/sdxl_step.py's, within its rounding)."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.networks.network import Network

    with torch.device("meta"):
        net = Network(model.targets(), "lora", rank=rank, alpha=float(rank))
    net.attach()
    model.set_gradient_checkpointing(ckpt)
    extra = [0.0]
    sdpa = F.scaled_dot_product_attention

    def counted_sdpa(*args, **kwargs):
        out = sdpa(*args, **kwargs)
        q, k = (*args, None, None)[:2]
        q, k = kwargs.get("query", q), kwargs.get("key", k)  # diffusers' dispatcher passes them by name
        if out.requires_grad:
            recompute = 2.0 * q.numel() * k.shape[-2]  # batch x heads x Lq x Lk x head dim, a multiply-add each
            out.register_hook(lambda grad: extra.__setitem__(0, extra[0] + recompute))
        return out

    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(latent_shape, generator=g)
    sigmas = torch.full((latent_shape[0],), 0.5)
    F.scaled_dot_product_attention = counted_sdpa
    try:
        with FlopCounterMode(display=False) as fc:
            pred = model.predict(noisy, sigmas, cond, guidance=model.train_guidance)
            pred.float().square().mean().backward()
    finally:
        F.scaled_dot_product_attention = sdpa
    return fc.get_total_flops() + extra[0]


def cached_flops(folder: Path, key: str, count: Callable[[], float]) -> float:
    """`count()`, kept in folder/flops.json under `key` (a bench's config, resolution and fraction) so a repeated
    row does not count again."""
    path = folder / "flops.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    if key not in known:
        t0 = time.time()
        known[key] = count()
        print(f"# FLOPs of a step counted in {time.time() - t0:.0f}s ({key})", flush=True)
        path.write_text(json.dumps(known, indent=1))
    return known[key]


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def add_args(ap: argparse.ArgumentParser, work: str, variants: dict, default: list[str] | None = None,
             res: int = 1024, steps: int = 30, warmup: int = 8) -> None:
    """The options every e2e bench takes."""
    ap.add_argument("--work", default=work)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--res", type=int, default=res)
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--variants", nargs="+", default=default or list(variants), choices=list(variants))
    ap.add_argument("--cache", default=None, help="ERIDIFFUSION_CACHE for the runs (compiled kernels, attention"
                    " verdicts); an empty folder measures a first run")
    ap.add_argument("--tiny", action="store_true", help="tiny random files, 3 steps on the CPU (a smoke test)")
    ap.add_argument("--cap-gib", type=float, default=None, help="the runs under this much of the card's memory"
                    " (torch.cuda.set_per_process_memory_fraction before the trainer starts: a 24 GB card's room)")
    ap.add_argument("--ckpt", type=ckpt_arg, default=None, help="train.gradient_checkpointing of every chosen"
                    " variant (the fraction of blocks checkpointed, 0 to 1, or auto), over the variant's own")
    ap.add_argument("--memory-budget", type=float, default=None, help="train.compile_memory_budget of every chosen"
                    " variant (with compile: the share of a compiled block's activations kept for backward)")


def tiny_args(a: argparse.Namespace, res: int = 64) -> None:
    """--tiny: 3 steps on the CPU at a small size, median over the last two, files in their own folder."""
    if a.tiny:
        a.steps, a.warmup, a.res = 3, 1, res
        a.work = str(Path(a.work) / "tiny")


# `python -m trainer job.yaml` with the card's memory capped first, as a 24 GB card would have it
CAPPED_TRAINER = ("import runpy, sys, torch; cap = float(sys.argv.pop(1)) * 2**30;"
                  " torch.cuda.set_per_process_memory_fraction(min(1.0, cap / torch.cuda.get_device_properties(0)"
                  ".total_memory)); sys.argv[0] = 'trainer'; runpy.run_module('trainer', run_name='__main__',"
                  " alter_sys=True)")


def trainer_command(job_path: Path, cap_gib: float | None) -> list[str]:
    """The run's command line: `python -m trainer job.yaml`, under a memory cap of `cap_gib` GiB when given."""
    if cap_gib is None:
        return [sys.executable, "-m", "trainer", str(job_path)]
    return [sys.executable, "-c", CAPPED_TRAINER, str(cap_gib), str(job_path)]


def run_variant(v: str, extra: dict, name: str, folder: Path, model: dict, a: argparse.Namespace, device: str,
                dtype: str, flops: Callable[[float], float] | None, fields: dict | None = None) -> dict:
    """One variant through `python -m trainer`: its job written beside the files, a fresh run folder, the
    run's metrics.jsonl read into the result (or {"variant", "error"} / {"variant", "skipped"})."""
    why = skip_reason(extra, device)
    if why:
        return {"variant": v, "res": a.res, "skipped": why}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job(name, model, folder, a.steps, a.res, extra, device, dtype)))
    env = {**os.environ, **({"ERIDIFFUSION_CACHE": a.cache} if a.cache else {})}
    t0 = time.time()
    shutil.rmtree(folder / "runs" / name, ignore_errors=True)  # a repeated variant starts over, not resumes
    r = subprocess.run(trainer_command(path, a.cap_gib if device == "cuda" else None), capture_output=True,
                       text=True, env=env)
    wall = time.time() - t0
    log = (r.stdout + r.stderr).splitlines()
    # what the run reported of its settings, kept for a failed run too (which plan ran out of memory)
    said = {"device": device_name(), "torch": torch.__version__, **({"cap_gib": a.cap_gib} if a.cap_gib and
                                                                     device == "cuda" else {})}
    if extra.get("cuda_graphs"):
        said["cuda_graphs"] = [ln for ln in log if "train.cuda_graphs" in ln][-1:]
    auto = [ln for ln in log if "gradient_checkpointing auto:" in ln][-1:]
    if auto:
        said["auto_checkpointing"] = auto
    if r.returncode != 0:
        told = [ln.strip() for ln in r.stderr.splitlines() if ln.startswith("error:")][-1:]
        return {"variant": v, "res": a.res, "error": told[0] if told else r.stderr[-2000:], **said}
    m = [json.loads(ln) for ln in (folder / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    steady = [x["s_per_step"] for x in m[a.warmup:]] or [x["s_per_step"] for x in m]
    median = statistics.median(steady)
    out = {"variant": v, "res": a.res, "median_s_per_step": round(median, 4),
           "mean_s_per_step": round(statistics.mean(steady), 4), "first_step_s": round(m[0]["s_per_step"], 2),
           "first_steps_s": [round(x["s_per_step"], 2) for x in m[:4]],
           "attention": [ln for ln in r.stdout.splitlines() if "attention" in ln][-1:],
           "peak_gib": round(max(x["peak_mem_gib"] for x in m), 2), "wall_s": round(wall, 1), **(fields or {}),
           **said}
    if flops is not None:
        f = flops(auto_fraction(auto[0]) if auto else ckpt_of(extra))
        out["tflop_per_step"] = float(f"{f / 1e12:.4g}")
        out["mfu"] = float(f"{f / median / (PEAK_TFLOPS * 1e12):.3g}")
    return out


def bench_main(label: str, variants: dict, build: Callable[[Path, argparse.Namespace], dict],
               count: Callable[[argparse.Namespace, float], float], name: Callable[[argparse.Namespace, str], str],
               default: list[str] | None = None, more_args: Callable[[argparse.ArgumentParser], None] | None = None,
               fields: Callable[[argparse.Namespace], dict] | None = None) -> None:
    """A bench's command line: the common options (and its own, `more_args`), its files (`build(folder, args)`
    returns the `model:` config), then every chosen variant in turn, one JSON line each, the job on the CPU in
    fp32 with --tiny (or without a card), else on the card in bf16. `count(args, fraction)`: the FLOPs of a step
    (kept in flops.json under `label`, --tiny, --res and the fraction); `name(args, variant)`: the run's name."""
    ap = argparse.ArgumentParser()
    add_args(ap, f"/tmp/{label}_e2e", variants, default)
    if more_args is not None:
        more_args(ap)
    a = ap.parse_args()
    tiny_args(a)
    folder = Path(a.work)
    model = build(folder, a)
    device, dtype = ("cpu", "fp32") if a.tiny or not torch.cuda.is_available() else ("cuda", "bf16")

    def flops(ckpt: float) -> float:
        key = f"{label}_{'tiny' if a.tiny else 'full'}_{a.res}_ckpt{ckpt}"
        return cached_flops(folder, key, lambda: count(a, ckpt))

    for v in a.variants:
        extra, run_name = variants[v], name(a, v)
        if a.ckpt is not None:  # its own run folder: a fraction is another job
            tag = a.ckpt if a.ckpt == "auto" else f"{a.ckpt:g}"
            extra, run_name = {**extra, "gradient_checkpointing": a.ckpt}, f"{run_name}_ckpt{tag}"
        if a.memory_budget is not None:
            extra, run_name = {**extra, "compile_memory_budget": a.memory_budget}, f"{run_name}_mb{a.memory_budget:g}"
        out = run_variant(v, extra, run_name, folder, model, a, device, dtype, flops, fields(a) if fields else None)
        if a.ckpt is not None:
            out["gradient_checkpointing"] = a.ckpt
        if a.memory_budget is not None:
            out["compile_memory_budget"] = a.memory_budget
        print(json.dumps(out), flush=True)
