"""Benchmark: LoRA training steps of full-size Wan 2.1 transformers through the trainer's own pieces.

Random weights (built on the GPU, nothing read from disk) in `trainer.models.wan.WanModel`, LoRA rank 16 on every
block linear the trainer targets, gradient checkpointing of all blocks, cuDNN SDPA off, AdamW on the LoRA
parameters, batch 1, a cached-embedding-sized text (512 UMT5 tokens), the clip size given (default 480x832, 81
frames: a 16 x 21 x 60 x 104 latent, 32,760 tokens). The step mirrors trainer/train/loop.py. Options apply the
prepare step's own components: `--fp8` (model.quantize: block linears in fp8), `--swap N|auto` (train.blocks_to_swap:
trainer.models.offload.BlockSwap), `--cap GiB` (torch.cuda.set_per_process_memory_fraction, set after the weights are
built and swapped out, so the peak is the training's, as when the CLI loads on the CPU).

    python3 bench/wan_step.py --case 1.3b:bf16 --case 14b:fp8:swap=auto:cap=24     # GPU
    python3 bench/wan_step.py --tiny                                               # CPU smoke test

Prints one JSON line per case: s/step (median after a warm-up step), peak GiB, TFLOP per step (analytic) and MFU
against 790 TFLOP/s bf16.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from step_harness import parse_case, run_cases, swap_check, time_steps
from trainer.models.wan import WanModel

SIZES = {
    "1.3b": dict(dim=1536, heads=12, ffn=8960, layers=30),
    "14b": dict(dim=5120, heads=40, ffn=13824, layers=40),
    "tiny": dict(dim=128, heads=1, ffn=256, layers=2),
    "check": dict(dim=1536, heads=12, ffn=8960, layers=4),
}


def build(size: str, device: torch.device, dtype: torch.dtype) -> WanModel:
    from diffusers import WanTransformer3DModel

    s = SIZES[size]
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=s["heads"], attention_head_dim=128, in_channels=16,
               out_channels=16, text_dim=4096 if size != "tiny" else 32, freq_dim=256, ffn_dim=s["ffn"],
               num_layers=s["layers"], cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
    with torch.device("meta"):
        model = WanTransformer3DModel(**cfg)
    model = model.to_empty(device=device)
    rope = model.rope
    model.rope = type(rope)(rope.attention_head_dim, rope.patch_size, rope.max_seq_len).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            keep32 = any(k in name for k in model._keep_in_fp32_modules)
            p.data = p.data.to(torch.float32 if keep32 else dtype)
            if p.dim() >= 2:
                p.normal_(0, p.shape[1] ** -0.5 if p.dim() == 2 else 0.02, generator=g)
            else:
                p.fill_(1.0 if "norm" in name else 0.0)
    model.requires_grad_(False)
    return WanModel(model, None, None, None, device, dtype)


def flops_per_step(size: str, tokens: int, text: int) -> float:
    """Analytic FLOPs of a checkpointed LoRA step: forward twice (once more in backward) plus the input-gradient
    pass (as costly as a forward for matmuls, 2.5x for attention); LoRA's own matmuls are negligible at rank 16."""
    s = SIZES[size]
    d, f, n = s["dim"], s["ffn"], s["layers"]
    matmul = 2 * tokens * (4 * d * d + 2 * d * f + 2 * d * d) + 2 * text * 2 * d * d  # self/cross attn, ffn, kv of text
    attn = 4 * tokens * tokens * d + 4 * tokens * text * d
    return n * (3 * matmul + 4.5 * attn)


def conditioning(size: str, model: WanModel, device: torch.device, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(2)
    text = 512 if size != "tiny" else 16
    return {"context": torch.randn(1, text, model.denoiser.config.text_dim, generator=g).to(device, dtype)}


def run(case: str, width: int, height: int, frames: int, steps: int, device: torch.device) -> dict:
    size, _ = parse_case(case)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(size, device, dtype)
    cond = conditioning(size, model, device, dtype)
    text = cond["context"].shape[1]
    return time_steps(model, case, (width, height, frames), cond, steps, device,
                      lambda tokens: flops_per_step(size, tokens, text))


def main() -> None:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as the CLI sets it
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", action="append", default=[])
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--swap-check", action="store_true")
    a = ap.parse_args()
    if a.tiny:
        a.case, a.width, a.height, a.frames, a.steps = ["tiny", "tiny:fp8:swap=1"], 64, 48, 9, 2
    device = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    if a.swap_check and device.type == "cuda":
        model = build("check", device, torch.bfloat16)
        print(json.dumps(swap_check(model, (832, 480, 33), conditioning("check", model, device, torch.bfloat16),
                                    device)), flush=True)
        del model
        torch.cuda.empty_cache()
    run_cases(a.case or ["1.3b", "1.3b:cap=24", "14b:fp8:swap=auto:cap=24"],
              lambda c: run(c, a.width, a.height, a.frames, a.steps, device))


if __name__ == "__main__":
    main()
