"""A training step that runs out of the card's memory: one message with what was in use, what was saved, and the
keys of this job that would lower the peak (none of them names a family: each is read from the job and the model's
own answers)."""

from __future__ import annotations

import torch

from ..config import ProcessConfig
from ..errors import UserError
from ..prepare import checkpoint_fraction, memory_limit, swap_setting


class OutOfMemory(UserError):
    """A step ran out of the card's memory; the last step's weights are saved (after the first step)."""


def lower_memory_keys(cfg: ProcessConfig, host_places_weights: bool, every_block_checkpointed: bool = False
                      ) -> list[str]:
    """The settings of this job that would lower a step's peak, the surest first (each with the value it has now).
    `every_block_checkpointed`: the step that did not fit already checkpointed every block (auto's probe)."""
    tc, mc = cfg.train, cfg.model
    out = []
    if tc.cuda_graphs:
        out.append("train.cuda_graphs: false (each captured shape keeps its activations' memory reserved)")
    if tc.gradient_checkpointing == "auto" and not every_block_checkpointed:
        out.append("train.gradient_checkpointing: true (auto left some blocks unchecked)")
    elif checkpoint_fraction(tc.gradient_checkpointing) < 1.0:
        out.append(f"train.gradient_checkpointing: true (now {tc.gradient_checkpointing})")
    if not host_places_weights:  # ComfyUI's MODEL: its own model management places the weights
        if not mc.quantize:
            out.append("model.quantize: true (fp8 base weights: half the memory of bf16)")
        if swap_setting(cfg) == 0:
            out.append("train.blocks_to_swap: auto (blocks' weights kept in RAM and streamed in)")
        if not tc.offload_activations:
            out.append("train.offload_activations: true (what backward keeps, in RAM)")
    if tc.batch_size > 1:
        out.append(f"train.batch_size: 1 with train.gradient_accumulation: {tc.batch_size * tc.gradient_accumulation}"
                   f" (now batch_size {tc.batch_size})")
    largest = max((r for d in cfg.datasets for r in d.resolution), default=None)
    if largest is not None:
        out.append(f"a smaller datasets[].resolution (the largest now {largest})")
    return out


def out_of_memory_message(cfg: ProcessConfig, device: torch.device, what: str, saved: str | None,
                          host_places_weights: bool, every_block_checkpointed: bool = False) -> str:
    """What the user reads when `what` (a step, auto's probe) ran out of memory; `saved`: the run's last save, None
    before anything was trained."""
    gib = 2**30
    where = ""
    if device.type == "cuda":
        peak, limit = torch.cuda.max_memory_allocated(device), memory_limit(device)
        where = f" ({peak / gib:.1f} GiB in use at the peak, of the {limit / gib:.1f} GiB this process may use)"
    keys = lower_memory_keys(cfg, host_places_weights, every_block_checkpointed)
    fix = ("; to fit, one of: " + "; ".join(keys)) if keys else ""
    kept, then = ((f"saved {saved}", "the run resumes from its last save") if saved else
                  ("nothing was trained yet", "the run starts"))
    return f"out of memory on the card in {what}{where}; {kept}{fix}. Then run the same command: {then}."
