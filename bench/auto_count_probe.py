"""What train.gradient_checkpointing auto's count of saved bytes misses on a CUDA card: a Flux (tiny, or small at
real block structure) trained by the trainer's own step on the card, every block checkpointed against none, with

- `alloc_fwd`: memory_allocated after the forward (the loss made, backward not run) over before it: what the
  forward keeps for backward; `peak_bwd`: the step's peak over before it;
- `count_forward`: the bytes the whole forward saves for backward (saved-tensor hooks over the real forward, the
  weights and buffers left out, each storage once, and also rounded as the caching allocator rounds: 512 bytes);
- `count_blocks`: what auto's per-block count gives for the same blocks (auto_checkpointing.saved_bytes);
- `unaccounted`: the largest allocations alive after the unchecked forward that are neither weights nor saved
  tensors nor alive before it, with the Python frames that made them (torch.cuda.memory._record_memory_history).

    python3 bench/auto_count_probe.py --work /tmp/auto_probe [--sizes tiny small]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import e2e_run
from flux_e2e import SIZES, build_files

SIZES = {**SIZES, "small": dict(hidden=1024, head_dim=128, double=2, single=4, clip=64, t5=256,
                                vae=([32, 32, 32, 32], 1), t5_tokens=64)}
ROUND = 512  # the CUDA caching allocator's granularity


def _round(n: int) -> int:
    return max(ROUND, -(-n // ROUND) * ROUND)


def live_blocks() -> dict[int, tuple[int, list[str]]]:
    """address -> (size, frames) of every allocated block of the caching allocator."""
    out = {}
    for seg in torch.cuda.memory._snapshot()["segments"]:
        for b in seg["blocks"]:
            if b["state"] == "active_allocated":
                frames = [f"{f['filename'].split('site-packages/')[-1].split('/work/')[-1]}:{f['line']} {f['name']}"
                          for f in b.get("frames", []) if f["filename"].endswith(".py")]
                out[b["address"]] = (b["size"], frames)
    return out


def probe(trainer, fraction: float, inputs: tuple, items: int) -> dict:
    from trainer.train.auto_checkpointing import _storage_key

    model = trainer.model
    model.set_gradient_checkpointing(fraction)
    kept = {_storage_key(t) for m in (model.denoiser, trainer.network) for t in (*m.parameters(), *m.buffers())}
    saved: dict[tuple, int] = {}
    ptrs: set[int] = set()

    def pack(t: torch.Tensor):
        key = _storage_key(t)
        if key not in kept and t.is_cuda:
            saved[key] = t.untyped_storage().nbytes()
            ptrs.add(t.untyped_storage().data_ptr())
        return t

    dev = model.device
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    before_blocks = live_blocks()
    before = torch.cuda.memory_allocated(dev)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = trainer.loss_of(*inputs, items)
    torch.cuda.synchronize(dev)
    after = torch.cuda.memory_allocated(dev)
    blocks = live_blocks()
    param_ptrs = {k[1] for k in kept}
    unaccounted = sorted(((size, addr, frames) for addr, (size, frames) in blocks.items()
                          if addr not in before_blocks and addr not in ptrs and addr not in param_ptrs),
                         reverse=True)
    loss.backward()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    trainer.optimizer.zero_grad(set_to_none=True)
    del loss
    return {"fraction": fraction, "alloc_fwd": after - before, "peak_bwd": peak - before,
            "count_forward": sum(saved.values()), "count_forward_rounded": sum(_round(n) for n in saved.values()),
            "n_saved": len(saved), "unaccounted_bytes": sum(s for s, _, _ in unaccounted),
            "unaccounted": [{"bytes": s, "frames": f[:6]} for s, _, f in unaccounted[:8]]}


def main() -> None:
    from trainer.config import load_job_dict
    from trainer.job import build_trainer
    from trainer.train.auto_checkpointing import MARGIN, plan_checkpointing

    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/auto_probe")
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=list(SIZES))
    ap.add_argument("--res", type=int, default=512)
    a = ap.parse_args()
    torch.cuda.memory._record_memory_history(max_entries=200000)
    for size in a.sizes:
        folder = Path(a.work) / size
        model_cfg = build_files(folder, 1, SIZES[size], a.res)
        dtype = "fp32" if size == "tiny" else "bf16"
        d = e2e_run.job(f"probe_{size}", model_cfg, folder, 4, a.res, {}, device="cuda", dtype=dtype)
        trainer = build_trainer(load_job_dict(d), report=lambda s: None)
        trainer.step()  # the optimizer's states made, kernels loaded
        gen = torch.Generator().manual_seed(0)
        inputs = trainer.batch_inputs(0, gen)
        items = len(trainer.plan.batch(0))
        rows = [probe(trainer, f, inputs, items) for f in (1.0, 0.0, 1.0, 0.0)][2:]  # the second pair: warm
        plan = plan_checkpointing(trainer, (a.res, a.res, 1), lambda s: None, limit=10**15)
        count_blocks = sum(int(k.saved_bytes / MARGIN) * len(k.indices) for k in plan.kinds)
        ckpt, none = rows
        print(json.dumps({"size": size, "res": a.res, "dtype": dtype, "blocks": len(trainer.model.repeated_blocks()),
                          "count_blocks": count_blocks,
                          "growth_alloc_fwd": none["alloc_fwd"] - ckpt["alloc_fwd"],
                          "growth_peak": none["peak_bwd"] - ckpt["peak_bwd"],
                          "growth_count_forward": none["count_forward"] - ckpt["count_forward"],
                          "checkpointed": ckpt, "unchecked": none}), flush=True)
        del trainer
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
