"""End to end through `python -m trainer` for Wan 2.1 1.3B or 14B at its real size: random weights in ComfyUI's
file layouts (transformer at full size, the Wan 2.1 VAE at full size, UMT5 at full width with one layer: its captions
are cached before training, so its depth does not change a step), 81-frame 832x480 clips made here, a job as a user
writes it, and the trainer's own metrics.jsonl. Optionally under a memory cap, as a smaller card.

    python3 bench/wan_e2e.py --work /tmp/wan_e2e --steps 12 [--variants bf16 bf16_cap24 compile]
    python3 bench/wan_e2e.py --size 14b --files-only         # write the 28 GB of files (one device call)
    python3 bench/wan_e2e.py --size 14b --variants fp8_swap_cap24 --steps 6 --warmup 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

VARIANTS = {
    "bf16": {},
    "bf16_cap24": {"cap_gib": 24},
    "compile": {"compile": True},
    # the 14B recipe of the README for a 24 GB card: fp8 blocks, blocks streamed from RAM, activations offloaded
    "fp8_swap_cap24": {"cap_gib": 24, "model": {"quantize": True}, "blocks_to_swap": "auto",
                       "offload_activations": True},
}
SIZES = {"1.3b": dict(dim=1536, layers=30, ffn=8960), "14b": dict(dim=5120, layers=40, ffn=13824)}

# runs the CLI in this interpreter with the card capped, as a smaller card would be
CAPPED = ("import sys, runpy, torch; torch.cuda.set_per_process_memory_fraction(float(sys.argv.pop(1)) /"
          " (torch.cuda.get_device_properties(0).total_memory / 2**30)); sys.argv[0] = 'trainer';"
          " runpy.run_module('trainer', run_name='__main__')")


def build_files(folder: Path, size: str = "1.3b") -> dict:
    from trainer.demo import tiny
    from trainer.demo.videos import make_video_dataset
    from trainer.demo.wan import make_wan_file, make_wan_vae_file, wan_diffusers_config

    folder.mkdir(parents=True, exist_ok=True)
    paths = {n: folder / f"wan21_{size}_{n}.safetensors" for n in ("transformer", "umt5", "vae")}
    t0 = time.time()
    if not paths["transformer"].exists():
        make_wan_file(paths["transformer"], wan_diffusers_config(**SIZES[size], text_dim=4096), dtype=torch.bfloat16)
    if not paths["vae"].exists():
        tiny.make_umt5_file(paths["umt5"], d_model=4096, layers=1, heads=64, d_kv=64, d_ff=10240, dtype=torch.bfloat16)
        make_wan_vae_file(paths["vae"], base_dim=96, dtype=torch.bfloat16)
    if not (folder / "clips").exists():
        make_video_dataset(folder / "clips", n=4, size=(832, 480), frames=81, fps=16)
        print(f"# files written in {time.time() - t0:.0f}s", flush=True)
    return {"arch": "wan21", "name_or_path": str(paths["transformer"]), "text_encoder_paths": [str(paths["umt5"])],
            "vae_path": str(paths["vae"])}


def job(name: str, model: dict, folder: Path, steps: int, extra: dict, preview_frames: int = 33) -> dict:
    train = {"steps": steps, "lr": 1e-4, "optimizer": "adamw", "dtype": "bf16", "gradient_checkpointing": True,
             "cache_text_embeddings": True, "skip_first_sample": True}
    train.update({k: v for k, v in extra.items() if k not in ("cap_gib", "model")})
    model = {**model, **extra.get("model", {})}
    return {"job": "extension", "config": {"name": name, "process": [{
        "training_folder": str(folder / "runs"), "device": "cuda",
        "network": {"type": "lora", "linear": 16, "linear_alpha": 16},
        "save": {"dtype": "bf16", "save_every": 100000},
        "datasets": [{"folder_path": str(folder / "clips"), "resolution": [640], "num_frames": 81,
                      "caption_ext": "txt"}],
        "train": train, "model": model,
        # the final preview: a 33-frame clip in 8 steps, written as .mp4
        "sample": {"sample_every": 100000, "width": 832, "height": 480, "num_frames": preview_frames, "sample_steps": 8,
                   "guidance_scale": 5.0, "prompts": ["a red circle moving on a blue background"]}}]}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/wan_e2e")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=["bf16", "bf16_cap24", "compile"])
    ap.add_argument("--size", choices=sorted(SIZES), default="1.3b")
    ap.add_argument("--preview-frames", type=int, default=33)
    ap.add_argument("--files-only", action="store_true")
    a = ap.parse_args()
    folder = Path(a.work).resolve()  # a job file reads relative paths from its own folder
    t0 = time.time()
    model = build_files(folder, a.size)
    if a.files_only:
        print(f"# {a.size} files ready in {time.time() - t0:.0f}s", flush=True)
        return
    for v in a.variants:
        name = f"wan_e2e_{v}"
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(job(name, model, folder, a.steps, VARIANTS[v], a.preview_frames)))
        cap = VARIANTS[v].get("cap_gib")
        cmd = [sys.executable, "-c", CAPPED, str(cap), str(path)] if cap else [sys.executable, "-m", "trainer", str(path)]
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.time() - t0
        swap = next((l.strip() for l in r.stdout.splitlines() if "block swap" in l or "blocks_to_swap" in l), "")
        if r.returncode != 0:
            print(json.dumps({"variant": v, "swap": swap, "error": (r.stderr or r.stdout)[-1500:]}), flush=True)
            continue
        run = folder / "runs" / name
        m = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        steady = [x["s_per_step"] for x in m[a.warmup:]]
        videos = sorted(p.name for p in (run / "samples").glob("*.mp4"))
        entries = next((l for l in r.stdout.splitlines() if "training entries" in l), "")
        print(json.dumps({"variant": v, "model": a.size, "size": "832x480x81", "median_s_per_step": round(statistics.median(steady), 3),
                          "first_step_s": round(m[0]["s_per_step"], 2),
                          "peak_gib": round(max(x["peak_mem_gib"] for x in m), 2), "wall_s": round(wall, 1),
                          "cap_gib": cap, "entries": entries, "swap": swap, "preview_videos": videos,
                          "device": torch.cuda.get_device_name(), "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
