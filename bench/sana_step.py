"""Benchmark: LoRA training steps of the full-size Sana transformer (1.6B: 20 blocks of width 2240; 600M: 28 of
1152; Sana 1.5 4.8B: 60 of 2240 with q/k norms) through the trainer's own pieces.

Random weights (built on the GPU, nothing read from disk) in `trainer.models.sana.SanaModel`, LoRA rank 16 on the
default targets (the attention linears), gradient checkpointing of all blocks, cuDNN SDPA off, AdamW, batch 1, 300
Gemma tokens of context, at 1024x1024 by default (DC-AE 32x: a 32 x 32 x 32 latent, 1024 tokens). Case options as
step_harness.py says (fp8, swap=N|auto, offload, cap=GiB).

    python3 bench/sana_step.py --case 1600m --case 1600m:cap=24 --case 4800m:cap=24   # GPU
    python3 bench/sana_step.py --tiny                                                  # CPU

Prints one JSON line per case: s/step (median after a warm-up step), peak GiB, TFLOP per step (analytic) and MFU
against 790 TFLOP/s bf16.
"""

from __future__ import annotations

import argparse
import os

import torch

from step_harness import parse_case, random_frozen, run_cases, time_steps
from trainer.models.sana import MAX_TOKENS, SanaModel

SIZES = {"600m": (1152, 28, 16, False), "1600m": (2240, 20, 20, False), "4800m": (2240, 60, 20, True),
         "tiny": (64, 2, 2, True)}


def config(size: str) -> dict:
    hidden, layers, heads, qk = SIZES[size]
    return dict(in_channels=32, out_channels=32, num_attention_heads=hidden // 32, attention_head_dim=32,
                num_layers=layers, num_cross_attention_heads=heads, cross_attention_head_dim=hidden // heads,
                cross_attention_dim=hidden, caption_channels=2304 if size != "tiny" else 64, mlp_ratio=2.5,
                patch_size=1, sample_size=32, qk_norm="rms_norm_across_heads" if qk else None)


def build(size: str, device: torch.device, dtype: torch.dtype) -> SanaModel:
    from diffusers import SanaTransformer2DModel

    model = random_frozen(SanaTransformer2DModel, config(size), device, dtype)
    return SanaModel(model, None, None, None, device, dtype)


def flops_per_step(size: str, tokens: int) -> float:
    """Checkpointed LoRA step: the matmuls three times (forward, recompute, input gradient). Per block and image
    token: qkv + proj 4d^2, cross q + proj 2d^2, GLUMBConv 1x1s 5d^2 + 2.5d^2 (the depthwise 3x3 and the linear
    attention's d x d state are small); the 300 text tokens' k, v 2d^2; cross attention 4 N T d."""
    d, layers, _, _ = SIZES[size]
    per_block = tokens * 2 * 13.5 * d * d + MAX_TOKENS * 2 * 2 * d * d + 4 * tokens * MAX_TOKENS * d
    return layers * 3 * per_block


def conditioning(size: str, device: torch.device, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(2)
    width = config(size)["caption_channels"]
    mask = torch.ones(1, MAX_TOKENS)
    mask[:, 40:] = 0  # a 40-token caption, as most are
    return {"context": torch.randn(1, MAX_TOKENS, width, generator=g).to(device, dtype), "mask": mask.to(device)}


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
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    if a.tiny:
        a.case, a.width, a.height, a.steps = ["tiny", "tiny:fp8:swap=1"], 128, 96, 2
    device = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    run_cases(a.case or ["1600m", "1600m:cap=24", "4800m:cap=24"], lambda c: run(c, a.width, a.height, a.steps, device))


if __name__ == "__main__":
    main()
