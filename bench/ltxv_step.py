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
import json
import os
import statistics
import time

import torch

from trainer.models.ltxv import LTXVModel
from trainer.models.ltxv_layout import Positions
from trainer.models.objectives import FlowObjective
from trainer.networks.network import Network

GIB = 1024**3
PEAK_TFLOPS = 790.0
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


def run(case: str, width: int, height: int, frames: int, steps: int, device: torch.device, i2v: bool) -> dict:
    parts = case.split(":")
    size, opts = parts[0], dict(p.split("=") if "=" in p else (p, "1") for p in parts[1:])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(size, device, dtype)
    if "fp8" in opts:
        from trainer.models.quantize import quantize_blocks

        quantize_blocks(model.repeated_blocks())
    torch.backends.cuda.enable_cudnn_sdp(False) if device.type == "cuda" else None
    model.set_gradient_checkpointing(1.0)
    swap = None
    if "swap" in opts:
        from trainer.models.offload import BlockSwap
        from trainer.prepare import auto_blocks_to_swap

        if "cap" in opts and device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(float(opts["cap"]) * GIB / torch.cuda.get_device_properties(0).total_memory)
        n = auto_blocks_to_swap(model, model.repeated_blocks()) if opts["swap"] == "auto" else int(opts["swap"])
        if "cap" in opts and device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0)
        swap = BlockSwap(model.repeated_blocks(), n, device)
    if "offload" in opts:
        from trainer.models.offload import offload_activations

        offload_activations(model.denoiser)
    net = Network(model.targets(), "lora", rank=16, alpha=16.0).to(device)
    net.attach()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        if "cap" in opts:
            torch.cuda.set_per_process_memory_fraction(float(opts["cap"]) * GIB / torch.cuda.get_device_properties(0).total_memory)
        torch.cuda.reset_peak_memory_stats()
    shape = model.latent_shape(width, height, frames)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(shape, generator=g)
    text = TEXT if size != "tiny" else 16
    mask = torch.ones(1, text)
    mask[:, text // 2:] = 0  # a prompt half the padded length
    cond = {"context": torch.randn(1, text, SIZES[size]["caption"], generator=g).to(device, dtype),
            "attention_mask": mask.to(device)}
    if i2v:
        cond.update(first_frame=latents[:, :, :1].to(device), first_frame_given=torch.ones(1, 1, device=device))
    obj = FlowObjective()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        noise = torch.randn(latents.shape, generator=g)
        sig = torch.sigmoid(torch.randn(1, generator=g))
        x, n_, s = latents.to(device), noise.to(device), sig.to(device)
        noisy = obj.add_noise(x, n_, s)
        known = model.known_latents(cond, x)
        if known is not None:
            noisy = noisy * (1 - known[1]) + known[0] * known[1]
        err = (model.predict(noisy, s, cond).float() - obj.target(x, n_, s)) ** 2
        loss = (err * (1 - known[1])).sum() / (1 - known[1]).expand_as(err).sum() if known is not None else err.mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    tokens = shape[2] * shape[3] * shape[4]
    sps = statistics.median(times[1:] or times)
    tflop = flops_per_step(size, tokens, text) / 1e12
    out = {"case": case + (":i2v" if i2v else ""), "size": f"{width}x{height}x{frames}", "tokens": tokens,
           "s_per_step": round(sps, 3), "steps_s": [round(t, 2) for t in times], "tflop_per_step": round(tflop, 1),
           "mfu": round(tflop / sps / PEAK_TFLOPS, 3) if device.type == "cuda" else None,
           "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if device.type == "cuda" else None,
           "swapped_blocks": len(swap.swapped) if swap else 0, "loss_finite": bool(torch.isfinite(loss).item()),
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0)
    del model, net, opt, swap
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return out


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
    for c in a.case or ["2b", "2b:cap=24", "13b:fp8", "13b:fp8:swap=auto:cap=24"]:
        try:
            print(json.dumps(run(c, a.width, a.height, a.frames, a.steps, device, a.i2v)), flush=True)
        except torch.OutOfMemoryError as e:
            print(json.dumps({"case": c, "error": f"out of memory: {str(e).splitlines()[0]}"}), flush=True)
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
