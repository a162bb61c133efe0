"""`train.distributed: fsdp`: the frozen base model sharded over the ranks of a launch (FSDP2's `fully_shard`).

Each repeated block of the denoiser (the bulk of its weights: 98-99% for the transformer families) is its own FSDP
unit: a rank keeps 1/N of every block's weights on its card, and a block's whole weights exist only while it runs
(gathered before its forward, freed after; gathered again for its backward). The denoiser is the root unit over
them, holding none of the weights itself, so FSDP orders the gathers of the whole forward and prefetches in
backward. What is not in a block (embedders, the final layer) stays whole on every card.

The network is not sharded: it is a separate module beside the base (its adapters hook the base layers), a LoRA is
small, and its gradients are summed across the ranks as under ddp (distributed.py), so the optimizer, saves and
resume are the ones of every other run. Only the base's weights move.

Because every forward of a sharded block is a collective, every rank runs every forward: a rank with no item in a
micro-batch runs a stand-in forward at weight 0 (the loop), and previews are sampled on every rank (the main rank
writes them).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError, refuse_clashes
from ..models.base import TrainingModel

KEY = "config.process[0].train.distributed"


def check_config(job) -> None:
    """train.distributed fsdp with settings it is not built or proven with, said before anything loads."""
    tc, mc = job.process.train, job.process.model
    if tc.distributed != "fsdp":
        return
    clashes = [
        (tc.blocks_to_swap not in (0, "0") or mc.layer_offloading, "train.blocks_to_swap (model.layer_offloading)",
         "sharding already keeps only 1/N of the blocks' weights on each card; swapping them too is not built"),
        (mc.quantize, "model.quantize", "the shards are gathered in bf16 / fp32; fp8 storage under fsdp is not built"
         " (ddp trains fp8 weights: train.distributed ddp)"),
        (tc.compile, "train.compile", "compiled blocks under fsdp are not proven yet"),
        (tc.cuda_graphs, "train.cuda_graphs", "a graph cannot replay the ranks' gathers"),
        (tc.offload_activations, "train.offload_activations", "the two are not proven together"),
        (tc.gradient_checkpointing == "auto", "train.gradient_checkpointing auto", "its plan is measured by one"
         " process alone; set a fraction of the blocks (true: all) instead"),
        (mc.backend == "comfyui", "model.backend comfyui", "ComfyUI's model management places the weights itself;"
         " train from the model files with the engine's loaders"),
    ]
    refuse_clashes(KEY, clashes, "fsdp is not available with ", "Set one of them off, or use ddp.")


def shard_denoiser(model: TrainingModel, device: torch.device, report: Callable[[str], None]) -> tuple[int, int]:
    """Shard the denoiser's repeated blocks over the launch's process group and place the rest of it on `device`
    (instead of the prepare step's placement of the whole denoiser). Call after the network is built (DoRA reads
    the base's whole weights when it starts). Returns (bytes of the blocks on this rank, bytes of the blocks)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    blocks = model.repeated_blocks()
    if not blocks:
        raise ConfigError(f"{KEY}: fsdp shards the repeated blocks of a denoiser, and model.arch {model.arch!r}"
                          " declares none; use ddp")
    world = torch.distributed.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    total = sum(p.numel() * p.element_size() for b in blocks for p in b.parameters())
    _place_outside(model.denoiser, blocks, device)
    # torch warns of a block that returns a view (an in-place op on it would skip the backward's gather); the
    # families' blocks and denoisers return views and no in-place op follows: every engine family's sharded
    # gradients equal its whole model's (tests/test_fsdp.py)
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for i, b in enumerate(blocks):
        # the last block runs first in backward: its weights stay gathered from its forward to its backward
        fully_shard(b, mesh=mesh, reshard_after_forward=i < len(blocks) - 1)
    # the root unit holds no weights: what is outside the blocks stays whole (placed above)
    outside = set(model.denoiser.parameters()) - {p for b in blocks for p in b.parameters()}
    fully_shard(model.denoiser, mesh=mesh, ignored_params=outside or None)
    local = sum(p.to_local().numel() * p.element_size() for b in blocks for p in b.parameters())
    report(f"train.distributed fsdp: {len(blocks)} blocks sharded over {world} ranks: {local / 2**30:.2f} of"
           f" {total / 2**30:.2f} GiB of their weights on this rank's {device.type}")
    return local, total


def _place_outside(root: nn.Module, blocks: list[nn.Module], device: torch.device) -> None:
    """The parameters and buffers of `root` that no block holds, moved to `device` (the blocks' own are moved by
    fully_shard, one shard each)."""
    skip = {id(b) for b in blocks}

    def visit(m: nn.Module) -> None:
        if id(m) in skip:
            return
        for p in m.parameters(recurse=False):
            p.data = p.data.to(device)  # the same Parameter: whatever refers to it still does
        for name, buf in m.named_buffers(recurse=False):
            m._buffers[name] = buf.to(device)
        for child in m.children():
            visit(child)

    visit(root)
