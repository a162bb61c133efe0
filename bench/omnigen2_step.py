"""Benchmark: LoRA training steps of the full-size OmniGen2 transformer (4B: hidden 2520, 32 layers, 21 heads over 7
KV heads, 2-layer refiners) through the trainer's own pieces.

Random weights (built on the GPU, nothing read from disk) in `trainer.models.omnigen2.OmniGen2Model`, LoRA rank 16
on the default targets (every block linear of the four stacks), gradient checkpointing of the main layers, cuDNN
SDPA off, AdamW, batch 1, a 100-token caption (Qwen2.5-VL-3B width 2048), at 1024x1024 by default (a 16 x 128 x 128
latent: 4096 image tokens); `ref` adds a reference latent of the same size (edit training: 4096 more tokens).
Case options as step_harness.py says (fp8, swap=N|auto, offload, cap=GiB).

    python3 bench/omnigen2_step.py --case full --case full:cap=24 --case full:ref:cap=24   # GPU
    python3 bench/omnigen2_step.py --tiny                                                  # CPU

Prints one JSON line per case: s/step (median after a warm-up step), peak GiB, TFLOP per step (analytic) and MFU
against 790 TFLOP/s bf16.
"""

from __future__ import annotations

import argparse
import os

import torch

from step_harness import parse_case, random_frozen, run_cases, time_steps
from trainer.models.omnigen2 import OmniGen2Model

TEXT = 100
SIZES = {"full": dict(hidden_size=2520, num_layers=32, num_refiner_layers=2, num_attention_heads=21, num_kv_heads=7,
                      text_feat_dim=2048),
         "tiny": dict(hidden_size=240, num_layers=2, num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1,
                      text_feat_dim=64)}


def build(size: str, device: torch.device, dtype: torch.dtype) -> OmniGen2Model:
    from trainer.models.omnigen2_transformer import OmniGen2Transformer

    model = random_frozen(OmniGen2Transformer, SIZES[size], device, dtype)
    return OmniGen2Model(model, None, None, None, device, dtype)


def flops_per_step(size: str, tokens: int, ref_tokens: int) -> float:
    """Checkpointed LoRA step: the main layers' matmuls three times (forward, recompute, input gradient), attention
    4.5 times its forward (4 L^2 d); per token q + o 2d^2, k + v 2 d (d / 3), SwiGLU 3 d f (f = 4d rounded to 256)."""
    s = SIZES[size]
    d = s["hidden_size"]
    kv = d * s["num_kv_heads"] // s["num_attention_heads"]
    f = 256 * -(-4 * d // 256)
    per_token = 2 * (2 * d * d + 2 * d * kv + 3 * d * f)
    seq = TEXT + ref_tokens + tokens
    main = s["num_layers"] * (3 * seq * per_token + 4.5 * 4 * seq * seq * d)
    refine = s["num_refiner_layers"] * 3 * (tokens + ref_tokens + TEXT) * per_token
    return main + refine


def conditioning(size: str, shape: tuple[int, ...] | None, ref: bool, device: torch.device,
                 dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(2)
    cond = {"context": torch.randn(1, TEXT, SIZES[size]["text_feat_dim"], generator=g).to(device, dtype),
            "mask": torch.ones(1, TEXT, device=device)}
    if ref:
        cond["control"] = torch.randn(1, *shape, generator=g).to(device, dtype)
    return cond


def run(case: str, width: int, height: int, steps: int, device: torch.device) -> dict:
    size, opts = parse_case(case)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(size, device, dtype)
    ref = "ref" in opts
    latent = (16, height // 8, width // 8)
    ref_tokens = (height // 16) * (width // 16) if ref else 0
    return time_steps(model, case, (width, height, 1), conditioning(size, latent, ref, device, dtype), steps, device,
                      lambda tokens: flops_per_step(size, tokens, ref_tokens))


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
        a.case, a.width, a.height, a.steps = ["tiny", "tiny:ref:fp8:swap=1"], 64, 48, 2
    device = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    run_cases(a.case or ["full", "full:cap=24", "full:ref:cap=24"], lambda c: run(c, a.width, a.height, a.steps, device))


if __name__ == "__main__":
    main()
