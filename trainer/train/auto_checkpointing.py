"""train.gradient_checkpointing: auto — the blocks left unchecked are those the card has room for.

A checkpointed block keeps only its input for backward and runs its forward a second time there; an unchecked one
keeps what autograd saves and runs once. auto measures both sides on the run's first batch before any step:

- one fully checkpointed forward and backward gives the step's peak (and each kind of block's inputs, taken by
  pre-hooks: a kind is the block's class with its parameter and input shapes);
- one kind at a time, a forward of its first block alone (unchecked, the network's hooks on) counts the bytes of
  the tensors autograd saves (saved-tensor hooks; the weights, buffers and the block's inputs are not counted: they
  are kept either way) and its time, the recompute a checkpoint costs;

then scales the activations to the largest training size (they grow with the latent's size), and leaves unchecked
the blocks with the most recompute time saved per byte until the room under the card's memory (its per-process cap
included, less a headroom and the optimizer's states) is used. The measured figures are the eager step's; a
compiled block saves what inductor's partitioner chooses, which is planned for with MARGIN."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map_only

from ..attention import cudnn_attention_off
from ..models.blocks import spread_over_depth
from ..prepare import HEADROOM_BYTES, memory_limit
from .out_of_memory import OutOfMemory, out_of_memory_message

# copies of the trained parameters an optimizer keeps (AdamW: 2; Prodigy: 4), taken at the most
OPTIMIZER_COPIES = 4
# the counted bytes times this are planned for. On an H200 (torch 2.11, bench/auto_count_probe.py) the eager count
# matched what the caching allocator held after an unchecked forward within 2% (a small bf16 Flux: 265.0 MB held,
# 270.6 MB counted) and the step's peak grew by 0.75x to 0.82x of it; the 1.4x seen before was the probe's own graph
# left alive (saved_bytes now holds what it counts outside the graph). A compiled step: SD 3.5 Large (compile, 23 GiB
# cap) with 3 of 38 blocks unchecked peaked 2.6 GiB over the plan's fully checkpointed peak, 1.6x the 1.6 GiB counted,
# with the probe's graph still alive then; not measured since, so the margin stays
MARGIN = 2.0


@dataclass
class BlockKind:
    """Blocks of one class with the same parameter and input shapes: what one of them saves unchecked (bytes; in a
    plan, scaled to the largest size and times MARGIN) and the time its forward takes (what a checkpoint costs)."""
    indices: list[int]
    saved_bytes: int
    forward_s: float


@dataclass
class Plan:
    unchecked: list[int]  # indices into the model's repeated blocks
    room: int  # bytes the unchecked blocks could use
    used: int  # bytes they are estimated to keep
    peak: int  # the fully checkpointed step's peak, scaled to the largest size
    limit: int  # what this process may allocate on the card
    scale: float  # largest training latent over the probe's
    kinds: list[BlockKind]  # as measured, saved bytes scaled to the largest size


def _tensors(obj) -> list[torch.Tensor]:
    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor)]


def _detached(obj):
    """Block inputs held for a later probe: tensors detached, each keeping whether it required grad."""
    return tree_map_only(torch.Tensor, lambda t: t.detach().requires_grad_(t.requires_grad) if t.is_floating_point()
                         else t.detach(), obj)


def kind_key(block: nn.Module, args: tuple, kwargs: dict) -> tuple:
    shapes = tuple(tuple(t.shape) for t in _tensors((args, kwargs)))
    return (type(block).__qualname__, tuple(tuple(p.shape) for p in block.parameters()), shapes)


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr())


def saved_bytes(block: nn.Module, args: tuple, kwargs: dict, kept: set[tuple]) -> tuple[int, float]:
    """(bytes autograd saves for backward in one unchecked forward of `block`, the forward's seconds). Storages in
    `kept` (weights, buffers) and the inputs' own are not counted; a storage saved twice counts once. The block's
    class forward is called, past any checkpointing wrapper; the hooks of its sub-modules (the network) run."""
    skip = set(kept) | {_storage_key(t) for t in _tensors((args, kwargs))}
    seen: dict[tuple, int] = {}
    # the saved tensors are held here, not in the graph: a graph node packing its own output (attention, sigmoid)
    # would hold it in a cycle through autograd's C++ objects that no collector frees, and with it the whole
    # block's saved tensors for the rest of the run (on the card, the next steps' peaks grew by that much); held
    # they also keep their addresses from being reused by later tensors, which would count as one
    held: list[torch.Tensor] = []

    def pack(t: torch.Tensor):
        key = _storage_key(t)
        if key not in skip:
            seen[key] = t.untyped_storage().nbytes()
        held.append(t)
        return None  # never unpacked: no backward runs through this graph

    sync = torch.cuda.synchronize if any(t.is_cuda for t in _tensors(args)) else (lambda: None)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sync()
        t0 = time.perf_counter()
        out = type(block).forward(block, *args, **kwargs)
        sync()
        seconds = time.perf_counter() - t0
    del out  # the graph goes with it, and what it saved with the list
    held.clear()
    return sum(seen.values()), seconds


def choose_unchecked(kinds: list[BlockKind], room: int) -> list[int]:
    """The blocks to leave unchecked within `room` bytes: kinds in order of recompute time saved per byte, as many
    blocks of each as fit, spread over depth among that kind's."""
    chosen: list[int] = []
    left = room
    for k in sorted(kinds, key=lambda k: k.forward_s / max(k.saved_bytes, 1), reverse=True):
        n = len(k.indices) if k.saved_bytes <= 0 else min(len(k.indices), max(0, left) // k.saved_bytes)
        if n <= 0:
            continue
        picked = spread_over_depth(k.indices, n / len(k.indices))
        chosen += picked
        left -= len(picked) * max(k.saved_bytes, 0)
    return sorted(chosen)


def why_not(model, tc, limit_given: bool = False) -> str | None:
    """Why auto checkpoints every block on this run (a reason for the report), or None when it measures.
    `limit_given`: the caller gives the memory limit, so the device's own is not needed."""
    if model.device.type != "cuda" and not limit_given:
        return f"the memory of a {model.device.type} device is not measured"
    if model.host_places_weights:
        return "ComfyUI's model management places the weights"
    if getattr(model, "block_swap", None) is not None:
        return "swapped blocks need checkpointing"
    if tc.offload_activations:
        return "train.offload_activations keeps the checkpointed inputs in host memory"
    if not model.repeated_blocks():
        return "the model has no repeated blocks"
    return None


def measure(trainer, inputs: tuple, items: int) -> tuple[int, int, dict[tuple, BlockKind], dict[tuple, tuple]]:
    """One fully checkpointed forward and backward of `inputs` (batch_inputs' tuple, `items` the micro-batch's
    item count): (allocated before, peak during, the kinds of block with their indices, one input per kind). Off a
    CUDA card the memory is not measured (0, 0)."""
    model = trainer.model
    blocks = model.repeated_blocks()
    kinds: dict[tuple, BlockKind] = {}
    first: dict[tuple, tuple] = {}
    index = {id(b): i for i, b in enumerate(blocks)}
    called: set[int] = set()

    def pre_hook(block, args, kwargs):
        i = index[id(block)]
        if i in called:  # a recompute in backward calls it again
            return
        called.add(i)
        key = kind_key(block, args, kwargs)
        if key not in kinds:
            kinds[key] = BlockKind([], 0, 0.0)
            first[key] = (block, _detached(args), _detached(kwargs))
        kinds[key].indices.append(i)

    handles = [b.register_forward_pre_hook(pre_hook, with_kwargs=True) for b in blocks]
    dev = model.device
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev) if cuda else 0
    try:
        trainer.loss_of(*inputs, items).backward()
        if cuda:
            torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) if cuda else 0
    finally:
        for h in handles:
            h.remove()
        trainer.optimizer.zero_grad(set_to_none=True)
    return before, peak, kinds, first


