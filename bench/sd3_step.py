"""Benchmark: LoRA training steps of full-size SD 3.5 transformers through the trainer's own code path.

Random weights (built on the GPU in the training dtype, nothing read from disk), wrapped in
`trainer.models.sd3.SD3Model`, LoRA rank 16 on every block linear the trainer targets, gradient checkpointing of
all blocks, cuDNN SDPA off (DESIGN.md), AdamW on the LoRA parameters, batch 1, cached-embedding-sized text
(77 CLIP + 256 T5 tokens). The step mirrors trainer/train/loop.py (flow loss, backward, optimizer step).

    python3 bench/sd3_step.py --variant large medium --res 1024     # GPU
    python3 bench/sd3_step.py --tiny                                 # CPU smoke test

Prints one JSON line per (variant, resolution): {"variant", "res", "s_per_step", "peak_gib", "params_b", "device"}.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from trainer.models.objectives import FlowObjective
from trainer.demo.sd3 import sd3_diffusers_config
from trainer.models.sd3 import SD3Model, use_original_modulation_order
from trainer.networks.network import Network

GIB = 1024**3
VARIANTS = {
    "large": dict(hidden=2432, head_dim=64, layers=38, joint_dim=4096, pooled=2048, dual=(), pos_max=192),
    "medium": dict(hidden=1536, head_dim=64, layers=24, joint_dim=4096, pooled=2048, dual=tuple(range(13)), pos_max=384),
    "tiny": dict(hidden=64, head_dim=32, layers=2, joint_dim=32, pooled=32, dual=(0,), pos_max=64),
}


def build(variant: str, device: torch.device, dtype: torch.dtype) -> SD3Model:
    from diffusers import SD3Transformer2DModel

    cfg = sd3_diffusers_config(**VARIANTS[variant])
    with torch.device("meta"):
        model = SD3Transformer2DModel(**cfg)
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g) if p.dim() >= 2 else p.fill_(1.0 if p.numel() else 0.0)
    model = use_original_modulation_order(model).requires_grad_(False)
    return SD3Model(model, None, None, None, None, None, None, None, 256, device, dtype)


def run(variant: str, res: int, steps: int, device: torch.device, dtype: torch.dtype) -> dict:
    model = build(variant, device, dtype)
    net = Network(model.targets(), "lora", rank=16, alpha=16.0).to(device)
    net.attach()
    model.set_gradient_checkpointing(1.0)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    cfg = model.denoiser.config
    lat = res // 8
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, lat, lat, generator=g)
    cond = {"context": torch.randn(1, 77 + 256, cfg.joint_attention_dim, generator=g),
            "pooled": torch.randn(1, cfg.pooled_projection_dim, generator=g)}
    obj = FlowObjective()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        t0 = time.perf_counter()
        noise = torch.randn(latents.shape, generator=g)
        sig = torch.rand(1, generator=g)
        x, n, s = latents.to(device), noise.to(device), sig.to(device)
        pred = model.predict(obj.add_noise(x, n, s), s, cond).float()
        loss = ((pred - obj.target(x, n, s)) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    steady = times[1:] or times
    return {
        "variant": variant, "res": res, "s_per_step": round(sum(steady) / len(steady), 3),
        "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if device.type == "cuda" else None,
        "params_b": round(sum(p.numel() for p in model.denoiser.parameters()) / 1e9, 2),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", nargs="+", default=["large", "medium"])
    ap.add_argument("--res", nargs="+", type=int, default=[1024])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    if a.tiny:
        a.variant, a.res, a.steps = ["tiny"], [64], 2
    device = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
    for v in a.variant:
        for r in a.res:
            print(json.dumps(run(v, r, a.steps, device, dtype)), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
