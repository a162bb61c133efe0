"""Benchmark: LoRA training steps of the full-size HunyuanVideo transformer (13B) through the trainer's own pieces.

Random weights (built on the GPU, nothing read from disk) in `trainer.models.hunyuan_video.HunyuanVideoModel`, LoRA
rank 16 on every default target (the double and single blocks' linears), gradient checkpointing of all blocks, cuDNN
SDPA off, AdamW on the LoRA parameters, batch 1, guidance embedding 1.0, a cached-embedding-sized text (256 Llama
tokens with the mask, `--text` of them a prompt: the rest is dropped as padding, as in training), the clip size
given (default 960x544, 33 frames: a 16 x 9 x 68 x 120 latent, 18,360 tokens). The step mirrors
trainer/train/loop.py. Options apply the prepare step's own components: `fp8` (model.quantize: block linears in fp8),
`swap=N|auto` (train.blocks_to_swap: trainer.models.offload.BlockSwap), `offload` (train.offload_activations),
`cap=GiB` (torch.cuda.set_per_process_memory_fraction, set after the weights are built and swapped out, so the peak
is the training's, as when the CLI loads on the CPU).

    PYTHONPATH=. python3 bench/hunyuan_video_step.py --swap-check --case 13b:bf16 --case 13b:fp8:swap=auto:cap=24  # GPU
    PYTHONPATH=. python3 bench/hunyuan_video_step.py --tiny                                                # CPU smoke test

(from the repository root; PYTHONPATH=. makes this checkout's `trainer` the one imported). With no --case: 13B bf16
uncapped and capped at 24 GiB, and fp8 + block swap (auto) capped at 24 GiB without and with activation offload.

Prints one JSON line per case: s/step (median after a warm-up step), peak GiB, TFLOP per step (analytic) and MFU
against 790 TFLOP/s bf16.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from step_harness import parse_case, random_frozen, run_cases, swap_check, time_steps
from trainer.models.hunyuan_video import HunyuanVideoModel

SIZES = {
    "13b": dict(hidden=3072, double=20, single=40, text_dim=4096),
    "tiny": dict(hidden=128, double=1, single=1, text_dim=32),
    "check": dict(hidden=3072, double=2, single=2, text_dim=4096),
}


def build(size: str, device: torch.device, dtype: torch.dtype) -> HunyuanVideoModel:
    from diffusers import HunyuanVideoTransformer3DModel

    from trainer.demo.hunyuan_video import hunyuan_diffusers_config

    s = SIZES[size]
    cfg = hunyuan_diffusers_config(s["hidden"], s["double"], s["single"], s["text_dim"], pooled_dim=768)
    model = random_frozen(HunyuanVideoTransformer3DModel, cfg, device, dtype)
    return HunyuanVideoModel(model, None, None, None, None, None, device, dtype)


def flops_per_step(size: str, tokens: int, text: int) -> float:
    """Analytic FLOPs of a checkpointed LoRA step: forward twice (once more in backward) plus the input-gradient
    pass (as costly as a forward for matmuls, 2.5x for attention); LoRA's own matmuls are negligible at rank 16."""
    s = SIZES[size]
    d, n = s["hidden"], tokens + text
    double = 2 * n * (3 * d * d + d * d + 8 * d * d)  # both streams: qkv, proj, MLP (ratio 4)
    single = 2 * n * (7 * d * d + 5 * d * d)  # linear1 (qkv + MLP in), linear2 (attention + MLP out)
    attn = 4 * n * n * d
    return s["double"] * (3 * double + 4.5 * attn) + s["single"] * (3 * single + 4.5 * attn)


def conditioning(model: HunyuanVideoModel, text: int, device: torch.device, dtype: torch.dtype) -> dict:
    """256 text positions, the first `text` of them the prompt (the mask), and CLIP-L's pooled vector."""
    g = torch.Generator().manual_seed(2)
    mask = torch.zeros(1, 256)
    mask[:, :text] = 1.0
    return {"context": torch.randn(1, 256, model.denoiser.config.text_embed_dim, generator=g).to(device, dtype),
            "mask": mask.to(device), "pooled": torch.randn(1, 768, generator=g).to(device, dtype)}


def run(case: str, width: int, height: int, frames: int, steps: int, text: int, device: torch.device) -> dict:
    size, _ = parse_case(case)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(size, device, dtype)
    return time_steps(model, case, (width, height, frames), conditioning(model, text, device, dtype), steps, device,
                      lambda tokens: flops_per_step(size, tokens, text), text_tokens=text)


def main() -> None:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as the CLI sets it
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", action="append", default=[])
    ap.add_argument("--width", type=int, default=960)
    ap.add_argument("--height", type=int, default=544)
    ap.add_argument("--frames", type=int, default=33)
    ap.add_argument("--text", type=int, default=128, help="prompt tokens of the 256 (the rest is padding)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--swap-check", action="store_true")
    a = ap.parse_args()
    if a.tiny:
        a.case, a.width, a.height, a.frames, a.steps, a.text = ["tiny", "tiny:fp8:swap=1"], 64, 48, 9, 2, 16
    device = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    if a.swap_check and device.type == "cuda":
        model = build("check", device, torch.bfloat16)
        print(json.dumps(swap_check(model, (960, 544, 17), conditioning(model, 256, device, torch.bfloat16), device)),
              flush=True)
        del model
        torch.cuda.empty_cache()
    run_cases(a.case or ["13b:bf16", "13b:bf16:cap=24", "13b:fp8:swap=auto:cap=24", "13b:fp8:swap=auto:offload:cap=24"],
              lambda c: run(c, a.width, a.height, a.frames, a.steps, a.text, device))


if __name__ == "__main__":
    main()