@contextmanager
def _out_of_memory_told(trainer) -> Iterator[None]:
    """The probe is a fully checkpointed step: one that does not fit is the run's first step not fitting."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        trainer.optimizer.zero_grad(set_to_none=True)
        model = trainer.model
        raise OutOfMemory(out_of_memory_message(
            trainer.cfg, model.device, "train.gradient_checkpointing auto's probe (one step with every block"
            " checkpointed)", None, model.host_places_weights, every_block_checkpointed=True)) from None


def plan_checkpointing(trainer, largest: tuple[int, int, int], report: Callable[[str], None],
                       limit: int | None = None) -> Plan | None:
    """Choose and apply the checkpointed blocks of a run with train.gradient_checkpointing: auto (before its first
    step and before compile); `largest`: the biggest training size (width, height, frames); `limit`: the bytes the
    process may use (default: memory_limit of the card; given, the plan is made on any device, the CPU's peak
    counted as 0). None: every block stays checkpointed (the report says why)."""
    model, tc = trainer.model, trainer.cfg.train
    reason = why_not(model, tc, limit_given=limit is not None)
    if reason:
        report(f"train.gradient_checkpointing auto: every block checkpointed ({reason})")
        return None
    blocks = model.repeated_blocks()
    inputs = trainer.batch_inputs(0, torch.Generator().manual_seed(tc.seed))
    if inputs is None:  # this rank has no item in the first batch
        report("train.gradient_checkpointing auto: every block checkpointed (no item of the first batch on this rank)")
        return None
    items = len(trainer.plan.batch(0))
    # the probe is a fully checkpointed step whatever an earlier plan left unchecked (a second plan measured the
    # first one's unchecked blocks as the checkpointed peak and found no room: tests/test_auto_checkpointing.py)
    model.checkpoint_blocks(blocks)
    trainer.network.train()
    model.set_train_hooks(True)
    # the probe runs eager, where cuDNN attention is not trusted (prepare.EAGER_CUDNN; on an H200 an eager probe of
    # a compiled Flux run with it on hit an illegal memory access)
    try:
        with cudnn_attention_off(), _out_of_memory_told(trainer):
            before, peak, kinds, first = measure(trainer, inputs, items)
            kept = {_storage_key(t) for m in (model.denoiser, trainer.network)
                    for t in (*m.parameters(), *m.buffers())}
            for key, (block, args, kwargs) in first.items():
                saved_bytes(block, args, kwargs, kept)  # a first call: kernels chosen and loaded, not timed
                kinds[key].saved_bytes, kinds[key].forward_s = saved_bytes(block, args, kwargs, kept)
    finally:
        model.set_train_hooks(False)
    del first
    # positions (frames x height x width) of the largest training latent against the probe's
    scale = max(1.0, math.prod(model.latent_shape(*largest)[2:]) / math.prod(inputs[0].shape[2:]))
    for k in kinds.values():
        k.saved_bytes = int(k.saved_bytes * scale * MARGIN)
    optimizer = OPTIMIZER_COPIES * sum(p.numel() * p.element_size() for p in trainer.params)
    limit = memory_limit(model.device) if limit is None else limit
    step_peak = int(before + (peak - before) * scale)
    room = limit - step_peak - optimizer - HEADROOM_BYTES
    unchecked = choose_unchecked(list(kinds.values()), room)
    ids = set(unchecked)
    model.checkpoint_blocks([b for i, b in enumerate(blocks) if i not in ids])
    used = sum(k.saved_bytes for k in kinds.values() for i in k.indices if i in ids)
    gib = 2**30
    report(f"train.gradient_checkpointing auto: {len(unchecked)} of {len(blocks)} blocks unchecked ({used / gib:.1f}"
           f" GiB of activations kept for them); a fully checkpointed step peaks at {step_peak / gib:.1f} GiB of the"
           f" {limit / gib:.1f} GiB this process may use ({HEADROOM_BYTES / gib:.0f} GiB kept free)")
    return Plan(unchecked, room, used, step_peak, limit, scale, list(kinds.values()))
