"""Experiment (issue 13's first lever): the SDXL LoRA step captured whole in a CUDA graph, beside the eager step.

SDXL at batch 1 is bound by kernel launches and Python (722 hooked layers, 15-21 TFLOP a step, 3-4% MFU): a CUDA
graph replays the forward, the backward and the optimizer step with one launch. What is captured: the UNet's call
on static device buffers (scaled input, timestep, text, pooled, size ids), the eps loss, backward, and a capturable
AdamW step over the LoRA parameters; what stays outside: drawing the noise and the timestep, the sigma -> timestep
lookup, and copying them into the buffers (as a trainer would do per step). Same random full-size UNet as
bench/sdxl_step.py. The graph's losses and LoRA weights after N steps are compared with the eager step's from the
same start and the same inputs (they must agree within bf16 noise), so a capture that replays the wrong thing
shows.

    python3 bench/sdxl_graph_step.py --ckpt 0 1      # GPU
    python3 bench/sdxl_graph_step.py --check --res 512 --steps 4   # GPU, fp32: the agreement alone
    python3 bench/sdxl_graph_step.py --tiny          # CPU: eager only (no graphs on the CPU), a smoke test

Prints one JSON line per case: {"ckpt", "mode", "s_per_step", "peak_gib", ...} and the agreement (FLOPs per step:
bench/sdxl_step.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from sdxl_step import REAL, TINY, build
from trainer.models.sdxl import NUM_TIME_IDS
from trainer.networks.network import Network

GIB = 1024**3


def _inputs(model, res: int, steps: int, cfg_kw: dict, device: torch.device) -> list[dict]:
    """Per step: the UNet's inputs as predict_unet makes them, and the noise (the eps target), on the device."""
    g = torch.Generator().manual_seed(1)
    lat = res // 8
    latents = torch.randn(1, 4, lat, lat, generator=g)
    text = torch.randn(1, 77, cfg_kw["context"], generator=g).to(device, model.dtype)
    pooled = torch.randn(1, cfg_kw["pooled"], generator=g).to(device, model.dtype)
    ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32).expand(1, NUM_TIME_IDS).to(device, model.dtype)
    out = []
    for _ in range(steps):
        noise = torch.randn(latents.shape, generator=g)
        s = model.sigma_table[torch.randint(0, len(model.sigma_table), (1,), generator=g)].float()
        t = model.sigma_to_t(s)
        x = ((latents + s.view(-1, 1, 1, 1) * noise) * torch.rsqrt(s ** 2 + 1).view(-1, 1, 1, 1))
        out.append({"x": x.to(device, model.dtype), "t": t.to(device), "text": text, "pooled": pooled, "ids": ids,
                    "noise": noise.to(device)})
    return out


def _loss(unet, b: dict) -> torch.Tensor:
    pred = unet(b["x"], b["t"], encoder_hidden_states=b["text"],
                added_cond_kwargs={"text_embeds": b["pooled"], "time_ids": b["ids"]}, return_dict=False)[0]
    return ((pred.float() - b["noise"]) ** 2).mean()


def eager(model, net, opt, batches: list[dict], device) -> tuple[list[float], list[float]]:
    losses, times = [], []
    for b in batches:
        t0 = time.perf_counter()
        loss = _loss(model.denoiser, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return [float(v) for v in losses], times


def graphed(model, net, opt, batches: list[dict], device, warmup: int = 3) -> tuple[list[float], list[float]]:
    """Warm-up steps on a side stream (as torch.cuda.graph needs), one capture, then a replay per batch."""
    static = {k: v.clone() for k, v in batches[0].items()}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up steps: these train too, on the first batch
        for _ in range(warmup):
            loss = _loss(model.denoiser, static)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = _loss(model.denoiser, static)
        static_loss.backward()
        opt.step()
    losses, times = [], []
    for b in batches:
        t0 = time.perf_counter()
        for k, v in b.items():
            static[k].copy_(v)
        graph.replay()
        losses.append(static_loss.detach().clone())
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return [float(v) for v in losses], times


def run(cfg_kw: dict, res: int, ckpt: float, steps: int, device, dtype) -> list[dict]:
    model = build(cfg_kw, device, dtype)
    model.set_gradient_checkpointing(ckpt)
    net = Network(model.targets(), "lora", rank=16, alpha=16.0).to(device)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.01)
    start = copy.deepcopy(net.state_dict())
    net.attach()
    batches = _inputs(model, res, steps, cfg_kw, device)
    modes = ["eager", "graph"] if device.type == "cuda" else ["eager"]
    out, ends = [], {}
    for mode in modes:
        net.load_state_dict(start)
        # capturable: the step count and lr live on the device, so the graph's optimizer step advances them
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, capturable=mode == "graph")
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        try:
            if mode == "eager":
                eager(model, net, opt, batches[:1] * 3, device)  # the graph's warm-up: 3 steps on the first batch
                losses, times = eager(model, net, opt, batches, device)
            else:
                losses, times = graphed(model, net, opt, batches, device)
        except Exception as e:  # a capture that fails says how, and the other mode still reports
            out.append({"res": res, "ckpt": ckpt, "mode": mode, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        ends[mode] = (losses, {k: v.detach().float().clone() for k, v in net.state_dict().items()})
        s = sorted(times[1:])[len(times[1:]) // 2]
        out.append({"res": res, "ckpt": ckpt, "mode": mode, "s_per_step": round(s, 4),
                    "steps_s": [round(t, 3) for t in times],
                    "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if device.type == "cuda" else None,
                    "layers": len(net.targets),
                    "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch": torch.__version__})
        del opt
    if len(ends) == 2:
        (le, we), (lg, wg) = ends["eager"], ends["graph"]
        rel = max(float((wg[k] - we[k]).norm() / we[k].norm().clamp_min(1e-12)) for k in we)
        out.append({"res": res, "ckpt": ckpt, "agreement": {"loss_rel_max": max(abs(a - b) / abs(a) for a, b in
                                                                                 zip(le, lg)),
                                                           "lora_weight_rel_max": rel}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--ckpt", nargs="+", type=float, default=[0.0, 1.0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--check", action="store_true",
                    help="fp32 (TF32 off) at --res: the graph's losses and weights against the eager step's")
    a = ap.parse_args()
    cfg = TINY if a.tiny else REAL
    if a.tiny:
        a.res, a.steps, a.ckpt = 64, 3, [0.0]
    device = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" and not a.check else torch.float32
    if a.check:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
    for c in a.ckpt:
        for line in run(cfg, a.res, c, a.steps, device, dtype):
            print(json.dumps(line), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
