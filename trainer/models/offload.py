"""Block swap: the weights of some of the denoiser's repeated blocks live in (pinned) host memory and are streamed
onto the card just before each block runs, one block ahead on a side stream so that the copy overlaps the previous
block's compute, and dropped from the card right after.

Training with swapped blocks needs them checkpointed (the prepare step sees to it): in the forward pass a
checkpointed block keeps nothing that references its weights, so they can leave as soon as it returns; in the
backward pass the block is recomputed (its weights come back), and it may leave once the next block down the
chain starts its own recomputation, which the chain's order guarantees happens after this block's backward.
Sampling (no grad) drops each block after its forward.

The adapters of the network are not part of the blocks (they are hooks beside the layers) and stay on the card.
"""

from __future__ import annotations

import torch
from torch import nn


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class BlockSwap:
    """Swap `swapped` of `blocks` (the last ones in depth order: their backward comes first, so the ones that wait
    longest for a reuse are on the card) between host memory and `device`."""

    def __init__(self, blocks: list[nn.Module], swapped: int, device: torch.device, prefetch: int = 1) -> None:
        self.blocks = blocks
        self.device = torch.device(device)
        self.prefetch = prefetch
        n = len(blocks)
        self.swapped = list(range(n - max(0, min(swapped, n)), n))
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.host: dict[int, dict[str, torch.Tensor]] = {}
        self.events: dict[int, torch.cuda.Event] = {}
        self.resident: set[int] = set()
        self.max_resident = 0  # the most swapped blocks on the card at once (tests and the bench read it)
        self.loads = 0
        self._handles: list = []
        for i in self.swapped:
            self.host[i] = {name: self._to_host(t) for name, t in self._tensors(blocks[i])}
            self._drop(i)
        for i in self.swapped:
            self._handles.append(blocks[i].register_forward_pre_hook(self._pre_hook(i)))
            self._handles.append(blocks[i].register_forward_hook(self._post_hook(i)))

    # --- tensors of a block ----------------------------------------------------------------------
    @staticmethod
    def _tensors(block: nn.Module):
        for name, p in block.named_parameters(recurse=True):
            yield name, p
        for name, b in block.named_buffers(recurse=True):
            if b is not None:
                yield f"buffer:{name}", b

    def _slot(self, block: nn.Module, name: str) -> torch.Tensor:
        if name.startswith("buffer:"):
            return block.get_buffer(name[len("buffer:"):])
        return block.get_parameter(name)

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        h = t.detach().to("cpu", copy=True)
        return h.pin_memory() if self.cuda else h

    def _drop(self, i: int) -> None:
        block = self.blocks[i]
        for name, t in self.host[i].items():
            self._slot(block, name).data = torch.empty(0, dtype=t.dtype, device=self.device)
        self.resident.discard(i)

    def _start_load(self, i: int) -> None:
        if i in self.resident or i not in self.host:
            return
        block = self.blocks[i]
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                for name, t in self.host[i].items():
                    self._slot(block, name).data = t.to(self.device, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.copy_stream)
            self.events[i] = ev
        else:
            for name, t in self.host[i].items():
                self._slot(block, name).data = t
        self.resident.add(i)
        self.loads += 1
        self.max_resident = max(self.max_resident, len(self.resident))

    def _ready(self, i: int) -> None:
        self._start_load(i)
        ev = self.events.pop(i, None)
        if ev is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ev)
            for name in self.host[i]:
                self._slot(self.blocks[i], name).data.record_stream(stream)

    # --- hooks -----------------------------------------------------------------------------------
    def _pre_hook(self, i: int):
        def hook(module, args):
            backward = _in_backward()
            # what may leave now: in a forward pass every other block (checkpointed: nothing saved references
            # them); in backward the blocks above this one, whose backward is done
            for j in list(self.resident):
                if j != i and (not backward or j > i):
                    self._drop(j)
            self._ready(i)
            order = self.swapped
            pos = order.index(i)
            step = -1 if backward else 1
            for k in range(1, self.prefetch + 1):
                q = pos + step * k
                if 0 <= q < len(order):
                    self._start_load(order[q])
            return None

        return hook

    def _post_hook(self, i: int):
        def hook(module, args, output):
            if not torch.is_grad_enabled() or not _in_backward():
                # forward (training: checkpointed; sampling: no grad): nothing holds these weights any more
                if i in self.resident and not (torch.is_grad_enabled() and _in_backward()):
                    self.events.pop(i, None)
                    self._drop(i)
            return None

        return hook

    def release(self) -> None:
        """Drop every swapped block from the card (end of a step, before sampling or saving)."""
        for j in list(self.resident):
            self._drop(j)

    def remove(self) -> None:
        """Undo: every block back on the card, hooks removed."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for i in self.swapped:
            block = self.blocks[i]
            for name, t in self.host[i].items():
                self._slot(block, name).data = t.to(self.device)
        self.resident = set(self.swapped)
        self.host.clear()

    @property
    def swapped_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in self.host.values() for t in d.values())


def offload_activations(module: nn.Module) -> None:
    """Keep what the module's forward saves for backward in pinned host memory (torch's save_on_cpu) while grad is
    on: with every block checkpointed that is the blocks' inputs (at Wan 14B, 480x832x81: 40 x 335 MB), copied
    back when backward reaches them. Memory for PCIe traffic; sampling (no grad) is unaffected."""
    forward = module.forward

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return forward(*args, **kwargs)

    module.forward = run
