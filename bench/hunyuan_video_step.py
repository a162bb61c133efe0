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
import statistics
import time

import torch

from trainer.models.hunyuan_video import HunyuanVideoModel
from trainer.models.objectives import FlowObjective
from trainer.networks.network import Network, select_targets

GIB = 1024**3
PEAK_TFLOPS = 790.0
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
    with torch.device("meta"):
        model = HunyuanVideoTransformer3DModel(**cfg)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.data = p.data.to(dtype)
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.normal_(0, fan_in ** -0.5, generator=g)
            else:
                p.fill_(1.0 if "norm" in name else 0.0)
    model.requires_grad_(False)
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


def run(case: str, width: int, height: int, frames: int, steps: int, text: int, device: torch.device) -> dict:
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
    net = Network(select_targets(model.targets(), [], []), "lora", rank=16, alpha=16.0).to(device)
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
    cfg = model.denoiser.config
    mask = torch.zeros(1, 256)
    mask[:, :text] = 1.0
    cond = {"context": torch.randn(1, 256, cfg.text_embed_dim, generator=g).to(device, dtype), "mask": mask.to(device),
            "pooled": torch.randn(1, 768, generator=g).to(device, dtype)}
    obj = FlowObjective()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        noise = torch.randn(latents.shape, generator=g)
        sig = torch.sigmoid(torch.randn(1, generator=g))
        x, n_, s = latents.to(device), noise.to(device), sig.to(device)
        pred = model.predict(obj.add_noise(x, n_, s), s, cond, guidance=model.train_guidance).float()
        loss = ((pred - obj.target(x, n_, s)) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    tokens = shape[2] * (shape[3] // 2) * (shape[4] // 2)
    sps = statistics.median(times[1:] or times)
    tflop = flops_per_step(size, tokens, text) / 1e12
    out = {"case": case, "size": f"{width}x{height}x{frames}", "tokens": tokens, "text_tokens": text,
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


def swap_check(device: torch.device) -> dict:
    """On the card: block swap (2 of 4 blocks, prefetch on the side stream) gives the loss and LoRA gradients of the
    model held whole, for one training step (checkpointed) and one no-grad forward."""
    from trainer.models.offload import BlockSwap

    dtype = torch.bfloat16
    model = build("check", device, dtype)
    model.set_gradient_checkpointing(1.0)
    net = Network(select_targets(model.targets(), [], []), "lora", rank=16, alpha=16.0).to(device)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    net.attach()
    shape = model.latent_shape(960, 544, 17)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g).to(device)
    cond = {"context": torch.randn(1, 256, 4096, generator=g).to(device, dtype), "mask": torch.ones(1, 256, device=device),
            "pooled": torch.randn(1, 768, generator=g).to(device, dtype)}
    s = torch.tensor([0.6], device=device)

    def one() -> tuple[float, dict, torch.Tensor]:
        net.zero_grad(set_to_none=True)
        loss = model.predict(x, s, cond, guidance=1.0).float().pow(2).mean()
        loss.backward()
        with torch.no_grad():
            out = model.predict(x, s, cond, guidance=1.0).float()
        return float(loss.detach()), {n: p.grad.float().clone() for n, p in net.named_parameters()}, out

    l0, g0, o0 = one()
    swap = BlockSwap(model.repeated_blocks(), 2, device)
    l1, g1, o1 = one()
    rel = max(float((g1[k] - g0[k]).norm() / g0[k].norm().clamp_min(1e-12)) for k in g0)
    return {"case": "swap_check", "loss_rel_err": abs(l1 - l0) / abs(l0), "grad_rel_err_max": rel,
            "out_rel_err": float((o1 - o0).abs().max() / o0.abs().max()), "max_resident": swap.max_resident,
            "loads": swap.loads}


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
        print(json.dumps(swap_check(device)), flush=True)
        torch.cuda.empty_cache()
    for c in a.case or ["13b:bf16", "13b:bf16:cap=24", "13b:fp8:swap=auto:cap=24", "13b:fp8:swap=auto:offload:cap=24"]:
        try:
            print(json.dumps(run(c, a.width, a.height, a.frames, a.steps, a.text, device)), flush=True)
        except torch.OutOfMemoryError as e:
            print(json.dumps({"case": c, "error": f"out of memory: {str(e).splitlines()[0]}"}), flush=True)
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
