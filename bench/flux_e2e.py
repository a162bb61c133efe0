"""End-to-end benchmark through `python -m trainer`: full-size random FLUX.1-dev files on disk, a job at
1024², and the trainer's own metrics.jsonl. Reports median s/step after warm-up and peak GiB per variant.

    python3 bench/flux_e2e.py --work /tmp/e2e --steps 30 [--variants base compile ckpt0 compile_ckpt0]
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

VARIANTS = {
    "base": {},
    "compile": {"compile": True},
    "ckpt0": {"gradient_checkpointing": False},
    "compile_ckpt0": {"compile": True, "gradient_checkpointing": False},
    # train.cudnn_attention: unset (the variants above) runs the attention self-test; these force it
    "compile_cudnn_off": {"compile": True, "cudnn_attention": False},
    "compile_cudnn_on": {"compile": True, "cudnn_attention": True},
    "compile_ckpt05": {"compile": True, "gradient_checkpointing": 0.5},
    # model.quantize: block linears in fp8 (the 24 GB recipe)
    "fp8": {"model": {"quantize": True}},
    "fp8_compile": {"compile": True, "model": {"quantize": True}},
    "fp8_compile_ckpt05": {"compile": True, "gradient_checkpointing": 0.5, "model": {"quantize": True}},
    "fp8_compile_ckpt025": {"compile": True, "gradient_checkpointing": 0.25, "model": {"quantize": True}},
    # model.fp8_matmul: the same fp8 weights, their matmuls in fp8 (torch._scaled_mm); loss curves: bench/fp8_curve.py
    "fp8mm": {"model": {"quantize": True, "fp8_matmul": True}},
    "fp8mm_compile": {"compile": True, "model": {"quantize": True, "fp8_matmul": True}},
}


def build_files(folder: Path, t5_layers: int = 1) -> dict:
    from trainer.demo import make_dataset
    from trainer.demo import tiny
    from trainer.demo import flux as demo_flux

    folder.mkdir(parents=True, exist_ok=True)
    flux = folder / "flux1-dev-random.safetensors"
    if not flux.exists():
        t0 = time.time()
        cfg = demo_flux.flux_diffusers_config(hidden=3072, head_dim=128, double=19, single=38, context_dim=4096,
                                         pooled_dim=768, guidance=True)
        demo_flux.make_flux_file(flux, cfg, dtype=torch.bfloat16)
        ct = tiny.build_tokenizer(folder / "tok_clip", "clip")
        tt = tiny.build_tokenizer(folder / "tok_t5", "t5")
        # real widths where the transformer reads them (768 pooled, 4096 context), one layer each
        tiny.make_clip_file(folder / "clip_l.safetensors", len(ct), hidden=768, layers=1, dtype=torch.bfloat16)
        tiny.make_vae_file(folder / "ae.safetensors", [128, 256, 512, 512], layers=2, latent=16, dtype=torch.bfloat16)
        make_dataset(folder / "data", n=4, size=(1024, 1024))
        print(f"# files written in {time.time() - t0:.0f}s", flush=True)
    # T5 at real width; --t5-layers 24 is T5-XXL's full depth (9.5 GB in bf16), to see the load-time peak
    t5 = folder / f"t5_{t5_layers}l.safetensors"
    if not t5.exists():
        tt = tiny.build_tokenizer(folder / "tok_t5", "t5")
        tiny.make_t5_file(t5, len(tt), d_model=4096, layers=t5_layers, heads=64, d_kv=64, d_ff=10240,
                          dtype=torch.bfloat16)
    return {"arch": "flux", "name_or_path": str(flux),
            "text_encoder_paths": [str(folder / "clip_l.safetensors"), str(t5)],
            "vae_path": str(folder / "ae.safetensors"),
            "tokenizer_paths": [str(folder / "tok_clip"), str(folder / "tok_t5")], "t5_max_length": 512}


def job(name: str, model: dict, folder: Path, steps: int, res: int, extra: dict) -> dict:
    train = {"steps": steps, "lr": 1e-4, "optimizer": "adamw", "dtype": "bf16", "gradient_checkpointing": True,
             "cache_text_embeddings": True, "disable_sampling": True}
    extra = dict(extra)
    model = {**model, **extra.pop("model", {})}
    train.update(extra)
    return {"job": "extension", "config": {"name": name, "process": [{
        "training_folder": str(folder / "runs"), "device": "cuda",
        "network": {"type": "lora", "linear": 16, "linear_alpha": 16},
        "save": {"dtype": "bf16", "save_every": 100000},
        "datasets": [{"folder_path": str(folder / "data"), "resolution": [res], "caption_ext": "txt"}],
        "train": train, "model": model}]}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/flux_e2e")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--t5-layers", type=int, default=1)
    ap.add_argument("--cache", default=None, help="ERIDIFFUSION_CACHE for the runs (compiled kernels, attention"
                    " verdicts); an empty folder measures a first run")
    a = ap.parse_args()
    env = {**os.environ, **({"ERIDIFFUSION_CACHE": a.cache} if a.cache else {})}
    folder = Path(a.work)
    model = build_files(folder, a.t5_layers)
    for v in a.variants:
        name = f"e2e_{v}_{a.res}_t5x{a.t5_layers}"
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(job(name, model, folder, a.steps, a.res, VARIANTS[v])))
        t0 = time.time()
        shutil.rmtree(folder / "runs" / name, ignore_errors=True)  # a repeated variant starts over, not resumes
        r = subprocess.run([sys.executable, "-m", "trainer", str(path)], capture_output=True, text=True, env=env)
        wall = time.time() - t0
        if r.returncode != 0:
            print(json.dumps({"variant": v, "error": r.stderr[-2000:]}), flush=True)
            continue
        m = [json.loads(l) for l in (folder / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        steady = [x["s_per_step"] for x in m[a.warmup:]]
        print(json.dumps({"variant": v, "res": a.res, "median_s_per_step": round(statistics.median(steady), 4),
                          "mean_s_per_step": round(statistics.mean(steady), 4),
                          "first_step_s": round(m[0]["s_per_step"], 2),
                          "first_steps_s": [round(x["s_per_step"], 2) for x in m[:4]],
                          "attention": [ln for ln in r.stdout.splitlines() if "attention" in ln][-1:],
                          "peak_gib": round(max(x["peak_mem_gib"] for x in m), 2), "wall_s": round(wall, 1),
                          "t5_layers": a.t5_layers,
                          "device": torch.cuda.get_device_name()}), flush=True)


if __name__ == "__main__":
    main()
