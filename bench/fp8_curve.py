"""Loss curves of the bf16 base, fp8 storage (`model.quantize`) and fp8 storage + fp8 matmuls (`model.fp8_matmul`),
through `python -m trainer`: three runs of the same job on a fixed batch (a dataset of one image, the same seed, so both
draw the same noise and timesteps at every step), full-size random FLUX.1-dev files as bench/flux_e2e.py writes
them. Prints one JSON line per run (its loss curve from metrics.jsonl, the mean loss over windows of --window
steps, median s/step after --warmup steps, peak GiB) and a summary line per pair (fp8mm and fp8 against bf16,
fp8mm against fp8: the largest relative difference between their window means; s/step and peaks side by side).

    python3 bench/fp8_curve.py --work /tmp/e2e --steps 200 --res 512 [--compile] [--ckpt 0]
    python3 bench/fp8_curve.py ... --runs fp8mm --previous bench/fp8_curve_h200_partial.jsonl   # the others read back
    python3 bench/fp8_curve.py --work /tmp/fp8_tiny --tiny       # CPU smoke test: a tiny Flux, a few steps
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "bench"), str(REPO)]  # this checkout's trainer, here and in the runs (PYTHONPATH below)
from e2e_run import job  # noqa: E402
from flux_e2e import build_files  # noqa: E402

RUNS = {"bf16": {}, "fp8": {"quantize": True}, "fp8mm": {"quantize": True, "fp8_matmul": True}}
# (run, reference): the criterion is fp8mm within 1% of bf16; fp8 against bf16 is the storage's own part
PAIRS = [("fp8mm", "bf16"), ("fp8", "bf16"), ("fp8mm", "fp8")]


def build_tiny(folder: Path) -> dict:
    """A tiny Flux (widths multiples of 16, so every block linear takes the fp8 path) with tiny encoders and VAE."""
    from trainer.demo import flux as demo_flux
    from trainer.demo import tiny

    folder.mkdir(parents=True, exist_ok=True)
    flux = folder / "flux_tiny.safetensors"
    if not flux.exists():
        ct = tiny.build_tokenizer(folder / "tok_clip", "clip")
        tt = tiny.build_tokenizer(folder / "tok_t5", "t5")
        tiny.make_clip_file(folder / "clip_l.safetensors", len(ct), hidden=64)
        tiny.make_t5_file(folder / "t5.safetensors", len(tt), d_model=64)
        tiny.make_vae_file(folder / "ae.safetensors", [32, 32])
        cfg = demo_flux.flux_diffusers_config(hidden=64, head_dim=16, double=2, single=2, context_dim=64,
                                              pooled_dim=64, guidance=True)
        demo_flux.make_flux_file(flux, cfg, dtype=torch.bfloat16)
    return {"arch": "flux", "name_or_path": str(flux),
            "text_encoder_paths": [str(folder / "clip_l.safetensors"), str(folder / "t5.safetensors")],
            "vae_path": str(folder / "ae.safetensors"),
            "tokenizer_paths": [str(folder / "tok_clip"), str(folder / "tok_t5")], "t5_max_length": 16}


def window_means(losses: list[float], window: int) -> list[float]:
    return [statistics.mean(losses[i:i + window]) for i in range(0, len(losses) - window + 1, window)]


def previous_runs(path: Path | None, wanted: set[str], **same) -> dict[str, dict]:
    """The records of `wanted` runs from an earlier call's output, each checked to be of the same job settings
    (none without `path`: the pairs of runs not made are left out)."""
    if not wanted or path is None:
        return {}
    found = {}
    for ln in path.read_text().splitlines():
        rec = json.loads(ln) if ln.startswith("{") else {}
        if rec.get("run") in wanted and "losses" in rec:
            got = {"res": rec["res"], "steps": rec["steps"], "compile": rec["compile"],
                   "ckpt": rec["gradient_checkpointing"]}
            if got != same:
                raise SystemExit(f"{path}: run {rec['run']} was made with {got}, not {same}")
            found[rec["run"]] = rec
    if missing := wanted - set(found):
        raise SystemExit(f"{path} holds no run {sorted(missing)}")
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/fp8_curve")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--ckpt", type=float, default=1.0, help="train.gradient_checkpointing of the runs (0: none, the"
                    " fastest where memory allows)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: a tiny Flux at 32 px, 10 steps, windows"
                    " of 5 (the CPU's _scaled_mm, allowed by the trainer's test seam)")
    ap.add_argument("--cache", default=None, help="ERIDIFFUSION_CACHE for the runs")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), help="the runs to make now")
    ap.add_argument("--previous", type=Path, default=None, help="JSON lines of an earlier call of this script: the"
                    " runs not made now are read from it (the same --res, --steps, --compile and --ckpt)")
    a = ap.parse_args()
    folder = Path(a.work)
    env = {**os.environ, **({"ERIDIFFUSION_CACHE": a.cache} if a.cache else {}),
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if a.tiny:
        from trainer.models.quantize import FP8_MATMUL_CPU_ENV

        env[FP8_MATMUL_CPU_ENV] = "1"
        steps, res, window, warmup = min(a.steps, 10), 32, min(a.window, 5), min(a.warmup, 2)
        model = build_tiny(folder)
    else:
        steps, res, window, warmup = a.steps, a.res, a.window, a.warmup
        model = build_files(folder)
    from trainer.demo import make_dataset

    data = folder / f"one_image_{res}"
    if not data.exists():
        make_dataset(data, n=1, size=(res, res))
    out = previous_runs(a.previous, set(RUNS) - set(a.runs), res=res, steps=steps, compile=a.compile, ckpt=a.ckpt)
    for run in a.runs:
        model_keys = RUNS[run]
        name = f"fp8curve_{run}_{res}{'_compile' if a.compile else ''}_ckpt{a.ckpt:g}{'_tiny' if a.tiny else ''}"
        d = job(name, model, folder, steps, res, {"compile": a.compile, "seed": 42, "model": model_keys,
                                                  "gradient_checkpointing": a.ckpt})
        proc = d["config"]["process"][0]
        proc["datasets"][0]["folder_path"] = str(data)
        if a.tiny:
            proc["device"] = "cpu"
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(d))
        shutil.rmtree(folder / "runs" / name, ignore_errors=True)  # start over, not resume
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "trainer", str(path)], capture_output=True, text=True, env=env)
        wall = time.time() - t0
        if r.returncode != 0:
            print(json.dumps({"run": run, "error": (r.stdout + r.stderr)[-3000:]}), flush=True)
            sys.exit(1)
        m = [json.loads(ln) for ln in (folder / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        losses = [x["loss"] for x in m]
        rec = {"run": run, "model": model_keys, "res": res, "steps": len(m), "compile": a.compile,
               "gradient_checkpointing": a.ckpt, "losses": [round(v, 6) for v in losses], "window": window,
               "window_means": [round(v, 6) for v in window_means(losses, window)],
               "median_s_per_step": round(statistics.median(x["s_per_step"] for x in m[warmup:] or m), 4),
               "peak_gib": round(max(x["peak_mem_gib"] for x in m), 2), "wall_s": round(wall, 1),
               "report": [ln for ln in r.stdout.splitlines() if "model.quantize" in ln or "model.fp8_matmul" in ln]}
        out[run] = rec
        print(json.dumps(rec), flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not a.tiny else "cpu"
    for run, ref in (pair for pair in PAIRS if set(pair) <= set(out)):
        rel = [abs(y - x) / abs(x) for x, y in zip(out[ref]["window_means"], out[run]["window_means"])]
        print(json.dumps({"summary": f"{run} vs {ref}", "res": res, "steps": steps, "window": window,
                          "window_rel_diff": [round(v, 4) for v in rel],
                          "max_rel_window_diff": round(max(rel), 4) if rel else None,
                          "median_s_per_step": {k: out[k]["median_s_per_step"] for k in (run, ref)},
                          "peak_gib": {k: out[k]["peak_gib"] for k in (run, ref)}, "device": device}), flush=True)

if __name__ == "__main__":
    main()
