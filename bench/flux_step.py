"""Benchmark: one LoRA training step of a full-size FLUX.1-dev transformer through the trainer's own code path.

Random weights (bf16, built on the GPU, nothing read from disk), wrapped in `trainer.models.flux.FluxModel`,
LoRA from `trainer.networks.network.Network` (rank 16, alpha 16, every block linear the trainer targets),
gradient checkpointing on, cuDNN SDPA off, AdamW on the LoRA parameters, batch 1, text length 512.
The step mirrors `trainer/train/loop.py` (`Trainer._loss` + `Trainer.step`).

    python3 bench/flux_step.py --res 512 1024          # GPU, full size
    python3 bench/flux_step.py --tiny                  # CPU smoke test with a tiny config

Prints one JSON line per resolution:
    {"res", "s_per_step", "peak_gib", "tflop_per_step", "bf16_tflops", "mfu", "device", ...}

FLOP accounting (analytic, per step, batch 1; T = image tokens (H/16 * W/16) + text tokens):
  forward, per linear: 2 * in * out * rows, rows = image tokens (double-block img stream, x_embedder,
  proj_out), text tokens (double-block txt stream, context_embedder), T (single blocks), 1 (adaLN / time
  embedders); attention per block 4 * T^2 * hidden (QK^T and PV).
  Training step = forward x multiplier, with multipliers chosen per part:
    * linears inside the checkpointed blocks: x3 = forward + recomputed forward + input-gradient only
      (the base weights are frozen, so no weight-gradient matmul);
    * attention: x4.5 = forward + recompute + backward (flash backward is 5 matmuls of the forward's 2, 2.5x);
    * proj_out / norm_out (not checkpointed, grads flow through): x2; embedders whose inputs and weights
      need no grad (x_embedder, context_embedder, time/text embedders): x1;
    * LoRA matmuls: x4 (forward, recompute, input grad, weight grad); under 1% of the total.
  This is what torch's FlopCounterMode counts for such a step; it gives the ~247 TFLOP at 1024^2 quoted in
  DESIGN.md. The cruder "4 x forward" is reported too, as tflop_per_step_x4.
MFU = tflop_per_step / s_per_step / (bf16 matmul rate measured in the same run: 8192^3, mean of 10).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from types import SimpleNamespace

import torch

from trainer.models import tiny
from trainer.models.flux import FluxModel
from trainer.networks.network import Network

GIB = 1024**3


def build_config(is_tiny: bool) -> dict:
    if is_tiny:
        return tiny.flux_diffusers_config(hidden=128, head_dim=32, double=2, single=2, context_dim=64,
                                          pooled_dim=32, guidance=True)
    return tiny.flux_diffusers_config(hidden=3072, head_dim=128, double=19, single=38, context_dim=4096,
                                      pooled_dim=768, guidance=True)


@torch.no_grad()
def random_transformer(cfg: dict, device: str, dtype: torch.dtype, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**cfg)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1 and ".norm" in name and name.endswith(".weight"):
            p.fill_(1.0)  # RMSNorm weights (norm_q / norm_k / norm_added_*)
        elif p.dim() == 1:
            p.zero_()  # biases
        else:
            p.normal_(0.0, 0.02, generator=gen)
    for b in model.buffers():
        if b.is_floating_point():
            b.zero_()
    model.requires_grad_(False)
    model.eval()
    return model


def make_model(cfg: dict, device: str, dtype: torch.dtype, txt_len: int) -> FluxModel:
    transformer = random_transformer(cfg, device, dtype)
    # FluxModel reads only vae.config.block_out_channels (pixel_factor = 2**(len-1) * 2 = 16 for Flux's 4-level VAE)
    vae = SimpleNamespace(config=SimpleNamespace(block_out_channels=[128, 256, 512, 512]))
    return FluxModel(transformer, vae, None, None, None, None, txt_len, torch.device(device), dtype)


# --- FLOPs ------------------------------------------------------------------------------------------
def linear_rows(name: str, img: int, txt: int) -> tuple[int, str]:
    """Rows (tokens) a Flux linear sees per sample, and its kind ('block', 'head', 'embed')."""
    if name.startswith("transformer_blocks."):
        if ".norm1" in name:  # adaLN modulation on temb
            return 1, "block"
        if ".attn.add_" in name or ".to_add_out" in name or ".ff_context." in name:
            return txt, "block"
        return img, "block"
    if name.startswith("single_transformer_blocks."):
        return (1 if ".norm." in name else img + txt), "block"
    if name in ("proj_out",):
        return img, "head"
    if name.startswith("norm_out."):
        return 1, "head"
    if name == "x_embedder":
        return img, "embed"
    if name == "context_embedder":
        return txt, "embed"
    if name.startswith("time_text_embed."):
        return 1, "embed"
    raise ValueError(f"unclassified linear {name}")


MULT = {"block": 3.0, "head": 2.0, "embed": 1.0, "attn": 4.5, "lora": 4.0}


def step_flops(model: FluxModel, network: Network, res: int, txt: int) -> dict:
    tr = model.denoiser
    cfg = tr.config
    img = (res // 16) ** 2
    tokens = img + txt
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    fwd = {"block": 0.0, "head": 0.0, "embed": 0.0, "attn": 0.0, "lora": 0.0}
    for name, m in tr.named_modules():
        if isinstance(m, torch.nn.Linear):
            rows, kind = linear_rows(name, img, txt)
            fwd[kind] += 2.0 * m.in_features * m.out_features * rows
    fwd["attn"] = 4.0 * tokens**2 * hidden * (cfg.num_layers + cfg.num_single_layers)
    rank = network.rank
    for t in network.targets.values():
        for mem in t.members:
            rows, _ = linear_rows(_module_name(tr, mem.module), img, txt)
            out_rows = mem.rows.stop - mem.rows.start
            fwd["lora"] += 2.0 * rows * rank * (t.in_features + out_rows)  # down is applied once per member
    total = sum(MULT[k] * v for k, v in fwd.items())
    fwd_total = sum(fwd.values())
    return {"fwd": fwd_total, "step": total, "step_x4": 4.0 * fwd_total, "parts": fwd}


_NAMES: dict[int, str] = {}


def _module_name(root: torch.nn.Module, mod: torch.nn.Module) -> str:
    if not _NAMES:
        _NAMES.update({id(m): n for n, m in root.named_modules()})
    return _NAMES[id(mod)]


def check_rows_with_hooks(model: FluxModel, res: int, txt: int) -> None:
    """Tiny mode: the row counts assumed above equal what each linear really sees in a forward."""
    tr = model.denoiser
    img = (res // 16) ** 2
    seen, handles = {}, []
    for name, m in tr.named_modules():
        if isinstance(m, torch.nn.Linear):
            handles.append(m.register_forward_hook(
                lambda mod, a, o, name=name: seen.__setitem__(name, a[0].numel() // a[0].shape[-1])))
    with torch.no_grad():
        inputs = step_inputs(model, res, txt, torch.Generator().manual_seed(1))
        model.predict(inputs[1], inputs[3], inputs[4], guidance=1.0)
    for h in handles:
        h.remove()
    for name, rows in seen.items():
        want, _ = linear_rows(name, img, txt)
        assert rows == want, (name, rows, want)
    print(f"# row counts of {len(seen)} linears match the analytic rules", flush=True)


# --- the step (mirrors trainer/train/loop.py) -----------------------------------------------------------
def step_inputs(model: FluxModel, res: int, txt: int, gen: torch.Generator):
    c = model.latent_channels()
    cfg = model.denoiser.config
    latents = torch.randn(1, c, res // 8, res // 8, generator=gen).float()  # cached latents live on the CPU
    cond = {"t5": torch.randn(1, txt, cfg.joint_attention_dim, generator=gen),
            "pooled": torch.randn(1, cfg.pooled_projection_dim, generator=gen)}
    noise = torch.randn(latents.shape, generator=gen)
    sigmas = torch.sigmoid(torch.randn(1, generator=gen)).clamp(1e-4, 1.0)
    dev = model.device
    latents, noise, sigmas = latents.to(dev), noise.to(dev), sigmas.to(dev)
    noisy = model.objective.add_noise(latents, noise, sigmas)
    return latents, noisy, noise, sigmas, cond


def train_step(model: FluxModel, params, optimizer, res: int, txt: int, gen: torch.Generator, max_grad_norm: float) -> float:
    latents, noisy, noise, sigmas, cond = step_inputs(model, res, txt, gen)
    pred = model.predict(noisy, sigmas, cond, guidance=1.0).float()
    target = model.objective.target(latents, noise, sigmas)
    loss = ((pred - target) ** 2).mean(dim=tuple(range(1, pred.dim()))).mean()
    value = float(loss.detach())  # the loop reads the loss (a sync) before backward
    loss.backward()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return value


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_rate(device: str, dtype: torch.dtype, n: int, warmup: int = 3, reps: int = 10) -> float:
    """TFLOP/s of an n^3 matmul on random data (mean over reps)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(warmup):
        c = a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        c = a @ b
    sync(device)
    dt = (time.perf_counter() - t0) / reps
    del a, b, c
    return 2.0 * n**3 / dt / 1e12


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--txt", type=int, default=None, help="text tokens (512 full, 32 tiny)")
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="trainer default 1.0; 0 disables clipping")
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny config")
    args = ap.parse_args()

    device = "cpu" if args.tiny else "cuda"
    dtype = torch.bfloat16
    txt = args.txt or (32 if args.tiny else 512)
    res_list = [64, 128] if args.tiny and args.res == [512, 1024] else args.res
    if device == "cuda":
        # as trainer/job.py does: cuDNN's SDPA backward fails on Flux-sized attention on this H100
        torch.backends.cuda.enable_cudnn_sdp(False)
        dev_name = torch.cuda.get_device_name()
    else:
        dev_name = "cpu"

    rate = matmul_rate(device, dtype, 512 if args.tiny else 8192)
    print(f"# bf16 matmul: {rate:.1f} TFLOP/s on {dev_name}", flush=True)

    t0 = time.perf_counter()
    model = make_model(build_config(args.tiny), device, dtype, txt)
    if not args.no_checkpointing:
        model.denoiser.enable_gradient_checkpointing()
    network = Network(model.targets(), "lora", rank=args.rank, alpha=args.rank).to(device).attach()
    model.set_train_hooks(True)
    network.train()
    params = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    sync(device)
    n_base = sum(p.numel() for p in model.denoiser.parameters())
    n_lora = sum(p.numel() for p in params)
    print(f"# built in {time.perf_counter() - t0:.1f} s: transformer {n_base / 1e9:.3f}B params, "
          f"LoRA {n_lora / 1e6:.2f}M params over {len(network.targets)} targets", flush=True)
    if args.tiny:
        check_rows_with_hooks(model, res_list[0], txt)

    gen = torch.Generator().manual_seed(0)
    for res in res_list:
        fl = step_flops(model, network, res, txt)
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        losses = []
        for _ in range(args.warmup):
            losses.append(train_step(model, params, optimizer, res, txt, gen, args.max_grad_norm))
        sync(device)
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            losses.append(train_step(model, params, optimizer, res, txt, gen, args.max_grad_norm))
            sync(device)
            times.append(time.perf_counter() - t)
        s = sum(times) / len(times)
        peak = torch.cuda.max_memory_allocated() / GIB if device == "cuda" else float("nan")
        achieved = fl["step"] / s / 1e12
        out = {
            "res": res,
            "s_per_step": round(s, 4),
            "s_per_step_median": round(sorted(times)[len(times) // 2], 4),
            "peak_gib": round(peak, 2),
            "tflop_per_step": round(fl["step"] / 1e12, 2),
            "bf16_tflops": round(rate, 1),
            "mfu": round(achieved / rate, 4),
            "achieved_tflops": round(achieved, 1),
            "tflop_per_step_x4": round(fl["step_x4"] / 1e12, 2),
            "mfu_x4": round(fl["step_x4"] / s / 1e12 / rate, 4),
            "fwd_tflop": round(fl["fwd"] / 1e12, 2),
            "fwd_parts_tflop": {k: round(v / 1e12, 3) for k, v in fl["parts"].items()},
            "loss_first_last": [losses[0], losses[-1]],
            "loss_finite": all(math.isfinite(x) for x in losses),
            "checkpointing": not args.no_checkpointing,
            "device": dev_name,
            "torch": torch.__version__,
        }
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
