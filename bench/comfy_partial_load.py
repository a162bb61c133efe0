"""Training on ComfyUI's own MODEL under a 24 GiB cap: ComfyUI's partial loading (train.blocks_to_swap: auto on
this path) against a full load, on full-size FLUX.1-dev (12B, bf16 weights: 23.8 GB, more than the cap) with
random weights, LoRA r16, bs1, 1024², gradient checkpointing, cached text embeddings.

Runs in a python that can import a ComfyUI checkout (--comfyui) and this repository; ComfyUI's text encoders are
built small (CLIP-L at 1 layer, T5-XXL at 1 layer, full widths: the conditioning's shapes are Flux's), the VAE is
its 16-channel one at Flux's widths. Prints one JSON line per variant:

    python3 bench/comfy_partial_load.py --comfyui /path/to/ComfyUI --work /tmp/pl --variants partial_24 full
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLUX_DEV = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
            "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
            "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
            "txt_ids_dims": []}
SMALL_TEXT = {"clip_l": {"num_hidden_layers": 1}, "t5xxl": {"num_layers": 1, "num_heads": 2, "d_kv": 32, "d_ff": 64}}


def fast_fill(module, seed: int) -> None:
    """Seeded random weights in place, in the weights' own dtype (12B parameters: no float32 copies)."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / p[0].numel() ** 0.5)
            elif "norm" in name or name.endswith("scale"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)


def run(variant: str, comfyui: str, work: Path, steps: int, smoke: bool = False) -> dict:
    sys.path[:0] = [comfyui, str(HERE.parent), str(HERE.parent / "tests" / "integration")]
    import torch

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if variant.startswith("partial") and cuda:
        cap = float(variant.split("_")[1]) * 2**30
        torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    import comfy.cli_args

    comfy.cli_args.args.cpu = not cuda  # read when model_management is first imported
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm
    from comfy_small import flux_vae, small_clip
    from trainer.demo import make_dataset
    from trainer.models.comfy import ComfyModel
    from trainer.session import TrainingSession, job_from_parts

    t0 = time.time()
    cfg = sm.Flux({**FLUX_DEV, **({"depth": 1, "depth_single_blocks": 1} if smoke else {})})
    cfg.set_inference_dtype(torch.bfloat16, None)
    with torch.device("cpu"):
        base = cfg.get_model({}, "")
    base.diffusion_model.to(torch.bfloat16)
    fast_fill(base.diffusion_model, 0)
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=torch.device("cpu"))
    clip = small_clip(patcher, SMALL_TEXT)
    vae = flux_vae(work / "cache")
    build_s = time.time() - t0
    res = 64 if smoke else 1024
    data = make_dataset(work / f"data_{variant}", n=2, size=(res, res))
    dataset = {"folder_path": str(data), "caption_ext": "txt", "resolution": [res]}
    train = {"lr": 1e-4, "batch_size": 1, "dtype": "bf16", "gradient_checkpointing": True, "seed": 1,
             "cache_text_embeddings": True, "timestep_type": "sigmoid"}
    if variant.startswith("partial"):
        train["blocks_to_swap"] = "auto"
    settings = {"name": f"pl_{variant}", "train": train, "save": {"save_every": 10**6},
                "sample": {"sample_every": 10**6, "prompts": []}}
    job = job_from_parts({"comfy": (patcher, clip, vae)}, [dataset], {"type": "lora", "linear": 16, "linear_alpha": 16},
                         settings, steps, str(work / "runs"))
    lines: list[str] = []
    with torch.inference_mode(False), torch.enable_grad():
        model = ComfyModel(patcher, clip, vae)
        session = TrainingSession(job, model=model, report=lines.append)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            sync()
            t = time.time()
            session.advance(1)
            sync()
            times.append(time.time() - t)
    on_card = sum(p.numel() * p.element_size() for p in model.denoiser.parameters() if p.device.type == "cuda")
    return {"variant": variant, "res": res, "median_s_per_step": round(statistics.median(times[2:] or times), 4),
            "first_step_s": round(times[0], 2), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "weights_on_card_gib": round(on_card / 2**30, 2), "losses": [round(v, 4) for _, v in session.losses],
            "build_s": round(build_s, 1), "reports": [x for x in lines if "blocks_to_swap" in x or "gradient" in x],
            "device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--variants", nargs="+", default=["partial_24", "full"])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--smoke", action="store_true", help="one double and one single block at 64 px: the CPU check")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a single variant, in this process
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.one:
        print(json.dumps(run(a.one, a.comfyui, work, a.steps, a.smoke)), flush=True)
        return 0
    import subprocess

    for v in a.variants:  # each in its own process: caps and ComfyUI's loaded-model list do not carry over
        subprocess.run([sys.executable, __file__, "--comfyui", a.comfyui, "--work", a.work, "--steps", str(a.steps),
                        "--one", v, *(["--smoke"] if a.smoke else [])], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
