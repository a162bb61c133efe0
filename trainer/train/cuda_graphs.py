"""`train.cuda_graphs`: each micro-step's forward, loss and backward replayed from a CUDA graph, one per input shape.

SDXL at batch 1 and small images are bound by kernel launches and Python (hooks on hundreds of layers), not by the
card: replaying the whole forward and backward as one graph takes those away (bench/sdxl_graph_step.py: 0.54 ->
0.11 s/step at 1024² on an H200). What stays outside the graph: drawing the batch (data, noise, noise levels,
captions), the optimizer step, clipping and the scheduler, so every optimizer and every other train key behaves as
without graphs.

Per input signature (the shapes, dtypes and devices of every tensor the step reads, and its Python values): the
first WARMUP occurrences run eagerly on the capture stream (lazy initialisation, cuDNN's algorithm choice and
torch.compile's compiling happen there, not in the capture), the next is captured and every later one is a copy
of its inputs into the graph's buffers and a replay. All graphs share one memory pool: only one runs at a time.

A family whose step reads values on the host (its shapes depend on the data) says so (Family.cuda_graphs_refusal)
and the key is refused for it before anything loads. A step that fails to capture anyway stops the run, saved at
the step it reached, with the reason (CaptureFailed): a failed capture leaves the CUDA random generator in its
capture state, so the process cannot safely train on; the same command with train.cuda_graphs false resumes.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from ..errors import ConfigError, refuse_clashes

log = logging.getLogger("trainer")

WARMUP = 2  # eager runs of a signature before its capture
MAX_GRAPHS = 32  # signatures (bucket shapes) captured at most; later ones run eagerly


def check_config(job, device: torch.device) -> None:
    """train.cuda_graphs with settings it cannot work beside, said before anything loads (the key named)."""
    tc, mc = job.process.train, job.process.model
    if not tc.cuda_graphs:
        return
    key = "config.process[0].train.cuda_graphs"
    clashes = [
        (tc.blocks_to_swap not in (0, "0") or mc.layer_offloading, "train.blocks_to_swap (model.layer_offloading)",
         "swapped blocks move their weights between steps, and a graph replays the addresses it captured"),
        (tc.offload_activations, "train.offload_activations", "the offload copies to host memory inside the step"),
        (tc.train_text_encoder, "train.train_text_encoder", "the text encoders run before the graph, whose copy of"
         " their output would cut their gradients"),
        (tc.gradient_checkpointing == "auto", "train.gradient_checkpointing auto", "the two are not proven together"
         " (SD 3.5 Large with both failed its capture at step 2 on an H200); set a fraction of blocks to checkpoint"
         " instead"),
        (mc.backend == "comfyui", "model.backend comfyui", "ComfyUI's model management may move the weights between"
         " steps; train from the model files (the engine's loaders) to use CUDA graphs"),
    ]
    refuse_clashes(key, clashes, "not with ", "Set one of them to false.")
    if mc.backend == "diffusers":
        from ..models import registry

        why = registry.get_family(job.arch).cuda_graphs_refusal
        if why:
            raise ConfigError(f"{key}: not for model.arch {job.arch!r}: {why}. Set it to false.")
    if device.type != "cuda":
        raise ConfigError(f"{key}: CUDA graphs need a CUDA device; this run is on {device.type} (set it to false)")


def signature(value: Any) -> Any:
    """A hashable description of the step's inputs: what a graph captured for one call can replay for another
    (tensors by shape, dtype and device; plain values by value). None: a value no graph can hold."""
    if isinstance(value, torch.Tensor):
        if value.requires_grad:  # a graph's copy of it would cut the gradient's path (a trained text encoder)
            return None
        return ("tensor", tuple(value.shape), value.dtype, value.device.type)
    if isinstance(value, (list, tuple)):
        parts = tuple(signature(v) for v in value)
        return None if any(p is None for p in parts) else (type(value).__name__, parts)
    if isinstance(value, dict):
        parts = tuple((k, signature(v)) for k, v in sorted(value.items()))
        return None if any(p is None for _, p in parts) else ("dict", parts)
    if value is None or isinstance(value, (bool, int, float, str)):
        return ("value", value)
    return None


def to_buffers(value: Any, device: torch.device) -> Any:
    """The graph's own copy of the inputs, every tensor on `device` (a copy from host memory cannot be captured)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device, copy=True)
    if isinstance(value, (list, tuple)):
        return type(value)(to_buffers(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_buffers(v, device) for k, v in value.items()}
    return value


def copy_into(buffers: Any, value: Any) -> None:
    """This call's inputs into the graph's buffers (same signature: same structure and shapes)."""
    if isinstance(buffers, torch.Tensor):
        buffers.copy_(value, non_blocking=True)
    elif isinstance(buffers, (list, tuple)):
        for b, v in zip(buffers, value):
            copy_into(b, v)
    elif isinstance(buffers, dict):
        for k, b in buffers.items():
            copy_into(b, value[k])


class CaptureFailed(RuntimeError):
    """A step could not be captured. The process cannot go on training on the card: a failed capture leaves the CUDA
    random generator in its capture state (later random ops raise or draw wrongly), so the run stops, saved."""


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, buffers: Any, output: torch.Tensor,
                 reached: list[torch.Tensor]) -> None:
        self.graph, self.buffers, self.output = graph, buffers, output
        self.reached = reached  # the parameters its backward gives a gradient


