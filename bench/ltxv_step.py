"""Benchmark: LoRA training steps of full-size LTX-Video transformers through the trainer's own pieces.

Random weights (built on the GPU, nothing read from disk) in `trainer.models.ltxv.LTXVModel`, LoRA rank 16 on every
block linear the trainer targets, gradient checkpointing of all blocks, cuDNN SDPA off, AdamW on the LoRA
parameters, batch 1, a cached-embedding-sized text (128 T5 tokens with their mask), the clip size given (default
512x768, 97 frames: a 128 x 13 x 16 x 24 latent, 4,992 tokens; the patch is 1, so a token per latent cell). The
step mirrors trainer/train/loop.py; `--i2v` conditions on a start frame as do_i2v does (per-token timesteps, the
start frame left out of the loss). Options apply the prepare step's own components: `--fp8` (model.quantize: block
linears in fp8), `--swap N|auto` (train.blocks_to_swap: trainer.models.offload.BlockSwap), `--offload`
(train.offload_activations), `--cap GiB` (torch.cuda.set_per_process_memory_fraction, set after the weights are
built and swapped out, so the peak is the training's, as when the CLI loads on the CPU).

    python3 bench/ltxv_step.py --case 2b --case 2b:cap=24 --case 13b:fp8:swap=auto:cap=24     # GPU
    python3 bench/ltxv_step.py --tiny                                                        # CPU smoke test

Prints one JSON line per case: s/step (median after a warm-up step), peak GiB, TFLOP per step (analytic) and MFU
against 790 TFLOP/s bf16.
"""

from __future__ import annotations

import argparse
import os

import torch

from step_harness import parse_case, run_cases, time_steps
from trainer.models.ltxv import LTXVModel
from trainer.models.ltxv_layout import Positions

TEXT = 128
# LTX-Video 0.9.x: 2B = 28 blocks of 2048 (32 heads of 64), 13B = 48 blocks of 4096 (32 heads of 128); ffn 4x
SIZES = {
    "2b": dict(heads=32, head_dim=64, layers=28, caption=4096),
    "13b": dict(heads=32, head_dim=128, layers=48, caption=4096),
    "tiny": dict(heads=2, head_dim=32, layers=2, caption=32),
    "check": dict(heads=32, head_dim=64, layers=4, caption=4096),
}


def build(size: str, device: torch.device, dtype: torch.dtype) -> LTXVModel:
    from diffusers import LTXVideoTransformer3DModel

    s = SIZES[size]
    inner = s["heads"] * s["head_dim"]
    cfg = dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=s["heads"],
               attention_head_dim=s["head_dim"], cross_attention_dim=inner, num_layers=s["layers"],
               caption_channels=s["caption"], qk_norm="rms_norm_across_heads", norm_elementwise_affine=False)
    with torch.device("meta"):
        model = LTXVideoTransformer3DModel(**cfg)
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, p.shape[-1] ** -0.5 if "scale_shift" not in name else 0.05, generator=g)
            else:
                p.fill_(1.0 if "norm" in name else 0.0)
    model.requires_grad_(False)
    # without a VAE the model keeps LTX-Video's compression: 32x spatial, 8x temporal
    return LTXVModel(model, None, None, None, device, dtype, Positions(causal=True))


def flops_per_step(size: str, tokens: int, text: int) -> float:
    """Analytic FLOPs of a checkpointed LoRA step: forward twice (once more in backward) plus the input-gradient
    pass (as costly as a forward for matmuls, 2.5x for attention); LoRA's own matmuls are negligible at rank 16."""
    s = SIZES[size]
    d, n = s["heads"] * s["head_dim"], s["layers"]
    f = 4 * d
    matmul = 2 * tokens * (4 * d * d + 2 * d * f + 2 * d * d) + 2 * text * 2 * d * d  # self/cross attn, ffn, kv of text
    attn = 4 * tokens * tokens * d + 4 * tokens * text * d
    return n * (3 * matmul + 4.5 * attn)


def conditioning(size: str, model: LTXVModel, shape: tuple, i2v: bool, device: torch.device,
                 dtype: torch.dtype) -> dict:
    """T5 states with a prompt half the padded length (the mask); with `i2v`, a start frame's latent, given."""
    g = torch.Generator().manual_seed(2)
    text = TEXT if size != "tiny" else 16
    mask = torch.ones(1, text)
    mask[:, text // 2:] = 0
    cond = {"context": torch.randn(1, text, SIZES[size]["caption"], generator=g).to(device, dtype),
            "attention_mask": mask.to(device)}
    if i2v:
        first = torch.randn(shape[0], shape[1], 1, *shape[3:], generator=g)
        cond.update(first_frame=first.to(device), first_frame_given=torch.ones(1, 1, device=device))
    return cond


def run(case: str, width: int, height: int, frames: int, steps: int, device: torch.device, i2v: bool) -> dict:
    size, _ = parse_case(case)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(size, device, dtype)
    cond = conditioning(size, model, model.latent_shape(width, height, frames), i2v, device, dtype)
    text = cond["context"].shape[1]
    out = time_steps(model, case, (width, height, frames), cond, steps, device,
                     lambda tokens: flops_per_step(size, tokens, text))
    return {**out, "case": case + (":i2v" if i2v else "")}


def main() -> None:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as the CLI sets it
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", action="append", default=[])
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--frames", type=int, default=97)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--i2v", action="store_true")
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    if a.tiny:
        a.case, a.width, a.height, a.frames, a.steps = ["tiny", "tiny:fp8:swap=1"], 64, 64, 17, 2
    device = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    run_cases(a.case or ["2b", "2b:cap=24", "13b:fp8", "13b:fp8:swap=auto:cap=24"],
              lambda c: run(c, a.width, a.height, a.frames, a.steps, device, a.i2v))


if __name__ == "__main__":
    main()
