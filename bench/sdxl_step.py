"""Benchmark: LoRA training steps of the full-size SDXL UNet through the trainer's own code path.

Random weights (built on the GPU in the training dtype, nothing read from disk), wrapped in
`trainer.models.sdxl.SDXLModel`, LoRA rank 16 on every transformer linear the trainer targets (LoCon adds the
resnet convs), gradient checkpointing of every resnet and transformer block (or none), cuDNN SDPA off
(DESIGN.md), AdamW on the network, batch 1, 77 text tokens. The step mirrors trainer/train/loop.py (eps
loss, backward, optimizer step). FLOPs of one step are counted with torch's FlopCounterMode (SDXL fits), so
MFU = FLOP / s / the card's measured bf16 rate (--peak-tflops, 808 measured on the H100, DESIGN.md).

    python3 bench/sdxl_step.py --res 1024 --ckpt 1 0 --type lora locon   # GPU
    python3 bench/sdxl_step.py --tiny                                     # CPU smoke test

Prints one JSON line per case: {"res", "type", "ckpt", "s_per_step", "peak_gib", "tflop_per_step", "mfu", "device"}.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from trainer.demo.sdxl import sdxl_unet_config
from trainer.models.sdxl import SDXLModel, ddpm_sigmas
from trainer.networks.network import Network

GIB = 1024**3
REAL = dict(widths=(320, 640, 1280), layers=2, depths=(0, 2, 10), context=2048, pooled=1280)
TINY = dict(widths=(32, 64, 128), layers=2, depths=(0, 1, 2), context=96, pooled=32)


def build(cfg_kw: dict, device: torch.device, dtype: torch.dtype) -> SDXLModel:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sdxl_unet_config(**cfg_kw))
    unet = unet.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02, generator=g)
            else:
                p.fill_(1.0)
    unet.requires_grad_(False)
    model = object.__new__(SDXLModel)  # the UNet alone: predict() and targets() need nothing else
    model.denoiser, model.device, model.dtype, model.v_pred, model.vae_scale = unet, device, dtype, False, 8
    model.sigma_table = ddpm_sigmas()
    model._log_sigmas = model.sigma_table.double().log()
    return model


def step_fn(model, opt, latents, cond, g):
    """One eps-prediction LoRA step of an SDXL-layout UNet model (SDXL, Kolors) at a timestep of its own table."""
    def step():
        noise = torch.randn(latents.shape, generator=g)
        sig = model.sigma_table[torch.randint(0, len(model.sigma_table), (1,), generator=g)]
        dev = model.device
        x, n, s = latents.to(dev), noise.to(dev), sig.to(dev)
        pred = model.predict(x + s.view(-1, 1, 1, 1) * n, s, cond).float()
        loss = ((pred - n) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def time_unet(model, cond: dict, res: int, net_type: str, ckpt: float, steps: int, device, peak_tflops: float,
              compile_: bool = False) -> dict:
    """The median LoRA step of an SDXL-layout UNet model at res², peak memory and MFU (FLOPs counted by torch);
    shared by this script and kolors_step.py."""
    from torch.utils.flop_counter import FlopCounterMode

    net = Network(model.targets(), net_type, rank=16, alpha=16.0).to(device)
    net.attach()
    model.set_gradient_checkpointing(ckpt)
    if compile_:
        model.compile_blocks()  # as train.compile does: after the network's hooks
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    lat = res // 8
    latents = torch.randn(1, 4, lat, lat, generator=g)
    step = step_fn(model, opt, latents, cond, g)
    if compile_:
        step()  # compile outside the FLOP counter
    with FlopCounterMode(display=False) as fc:
        step()
    flop = fc.get_total_flops()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):  # warm-up (allocator, kernels)
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    s = times[len(times) // 2]
    return {
        "res": res, "type": net_type, "ckpt": ckpt, "compile": compile_, "s_per_step": round(s, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if device.type == "cuda" else None,
        "tflop_per_step": round(flop / 1e12, 2), "mfu": round(flop / s / (peak_tflops * 1e12), 3),
        "layers": len(net.targets), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }


def run(cfg_kw: dict, res: int, net_type: str, ckpt: float, steps: int, device, dtype, peak_tflops: float,
        compile_: bool = False) -> dict:
    model = build(cfg_kw, device, dtype)
    g = torch.Generator().manual_seed(2)
    cond = {"crossattn": torch.randn(1, 77, cfg_kw["context"], generator=g),
            "pooled": torch.randn(1, cfg_kw["pooled"], generator=g)}
    return time_unet(model, cond, res, net_type, ckpt, steps, device, peak_tflops, compile_)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", nargs="+", type=int, default=[1024])
    ap.add_argument("--type", nargs="+", default=["lora"])
    ap.add_argument("--ckpt", nargs="+", type=float, default=[1.0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=808.0)
    ap.add_argument("--compile", action="store_true", help="regional torch.compile of the blocks (train.compile)")
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    cfg = REAL
    if a.tiny:
        cfg, a.res, a.steps = TINY, [64], 2
    device = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
    for r in a.res:
        for t in a.type:
            for c in a.ckpt:
                print(json.dumps(run(cfg, r, t, c, a.steps, device, dtype, a.peak_tflops, a.compile)), flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
