"""What every training-step benchmark shares: a case string (`14b:fp8:swap=auto:offload:cap=24`), the prepare
step's memory components applied to a model built at full size with random weights, timed LoRA steps as the loop
takes them (given frames put in and left out of the loss, the family's training guidance), one JSON result, and the
block-swap equality check. The per-family scripts (wan_step.py, hunyuan_video_step.py, ltxv_step.py,
hidream_step.py) only build their model, conditioning and analytic FLOPs.

Case options: `ckpt=F` (the fraction of blocks checkpointed, default 1), `compile` (train.compile), `fp8`
(model.quantize: block linears in fp8), `swap=N|auto` (train.blocks_to_swap; auto sized under
the cap for this size), `offload` (train.offload_activations), `cap=G` (torch.cuda.set_per_process_memory_fraction
at G GiB, set after the weights were built and swapped out, so the peak is the training's, as when the CLI loads on
the CPU).
"""

from __future__ import annotations

import gc
import json
import math
import statistics
import time
from typing import Callable

import torch

from trainer.models.base import Conditioning, TrainingModel
from trainer.models.objectives import FlowObjective
from trainer.networks.network import Network, select_targets

GIB = 1024**3
PEAK_TFLOPS = 790.0


def random_frozen(cls, cfg: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """`cls(**cfg)` built on the meta device and filled on `device` in `dtype` with random weights of sane scale
    (matrices and kernels normal / sqrt(fan in), norm scales 1, other vectors 0), frozen, in eval mode."""
    with torch.device("meta"):
        model = cls(**cfg)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.data = p.data.to(dtype)
            if p.dim() >= 2:
                p.normal_(0, p[0].numel() ** -0.5, generator=g)
            else:
                p.fill_(1.0 if "norm" in name else 0.0)
    return model.requires_grad_(False).eval()


def parse_case(case: str) -> tuple[str, dict[str, str]]:
    """`size:opt:opt=value` -> (size, {opt: value}); a bare option is "1"."""
    parts = case.split(":")
    return parts[0], dict(p.split("=", 1) if "=" in p else (p, "1") for p in parts[1:])


def _cap(opts: dict, device: torch.device, on: bool) -> None:
    if "cap" in opts and device.type == "cuda":
        torch.cuda.empty_cache()
        gib = float(opts["cap"]) if on else None
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(gib * GIB / total if gib else 1.0)


def prepare_memory(model: TrainingModel, opts: dict, device: torch.device, largest: tuple[int, int, int]):
    """fp8 blocks, every block checkpointed, block swap (auto: sized under the cap for `largest`, as the CLI sizes
    it), activation offload; the BlockSwap or None."""
    from trainer.models.offload import BlockSwap, offload_activations
    from trainer.models.quantize import quantize_blocks
    from trainer.prepare import activation_bytes, auto_blocks_to_swap

    if "fp8" in opts:
        quantize_blocks(model.repeated_blocks())
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)  # as the prepare step does (NaN / illegal access on H100/H200)
    model.set_gradient_checkpointing(float(opts.get("ckpt", 1.0)))
    swap = None
    if "swap" in opts:
        blocks = model.repeated_blocks()
        if opts["swap"] == "auto":
            _cap(opts, device, True)
            n = auto_blocks_to_swap(model, blocks, activation_bytes(model, blocks, largest, 1, "offload" in opts))
            _cap(opts, device, False)
        else:
            n = int(opts["swap"])
        swap = BlockSwap(blocks, n, device)
    if "offload" in opts:
        offload_activations(model.denoiser)
    return swap