class GraphedMicroStep:
    """`micro_step(inputs) -> loss` (forward, loss and backward, its gradients accumulated into the parameters'
    .grad) replayed from a CUDA graph per input signature.

    A graph accumulates into gradient buffers of its own (one per parameter, shared by every graph): before a
    replay, each parameter the graph reaches gets its buffer as .grad (zeroed where .grad was None, holding the
    step's earlier micro-batches' gradient where it was not), and the parameters it does not reach keep theirs. So
    the optimizer sees what it would without graphs, also a None gradient (a parameter this step did not reach:
    AdamW then leaves it alone, where a zero gradient would still move it by its momentum and weight decay)."""

    def __init__(self, micro_step: Callable[[Any], torch.Tensor], device: torch.device,
                 params: list[torch.Tensor]) -> None:
        if device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.micro_step = micro_step
        self.device = device
        self.params = list(params)
        self._grads: dict[int, torch.Tensor] = {}  # id(param) -> the graphs' gradient buffer
        self._reached: set[int] | None = None  # while capturing: the parameters whose gradient was accumulated
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad)
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[Any, _Graph] = {}
        self.seen: dict[Any, int] = {}
        self.eager: dict[Any, str] = {}  # signature -> why it runs eagerly
        self.replays = 0

    def __call__(self, inputs: Any) -> torch.Tensor:
        sig = signature(inputs)
        if sig is None:
            return self._refuse(sig, inputs, "the step's inputs hold a value a graph cannot keep")
        g = self.graphs.get(sig)
        if g is not None:
            copy_into(g.buffers, inputs)
            self._bind_grads(g.reached)
            g.graph.replay()
            self.replays += 1
            return g.output
        if sig in self.eager:
            return self.micro_step(inputs)
        n = self.seen.get(sig, 0)
        if n < WARMUP:
            self.seen[sig] = n + 1
            return self._on_capture_stream(inputs)
        if len(self.graphs) >= MAX_GRAPHS:
            return self._refuse(sig, inputs, f"{MAX_GRAPHS} input shapes are captured already")
        try:
            g = self._capture(inputs)
        except Exception as e:  # noqa: BLE001 - whatever broke the capture is said, with the shape
            raise CaptureFailed(f"the step at {describe(inputs) or 'this shape'} could not be captured in a CUDA"
                                f" graph ({first_cause(e)})") from e
        self.graphs[sig] = g
        self._bind_grads(g.reached)
        g.graph.replay()  # a capture records without running: this call's step is the first replay
        self.replays += 1
        return g.output

    def _on_capture_stream(self, inputs: Any) -> torch.Tensor:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            out = self.micro_step(inputs)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return out

    def _capture(self, inputs: Any) -> _Graph:
        buffers = to_buffers(inputs, self.device)
        for p in self.params:  # allocated outside the graph's pool, so they outlive every replay
            if id(p) not in self._grads:
                self._grads[id(p)] = torch.zeros_like(p)
        kept = [p.grad for p in self.params]
        for p in self.params:  # a defined .grad: the captured backward adds into it in place
            p.grad = self._grads[id(p)]
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        before = torch.cuda.current_stream(self.device)
        self._reached = set()
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                out = self.micro_step(buffers)
        finally:  # a capture that fails at its end leaves the capture stream current: the step's own comes back
            torch.cuda.set_stream(before)
            reached, self._reached = self._reached, None
            for p, g in zip(self.params, kept):  # the capture ran nothing: every gradient is as it was
                p.grad = g
        return _Graph(graph, buffers, out, [p for p in self.params if id(p) in reached])

    def _on_grad(self, param: torch.Tensor) -> None:
        if self._reached is not None:
            self._reached.add(id(param))

    def _bind_grads(self, reached: list[torch.Tensor]) -> None:
        """The graph's gradient buffers as the .grad of the parameters it reaches, holding what .grad held."""
        fresh = []
        for p in reached:
            buf, cur = self._grads[id(p)], p.grad
            if cur is None:
                fresh.append(buf)
                p.grad = buf
            elif cur.data_ptr() != buf.data_ptr():  # an eager micro-batch of this step left its own gradient
                buf.copy_(cur)
                p.grad = buf
        if fresh:
            torch._foreach_zero_(fresh)

    def _refuse(self, sig: Any, inputs: Any, why: str) -> torch.Tensor:
        key = sig if sig is not None else ("unkeepable",)
        if key not in self.eager:
            self.eager[key] = why
            log.warning("train.cuda_graphs: a step (%s) runs without a CUDA graph: %s", describe(inputs), why)
        return self.micro_step(inputs)

    def summary(self) -> str:
        return (f"{len(self.graphs)} CUDA graph(s) captured, {self.replays} replays"
                + (f", {len(self.eager)} input shape(s) eager" if self.eager else ""))


def first_cause(e: BaseException) -> str:
    """The error that broke the capture: a failed capture's end raises its own error over the first one."""
    while e.__context__ is not None and "during capture" in str(e):
        e = e.__context__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def describe(inputs: Any) -> str:
    """The inputs' first tensor's shape (the latents: the bucket), for messages."""
    if isinstance(inputs, torch.Tensor):
        return "x".join(str(d) for d in inputs.shape)
    if isinstance(inputs, (list, tuple)):
        for v in inputs:
            d = describe(v)
            if d:
                return d
    return ""
