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
import statistics
import time

import torch

from trainer.models.hidream import VARIANTS, HiDreamModel
from trainer.models.hidream_layout import ROPE_AXES, llama_layer_of_blocks
from trainer.models.objectives import FlowObjective
from trainer.networks.network import Network, select_targets

GIB = 1024**3
PEAK_TFLOPS = 790.0
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

    with torch.device("meta"):
        model = HiDreamImageTransformer2DModel(**config(size))
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.data = p.data.to(dtype)
            if p.dim() >= 2:
                p.normal_(0, p.shape[1] ** -0.5, generator=g)
            else:
                p.fill_(1.0 if "norm" in name else 0.0)
    model.requires_grad_(False).eval()
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


def run(case: str, width: int, height: int, steps: int, device: torch.device) -> dict:
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
    targets = select_targets(model.targets(), [], [])
    net = Network(targets, "lora", rank=16, alpha=16.0).to(device)
    net.attach()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        if "cap" in opts:
            torch.cuda.set_per_process_memory_fraction(float(opts["cap"]) * GIB / torch.cuda.get_device_properties(0).total_memory)
        torch.cuda.reset_peak_memory_stats()
    s = SIZES[size]
    shape = model.latent_shape(width, height)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(shape, generator=g)
    cond = {"t5": torch.randn(1, s["text"], s["t5"], generator=g).to(device, dtype),
            "llama": torch.randn(1, s["llama_layers"], s["text"], s["llama"], generator=g).to(device, dtype),
            "pooled": torch.randn(1, s["pooled"], generator=g).to(device, dtype)}
    obj = FlowObjective()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        noise = torch.randn(latents.shape, generator=g)
        sig = torch.sigmoid(torch.randn(1, generator=g))
        x, n_, sg = latents.to(device), noise.to(device), sig.to(device)
        pred = model.predict(obj.add_noise(x, n_, sg), sg, cond).float()
        loss = ((pred - obj.target(x, n_, sg)) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    tokens = (shape[2] // 2) * (shape[3] // 2)
    sps = statistics.median(times[1:] or times)
    tflop = flops_per_step(size, tokens) / 1e12
    out = {"case": case, "size": f"{width}x{height}", "tokens": tokens, "s_per_step": round(sps, 3),
           "steps_s": [round(t, 2) for t in times], "tflop_per_step": round(tflop, 1),
           "mfu": round(tflop / sps / PEAK_TFLOPS, 3) if device.type == "cuda" else None,
           "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if device.type == "cuda" else None,
           "swapped_blocks": len(swap.swapped) if swap else 0, "lora_targets": len(targets),
           "loss_finite": bool(torch.isfinite(loss).item()),
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0)
    del model, net, opt, swap
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return out


def swap_check(device: torch.device) -> dict:
    """On the card: block swap (2 of 4 blocks, prefetch on the side stream) gives the loss and LoRA gradients of the
    model held whole, for one training step (checkpointed) and one no-grad forward (the experts' routing included)."""
    from trainer.models.offload import BlockSwap

    dtype = torch.bfloat16
    model = build("check", device, dtype)
    model.set_gradient_checkpointing(1.0)
    targets = select_targets(model.targets(), [], [])
    net = Network(targets, "lora", rank=16, alpha=16.0).to(device)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    net.attach()
    s = SIZES["check"]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(model.latent_shape(1024, 768), generator=g).to(device)
    cond = {"t5": torch.randn(1, 128, 4096, generator=g).to(device, dtype),
            "llama": torch.randn(1, s["llama_layers"], 128, 4096, generator=g).to(device, dtype),
            "pooled": torch.randn(1, 2048, generator=g).to(device, dtype)}
    sg = torch.tensor([0.6], device=device)

    def one() -> tuple[float, dict, torch.Tensor]:
        net.zero_grad(set_to_none=True)
        loss = model.predict(x, sg, cond).float().pow(2).mean()
        loss.backward()
        with torch.no_grad():
            out = model.predict(x, sg, cond).float()
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
        print(json.dumps(swap_check(device)), flush=True)
        torch.cuda.empty_cache()
    for c in a.case or ["full:fp8:swap=auto:cap=24", "full:fp8:swap=auto:offload:cap=24"]:
        try:
            print(json.dumps(run(c, a.width, a.height, a.steps, device)), flush=True)
        except torch.OutOfMemoryError as e:
            print(json.dumps({"case": c, "error": f"out of memory: {str(e).splitlines()[0]}"}), flush=True)
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