def time_steps(model: TrainingModel, case: str, size: tuple[int, int, int], cond: Conditioning, steps: int,
               device: torch.device, flops: Callable[[int], float], **extra) -> dict:
    """`steps` LoRA r16 AdamW steps at (width, height, frames) on random latents; the median step after the first,
    peak memory, MFU from `flops(tokens)`. `extra` goes into the result as it is."""
    _, opts = parse_case(case)
    swap = prepare_memory(model, opts, device, size)
    targets = select_targets(model.targets(), [], [])
    net = Network(targets, "lora", rank=16, alpha=16.0).to(device)
    net.attach()
    if "compile" in opts:  # train.compile: regional compile after the network's hooks are attached
        model.compile_blocks()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    if device.type == "cuda":
        _cap(opts, device, True)
        torch.cuda.reset_peak_memory_stats()
    shape = model.latent_shape(*size)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(shape, generator=g)
    obj = FlowObjective()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        noise = torch.randn(latents.shape, generator=g)
        sig = torch.sigmoid(torch.randn(1, generator=g))
        x, n_, s = latents.to(device), noise.to(device), sig.to(device)
        noisy = obj.add_noise(x, n_, s)
        known = model.known_latents(cond, x)
        if known is not None:  # as the loop: given frames go in clean and leave the loss
            values, given = (t.to(x.device, x.dtype) for t in known)
            noisy = noisy * (1 - given) + values * given
        err = (model.predict(noisy, s, cond, guidance=model.train_guidance).float() - obj.target(x, n_, s)) ** 2
        loss = err.mean() if known is None else (err * (1 - given)).sum() / (1 - given).expand_as(err).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    tokens = math.prod(shape[2:]) // model.patch ** 2
    sps = statistics.median(times[1:] or times)
    tflop = flops(tokens) / 1e12
    out = {"case": case, "size": "x".join(str(v) for v in (size if size[2] > 1 else size[:2])), "tokens": tokens,
           "s_per_step": round(sps, 3), "steps_s": [round(t, 2) for t in times], "tflop_per_step": round(tflop, 1),
           "mfu": round(tflop / sps / PEAK_TFLOPS, 3) if device.type == "cuda" else None,
           "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if device.type == "cuda" else None,
           "swapped_blocks": len(swap.swapped) if swap else 0, "lora_targets": len(net.targets),
           "loss_finite": bool(torch.isfinite(loss).item()), **extra,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
    _cap(opts, device, False)
    del net, opt, swap
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def swap_check(model: TrainingModel, size: tuple[int, int, int], cond: Conditioning, device: torch.device) -> dict:
    """On the card: block swap (2 blocks, prefetch on the side stream) gives the loss and LoRA gradients of the model
    held whole, for one training step (checkpointed) and one no-grad forward."""
    from trainer.models.offload import BlockSwap

    model.set_gradient_checkpointing(1.0)
    net = Network(select_targets(model.targets(), [], []), "lora", rank=16, alpha=16.0).to(device)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    net.attach()
    x = torch.randn(model.latent_shape(*size), generator=torch.Generator().manual_seed(3)).to(device)
    s = torch.tensor([0.6], device=device)

    def one() -> tuple[float, dict, torch.Tensor]:
        net.zero_grad(set_to_none=True)
        loss = model.predict(x, s, cond, guidance=model.train_guidance).float().pow(2).mean()
        loss.backward()
        with torch.no_grad():
            out = model.predict(x, s, cond, guidance=model.train_guidance).float()
        return float(loss.detach()), {n: p.grad.float().clone() for n, p in net.named_parameters()}, out

    l0, g0, o0 = one()
    swap = BlockSwap(model.repeated_blocks(), 2, device)
    l1, g1, o1 = one()
    rel = max(float((g1[k] - g0[k]).norm() / g0[k].norm().clamp_min(1e-12)) for k in g0)
    return {"case": "swap_check", "loss_rel_err": abs(l1 - l0) / abs(l0), "grad_rel_err_max": rel,
            "out_rel_err": float((o1 - o0).abs().max() / o0.abs().max()), "max_resident": swap.max_resident,
            "loads": swap.loads}


def run_cases(cases: list[str], run: Callable[[str], dict]) -> None:
    """One JSON line per case; a case out of memory says so and the next one starts clean."""
    for c in cases:
        gc.collect()  # the last case's model sits in reference cycles (hooks): free it before sizing the swap
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        try:
            print(json.dumps(run(c)), flush=True)
        except torch.OutOfMemoryError as e:
            print(json.dumps({"case": c, "error": f"out of memory: {str(e).splitlines()[0]}"}), flush=True)
            if torch.cuda.is_available():
                torch.cuda.set_per_process_memory_fraction(1.0)
                torch.cuda.empty_cache()
