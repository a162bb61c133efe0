"""Benchmark: one LoRA training step of a full-size FLUX.1-dev transformer through the trainer's own code path.

Random weights (bf16, built on the GPU, nothing read from disk), wrapped in `trainer.models.flux.FluxModel`,
LoRA from `trainer.networks.network.Network` (rank 16, alpha 16, every block linear the trainer targets),
gradient checkpointing on, cuDNN SDPA off, AdamW on the LoRA parameters, batch 1, text length 512.
The step mirrors `trainer/train/loop.py` (`Trainer._loss` + `Trainer.step`).

    python3 bench/flux_step.py --res 512 1024          # GPU, full size
    python3 bench/flux_step.py --tiny                  # CPU smoke test with a tiny config

Experiment flags (see bench/flux_step_h100_experiments.log):
    --ckpt-fraction F    checkpoint only a fraction F of the blocks (evenly spread over the double and the single
                         blocks), through diffusers' own `enable_gradient_checkpointing(gradient_checkpointing_func=)`
    --compile            regional torch.compile of each transformer block (diffusers' compile_repeated_blocks)
    --fused-adam         AdamW(fused=True)
    --profile            torch.profiler over one step of the last resolution: top kernels and kernel classes
    --no-lora            no adapters: the input requires grad instead, so backward still runs through every block

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

from trainer.demo import tiny

from trainer.demo import flux as demo_flux
from trainer.networks.lora import LoRAAdapter
from trainer.models.flux import FluxModel
from trainer.networks.network import Network

GIB = 1024**3


def build_config(is_tiny: bool) -> dict:
    if is_tiny:
        return demo_flux.flux_diffusers_config(hidden=128, head_dim=32, double=2, single=2, context_dim=64,
                                          pooled_dim=32, guidance=True)
    return demo_flux.flux_diffusers_config(hidden=3072, head_dim=128, double=19, single=38, context_dim=4096,
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


# --- experiments: partial checkpointing, regional compile ---------------------------------------------
def spread(n: int, k: int) -> list[int]:
    """k of range(n), evenly spread (k = 0..n)."""
    return sorted({int(i * n / k) for i in range(k)}) if k > 0 else []


def enable_partial_checkpointing(tr: torch.nn.Module, fraction: float) -> set[int]:
    """Checkpoint round(fraction * n) of the double and of the single blocks; the rest keep their activations.

    diffusers' FluxTransformer2DModel.forward calls `self._gradient_checkpointing_func(block, *args)` for every block
    once `gradient_checkpointing` is on, so a function that checks the block is all it takes."""
    chosen = []
    for blocks in (tr.transformer_blocks, tr.single_transformer_blocks):
        chosen += [blocks[i] for i in spread(len(blocks), round(fraction * len(blocks)))]
    ids = {id(b) for b in chosen}

    def ckpt_func(module, *args):
        if id(module) in ids:
            return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)
        return module(*args)

    tr.enable_gradient_checkpointing(gradient_checkpointing_func=ckpt_func)
    return ids


def block_flops(tr: torch.nn.Module, res: int, txt: int) -> dict[int, float]:
    """Forward FLOPs of each block (linears + attention), by id(block)."""
    img = (res // 16) ** 2
    hidden = tr.config.num_attention_heads * tr.config.attention_head_dim
    out = {}
    for prefix, blocks in (("transformer_blocks", tr.transformer_blocks),
                           ("single_transformer_blocks", tr.single_transformer_blocks)):
        for i, b in enumerate(blocks):
            f = 4.0 * (img + txt) ** 2 * hidden
            for name, m in b.named_modules():
                if isinstance(m, torch.nn.Linear):
                    rows, _ = linear_rows(f"{prefix}.{i}.{name}", img, txt)
                    f += 2.0 * m.in_features * m.out_features * rows
            out[id(b)] = f
    return out


def lora_annotated() -> None:
    """Wrap LoRAAdapter.delta in a profiler range (forward and recompute only)."""
    orig = LoRAAdapter.delta

    def delta(self, x, rows):
        with torch.profiler.record_function("lora_delta"):
            return orig(self, x, rows)

    LoRAAdapter.delta = delta


def kernel_class(name: str) -> str:
    n = name.lower()
    if "flash" in n or "fmha" in n or "attention" in n:
        return "attention"
    if any(k in n for k in ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "matmul", "gemv")):
        return "gemm"
    if n.startswith("triton_") or "triton" in n:
        return "triton (fused)"
    if "multi_tensor" in n or "adam" in n or "foreach" in n:
        return "optimizer/foreach"
    if "reduce" in n or "norm" in n or "softmax" in n:
        return "reduction/norm"
    if "copy" in n or "cat" in n or "memcpy" in n or "memset" in n:
        return "copy/cat"
    if "elementwise" in n or "vectorized" in n or "unrolled" in n:
        return "elementwise"
    return "other"


def summarize_trace(path: str, wall_s: float, top: int = 18) -> dict:
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e["name"], []).append(e["dur"])
    total = sum(e["dur"] for e in kernels) or 1e-9
    spans = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in kernels)
    busy, end = 0.0, -1e30
    gaps = []  # (idle us, offset of the idle start from the first CPU op, the kernel after it)
    t_cpu0 = min((e["ts"] for e in events if e.get("cat") == "cpu_op" and "ts" in e), default=spans[0][0] if spans else 0)
    if spans:
        gaps.append((spans[0][0] - t_cpu0, 0.0, spans[0][2]))
    for a, b, n in spans:
        if end > -1e30 and a > end:
            gaps.append((a - end, end - t_cpu0, n))
        if b > end:
            busy += b - max(a, end)
            end = b
    gaps.sort(key=lambda g: -g[0])
    big = sum(g[0] for g in gaps if g[0] >= 200)
    lead = (spans[0][0] - t_cpu0) if spans else 0.0
    print(f"# idle before the first kernel {lead / 1e3:.1f} ms;"
          f" idle gaps >= 0.2 ms: {big / 1e3:.1f} ms in all; largest:", flush=True)
    for g in gaps[:6]:
        print(f"#   {g[0] / 1e3:6.1f} ms idle at +{g[1] / 1e3:6.1f} ms, then {g[2][:90]}", flush=True)
    classes: dict[str, float] = {}
    for n, d in by_name.items():
        classes[kernel_class(n)] = classes.get(kernel_class(n), 0.0) + sum(d)
    ann = [e for e in events if e.get("cat") == "gpu_user_annotation" and e.get("name") == "lora_delta"]
    ann_us = 0.0
    a_end = -1e30
    for e in sorted(ann, key=lambda e: e["ts"]):
        a, b = e["ts"], e["ts"] + e["dur"]
        if b > a_end:
            ann_us += b - max(a, a_end)
            a_end = b
    print(f"# profile: wall {wall_s * 1e3:.1f} ms, kernel sum {total / 1e3:.1f} ms, GPU busy (union) {busy / 1e3:.1f} ms"
          f" ({busy / 1e6 / wall_s:.0%} of wall), {len(kernels)} kernels; LoRA forward ranges on GPU {ann_us / 1e3:.1f} ms", flush=True)
    print("# class                 ms    share", flush=True)
    for c, d in sorted(classes.items(), key=lambda kv: -kv[1]):
        print(f"# {c:<18} {d / 1e3:8.1f}  {d / total:6.1%}", flush=True)
    print("#   ms   calls  avg_us  share  kernel", flush=True)
    for n, d in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]:
        print(f"# {sum(d) / 1e3:6.1f} {len(d):6d} {sum(d) / len(d):7.0f} {sum(d) / total:6.1%}  [{kernel_class(n)}] {n[:110]}",
              flush=True)
    return {"kernel_ms": round(total / 1e3, 1), "busy_ms": round(busy / 1e3, 1),
            "classes_ms": {c: round(d / 1e3, 1) for c, d in classes.items()}, "lora_fwd_ranges_ms": round(ann_us / 1e3, 1)}


# --- the step (mirrors trainer/train/loop.py) -----------------------------------------------------------
def step_inputs(model: FluxModel, res: int, txt: int, gen: torch.Generator, input_grad: bool = False):
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
    if input_grad:
        noisy.requires_grad_(True)
    return latents, noisy, noise, sigmas, cond


OPTS = SimpleNamespace(defer_loss_read=False, pregen=0)
_POOL: list = []


def pooled_inputs(model: FluxModel, res: int, txt: int, gen: torch.Generator):
    """--pregen: latents and text embeddings come from a pool drawn once (as the trainer reads them from its caches);
    noise and sigma are drawn per step on the CPU, as the trainer does."""
    if not _POOL or _POOL[0][0].shape[-1] != res // 8:
        _POOL.clear()
        for _ in range(OPTS.pregen):
            lat, _, _, _, cond = step_inputs_cpu(model, res, txt, gen)
            _POOL.append((lat, cond))
    lat, cond = _POOL[int(torch.randint(len(_POOL), (1,), generator=gen))]
    noise = torch.randn(lat.shape, generator=gen)
    sigmas = torch.sigmoid(torch.randn(1, generator=gen)).clamp(1e-4, 1.0)
    dev = model.device
    latents, noise, sigmas = lat.to(dev), noise.to(dev), sigmas.to(dev)
    return latents, model.objective.add_noise(latents, noise, sigmas), noise, sigmas, cond


def step_inputs_cpu(model: FluxModel, res: int, txt: int, gen: torch.Generator):
    c = model.latent_channels()
    cfg = model.denoiser.config
    latents = torch.randn(1, c, res // 8, res // 8, generator=gen).float()
    cond = {"t5": torch.randn(1, txt, cfg.joint_attention_dim, generator=gen),
            "pooled": torch.randn(1, cfg.pooled_projection_dim, generator=gen)}
    return latents, None, None, None, cond


def train_step(model: FluxModel, params, optimizer, res: int, txt: int, gen: torch.Generator, max_grad_norm: float) -> float:
    if OPTS.pregen:
        latents, noisy, noise, sigmas, cond = pooled_inputs(model, res, txt, gen)
        if not params:
            noisy.requires_grad_(True)
    else:
        latents, noisy, noise, sigmas, cond = step_inputs(model, res, txt, gen, input_grad=not params)
    pred = model.predict(noisy, sigmas, cond, guidance=1.0).float()
    target = model.objective.target(latents, noise, sigmas)
    loss = ((pred - target) ** 2).mean(dim=tuple(range(1, pred.dim()))).mean()
    if not OPTS.defer_loss_read:
        value = float(loss.detach())  # the loop reads the loss (a sync) before backward
    loss.backward()
    if OPTS.defer_loss_read:
        value = float(loss.detach())  # after backward, still before the optimizer touches the weights
    if not params:  # --no-lora
        return value
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
    ap.add_argument("--ckpt-fraction", type=float, default=None,
                    help="checkpoint this fraction of the blocks (1.0 = all, as the trainer does; 0.0 = none)")
    ap.add_argument("--compile", action="store_true", help="regional torch.compile of every transformer block")
    ap.add_argument("--compile-fullgraph", action="store_true", help="with --compile: fullgraph=True (error on a break)")
    ap.add_argument("--compile-mode", default=None, help="with --compile: torch.compile mode")
    ap.add_argument("--fused-adam", action="store_true", help="AdamW(fused=True)")
    ap.add_argument("--no-lora", action="store_true", help="no adapters (input requires grad): LoRA's cost by difference")
    ap.add_argument("--profile", action="store_true", help="profile one step at the last resolution")
    ap.add_argument("--trace-dir", default="/tmp", help="where --profile writes its chrome trace")
    ap.add_argument("--tag", default="", help="a label copied into the JSON line")
    ap.add_argument("--defer-loss-read", action="store_true", help="read the loss after backward, not before")
    ap.add_argument("--pregen", type=int, default=0, help="draw latents + text embeddings once (a pool of N), as from caches")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny config")
    ap.add_argument("--tiny-blocks", type=int, nargs=2, default=[2, 2], help="--tiny: double and single block counts")
    args = ap.parse_args()
    OPTS.defer_loss_read, OPTS.pregen = args.defer_loss_read, args.pregen

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
    fraction = args.ckpt_fraction
    if fraction is None:
        fraction = 0.0 if args.no_checkpointing else 1.0

    rate = matmul_rate(device, dtype, 512 if args.tiny else 8192)
    print(f"# bf16 matmul: {rate:.1f} TFLOP/s on {dev_name}", flush=True)

    t0 = time.perf_counter()
    cfg = build_config(args.tiny)
    if args.tiny:
        cfg.update(num_layers=args.tiny_blocks[0], num_single_layers=args.tiny_blocks[1])
    model = make_model(cfg, device, dtype, txt)
    tr = model.denoiser
    if args.ckpt_fraction is not None:
        ckpt_ids = enable_partial_checkpointing(tr, fraction)
    elif fraction > 0:
        tr.enable_gradient_checkpointing()
        ckpt_ids = {id(b) for b in [*tr.transformer_blocks, *tr.single_transformer_blocks]}
    else:
        ckpt_ids = set()
    if args.no_lora:
        network = Network(model.targets(), "lora", rank=args.rank, alpha=args.rank).to(device)  # for FLOP counts only
        params = []
        optimizer = None
    else:
        if args.profile:
            lora_annotated()
        network = Network(model.targets(), "lora", rank=args.rank, alpha=args.rank).to(device).attach()
        network.train()
        params = [p for p in network.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if args.fused_adam else {}))
    model.set_train_hooks(True)
    if args.compile:
        kw = {"fullgraph": args.compile_fullgraph}
        if args.compile_mode:
            kw["mode"] = args.compile_mode
        tr.compile_repeated_blocks(**kw)
    sync(device)
    n_base = sum(p.numel() for p in tr.parameters())
    n_lora = sum(p.numel() for p in params)
    print(f"# built in {time.perf_counter() - t0:.1f} s: transformer {n_base / 1e9:.3f}B params, "
          f"LoRA {n_lora / 1e6:.2f}M params over {len(network.targets)} targets; "
          f"checkpointing {len(ckpt_ids)}/{len(tr.transformer_blocks) + len(tr.single_transformer_blocks)} blocks",
          flush=True)
    if args.tiny and not args.compile:
        check_rows_with_hooks(model, res_list[0], txt)

    gen = torch.Generator().manual_seed(0)
    for res in res_list:
        fl = step_flops(model, network, res, txt)
        bf = block_flops(tr, res, txt)
        ckpt_share = sum(f for i, f in bf.items() if i in ckpt_ids) / sum(bf.values())
        # recompute of the checkpointed blocks' forward is the extra work over the no-checkpointing step
        blocks_fwd = fl["parts"]["block"] + fl["parts"]["attn"]
        executed = fl["step"] - (1.0 - ckpt_share) * blocks_fwd
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        losses, warm_times = [], []
        for _ in range(args.warmup):
            t = time.perf_counter()
            losses.append(train_step(model, params, optimizer, res, txt, gen, args.max_grad_norm))
            sync(device)
            warm_times.append(time.perf_counter() - t)
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            losses.append(train_step(model, params, optimizer, res, txt, gen, args.max_grad_norm))
            sync(device)
            times.append(time.perf_counter() - t)
        s = sum(times) / len(times)
        med = sorted(times)[len(times) // 2]
        peak = torch.cuda.max_memory_allocated() / GIB if device == "cuda" else float("nan")
        reserved = torch.cuda.max_memory_reserved() / GIB if device == "cuda" else float("nan")
        achieved = fl["step"] / s / 1e12
        out = {
            "tag": args.tag,
            "res": res,
            "s_per_step": round(s, 4),
            "s_per_step_median": round(med, 4),
            "s_min_max": [round(min(times), 4), round(max(times), 4)],
            "warmup_s": [round(x, 2) for x in warm_times],
            "compile_s": round(warm_times[0] - med, 1) if warm_times else None,
            "peak_gib": round(peak, 2),
            "peak_reserved_gib": round(reserved, 2),
            "tflop_per_step": round(fl["step"] / 1e12, 2),
            "tflop_executed": round(executed / 1e12, 2),
            "bf16_tflops": round(rate, 1),
            "mfu": round(achieved / rate, 4),
            "hfu_executed": round(executed / s / 1e12 / rate, 4),
            "achieved_tflops": round(achieved, 1),
            "tflop_per_step_x4": round(fl["step_x4"] / 1e12, 2),
            "mfu_x4": round(fl["step_x4"] / s / 1e12 / rate, 4),
            "fwd_tflop": round(fl["fwd"] / 1e12, 2),
            "fwd_parts_tflop": {k: round(v / 1e12, 3) for k, v in fl["parts"].items()},
            "loss_first_last": [losses[0], losses[-1]],
            "loss_finite": all(math.isfinite(x) for x in losses),
            "checkpointing": fraction > 0,
            "ckpt_fraction": fraction,
            "ckpt_blocks": len(ckpt_ids),
            "compile": args.compile,
            "fused_adam": args.fused_adam,
            "lora": not args.no_lora,
            "defer_loss_read": args.defer_loss_read,
            "pregen": args.pregen,
            "device": dev_name,
            "torch": torch.__version__,
        }
        if args.compile:
            from torch._dynamo.utils import counters
            out["dynamo"] = {"unique_graphs": counters["stats"].get("unique_graphs", 0),
                             "graph_breaks": sum(counters["graph_break"].values()),
                             "recompiles": sum(counters["recompiles"].values()) if "recompiles" in counters else None}
        if args.profile and res == res_list[-1]:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
            with profile(activities=acts) as prof:
                t = time.perf_counter()
                train_step(model, params, optimizer, res, txt, gen, args.max_grad_norm)
                sync(device)
                wall = time.perf_counter() - t
            path = f"{args.trace_dir}/flux_trace_{args.tag or 'run'}_{res}.json"
            prof.export_chrome_trace(path)
            out["profile"] = summarize_trace(path, wall)
            out["profile"]["wall_ms"] = round(wall * 1e3, 1)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
