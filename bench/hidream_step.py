"""Benchmark: LoRA training steps of the full-size HiDream-I1 transformer (17B, 16 double + 32 single blocks, 4
experts top-2) through the trainer's own pieces.

Random weights (built on the GPU, nothing read from disk) in `trainer.models.hidream.HiDreamModel`, LoRA rank 16 on
the default targets (every block linear but the routed experts), gradient checkpointing of all blocks, cuDNN SDPA
off, AdamW on the LoRA parameters, batch 1, cached-embedding-sized text (128 T5 tokens; the Llama stack 32 layers x
128 tokens), at 1024x1024 by default (a 16 x 128 x 128 latent: 4096 image tokens). The step mirrors
trainer/train/loop.py. Options apply the prepare step's own components: `fp8` (model.quantize: block linears in
fp8), `swap=N|auto` (train.blocks_to_swap: trainer.models.offload.BlockSwap), `offload` (train.offload_activations),
`cap=GiB` (torch.cuda.set_per_process_memory_fraction, set after the weights are built and swapped out, so the peak
is the training's, as when the CLI loads on the CPU).

    python3 bench/hidream_step.py --case full:fp8:swap=auto:cap=24 --case full:fp8:swap=auto:offload:cap=24   # GPU
    python3 bench/hidream_step.py --tiny                                                                     # CPU

Prints one JSON line per case: s/step (median after a warm-up step), peak GiB, TFLOP per step (analytic) and MFU
against 790 TFLOP/s bf16.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from step_harness import parse_case, random_frozen, run_cases, swap_check, time_steps
from trainer.models.hidream import VARIANTS, HiDreamModel
from trainer.models.hidream_layout import ROPE_AXES, llama_layer_of_blocks

SIZES = {
    "full": dict(heads=20, double=16, single=32, t5=4096, llama=4096, llama_layers=32, pooled=2048, text=128),
    "check": dict(heads=20, double=2, single=2, t5=4096, llama=4096, llama_layers=32, pooled=2048, text=128),
    "tiny": dict(heads=1, double=2, single=2, t5=32, llama=64, llama_layers=2, pooled=80, text=16),
}


def config(size: str) -> dict:
    s = SIZES[size]
    return dict(patch_size=2, in_channels=16, out_channels=16, num_layers=s["double"], num_single_layers=s["single"],
                attention_head_dim=128, num_attention_heads=s["heads"], caption_channels=[s["t5"], s["llama"]],
                text_emb_dim=s["pooled"], num_routed_experts=4, num_activated_experts=2, axes_dims_rope=ROPE_AXES,
                max_resolution=(128, 128), llama_layers=llama_layer_of_blocks(s["double"] + s["single"], s["llama_layers"]))


def build(size: str, device: torch.device, dtype: torch.dtype) -> HiDreamModel:
    from diffusers import HiDreamImageTransformer2DModel

    model = random_frozen(HiDreamImageTransformer2DModel, config(size), device, dtype)
    encoders = {"clip_l": None, "clip_g": None, "t5": None, "llama": None}
    return HiDreamModel(model, None, encoders, {}, device, dtype, VARIANTS["full"])


def flops_per_step(size: str, tokens: int) -> float:
    """Analytic FLOPs of a checkpointed LoRA step: forward twice (once more in backward) plus the input-gradient
    pass (as costly as a forward for matmuls, 2.5x for attention). Double blocks: image tokens through attention,
    the shared expert and two routed experts, text tokens (T5 + last Llama layer + the block's own layer) through
    attention and ff_t; single blocks: all tokens through attention and the experts."""
    s = SIZES[size]
    d = 128 * s["heads"]
    routed = 256 * ((int(2 * 4 * d / 3) + 255) // 256)
    shared = 256 * ((int(2 * 2 * d / 3) + 255) // 256)
    text = 3 * s["text"]
    moe = 2 * (3 * d * shared + 2 * 3 * d * routed)
    double = tokens * (2 * 4 * d * d + moe) + text * (2 * 4 * d * d + 2 * 3 * d * routed)
    all_tokens = tokens + text
    single = all_tokens * (2 * 4 * d * d + moe)
    attn = 4 * all_tokens * all_tokens * d
    return s["double"] * (3 * double + 4.5 * attn) + s["single"] * (3 * single + 4.5 * attn)


def conditioning(size: str, device: torch.device, dtype: torch.dtype) -> dict:
    """T5 states, every Llama layer's states (each block reads its own) and the pooled CLIP-L + CLIP-G vector."""
    s = SIZES[size]
    g = torch.Generator().manual_seed(2)
    return {"t5": torch.randn(1, s["text"], s["t5"], generator=g).to(device, dtype),
            "llama": torch.randn(1, s["llama_layers"], s["text"], s["llama"], generator=g).to(device, dtype),
            "pooled": torch.randn(1, s["pooled"], generator=g).to(device, dtype)}


def run(case: str, width: int, height: int, steps: int, device: torch.device) -> dict:
    size, _ = parse_case(case)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(size, device, dtype)
    return time_steps(model, case, (width, height, 1), conditioning(size, device, dtype), steps, device,
                      lambda tokens: flops_per_step(size, tokens))


def main() -> None:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as the CLI sets it
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", action="append", default=[])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--swap-check", action="store_true")
    a = ap.parse_args()
    if a.tiny:
        a.case, a.width, a.height, a.steps = ["tiny", "tiny:fp8:swap=1"], 64, 48, 2
    device = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    if a.swap_check and device.type == "cuda":
        model = build("check", device, torch.bfloat16)
        print(json.dumps(swap_check(model, (1024, 768, 1), conditioning("check", device, torch.bfloat16), device)),
              flush=True)
        del model
        torch.cuda.empty_cache()
    run_cases(a.case or ["full:fp8:swap=auto:cap=24", "full:fp8:swap=auto:offload:cap=24"],
              lambda c: run(c, a.width, a.height, a.steps, device))


if __name__ == "__main__":
    main()
