"""The attention backend, chosen by a self-test on the card instead of a blanket switch-off.

cuDNN's SDPA failed Flux training on the H100 / H200 with torch 2.11 (illegal memory access or NaN in the backward),
so it was switched off everywhere. Instead, where a model declares the attention shapes it will train at, a child
process runs one forward and backward per shape with cuDNN and with the dispatcher's default (flash or memory-
efficient), in the layout the diffusers models use, compares both with the math backend in float32, and times
them. cuDNN goes first only where it is correct at every shape and faster. The child is there because an illegal
memory access poisons the process that made it: a crash there only fails the test. The verdict is kept per torch,
cuDNN, card, dtype and shape set in the user's cache folder, so the test runs once per setup.

    python -m trainer.attention '{"shapes": [[1, 24, 4608, 4608, 128]], "dtype": "bfloat16"}'   # the child
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from .paths import user_cache_dir

log = logging.getLogger("trainer")

# a shape: (batch, heads, query tokens, key tokens, head dim)
Shape = tuple[int, int, int, int, int]
# relative error (norm) allowed against float32 math, per dtype: bf16 rounding of out / dq / dk / dv lands near 4e-3
TOLERANCE = {"bfloat16": 2e-2, "float16": 1e-2, "float32": 1e-3}
# cuDNN must beat the default by this much to be preferred (timing noise between two runs is a few percent)
MIN_GAIN = 0.03
HEAD_CHUNK = 4  # heads per float32 reference pass: 4 x 4608² scores are 340 MB


def _backends(name: str):
    from torch.nn.attention import SDPBackend

    if name == "cudnn":
        return [SDPBackend.CUDNN_ATTENTION]
    if name == "math":
        return [SDPBackend.MATH]
    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]  # what runs with cuDNN off


def _inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int):
    """q, k, v as the diffusers processors make them ((b, tokens, heads, dim) leaves seen as (b, heads, tokens,
    dim): not contiguous) and the weight that makes the gradient of the output arrive transposed, as it does
    after the output projection's reshape."""
    b, h, lq, lk, d = shape
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, lq, h, d, generator=g, device=device, dtype=dtype)
    k = torch.randn(b, lk, h, d, generator=g, device=device, dtype=dtype)
    v = torch.randn(b, lk, h, d, generator=g, device=device, dtype=dtype)
    w = torch.randn(b, lq, h, d, generator=g, device=device, dtype=dtype)
    return q, k, v, w


def _step(qkv, w, backend: str, heads: slice | None = None):
    """(out, dq, dk, dv) of one SDPA forward and backward, heads `heads` only (the float32 reference's chunks)."""
    from torch.nn.attention import sdpa_kernel

    leaves = [t[:, :, heads].detach().clone().requires_grad_(True) if heads else t.detach().requires_grad_(True)
              for t in qkv]
    wt = w[:, :, heads] if heads else w
    with sdpa_kernel(_backends(backend)):
        out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in leaves))
    y = out.transpose(1, 2)
    (y.float() * wt.float()).sum().backward()
    return [y.detach(), *(t.grad for t in leaves)]


def _reference(qkv, w):
    """float32 math backend, a few heads at a time so the scores stay small."""
    q32 = [t.float() for t in qkv]
    parts = [_step(q32, w.float(), "math", slice(i, i + HEAD_CHUNK)) for i in range(0, qkv[0].shape[2], HEAD_CHUNK)]
    return [torch.cat([p[j] for p in parts], dim=2) for j in range(4)]


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        return float("inf")
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def _time(qkv, w, backend: str, device: torch.device, reps: int = 10) -> float:
    """Median seconds of one forward + backward."""
    if device.type != "cuda":
        return 0.0
    for _ in range(3):
        _step(qkv, w, backend)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        _step(qkv, w, backend)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def probe(shapes: list[Shape], dtype: torch.dtype, device: torch.device, backends=("default", "cudnn"), emit=print):
    """Per shape and backend one result {shape, backend, ok, err, s} (err: the worst of out / dq / dk / dv against
    float32 math; "unsupported": the backend has no kernel for the shape), emitted as soon as it is known, the
    default first, so that a crash in cuDNN leaves the default's results behind it."""
    tol = TOLERANCE[str(dtype).removeprefix("torch.")]
    for i, shape in enumerate(shapes):
        qkv_w = _inputs(tuple(shape), dtype, device, seed=i)
        qkv, w = list(qkv_w[:3]), qkv_w[3]
        ref = _reference(qkv, w)
        for backend in backends:
            r = {"shape": list(shape), "backend": backend}
            try:
                got = _step(qkv, w, backend)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            except RuntimeError as e:
                if "No available kernel" in str(e):
                    emit(json.dumps({**r, "ok": None, "err": "unsupported"}))
                    continue
                raise
            err = max(_rel(x, y) for x, y in zip(got, ref))
            r.update(ok=err <= tol, err=err if err != float("inf") else "non-finite")
            r["s"] = _time(qkv, w, backend, device) if r["ok"] else None
            emit(json.dumps(r))


def verdict(lines: list[str], returncode: int, stderr: str) -> dict:
    """The child's output read: {"cudnn": bool, "why": str, "results": [...]}. cuDNN is chosen when the child
    ended well, cuDNN was correct wherever it had a kernel (and had one somewhere), the default was correct
    too, and cuDNN's time over those shapes beats the default's by MIN_GAIN."""
    results = [json.loads(ln) for ln in lines if ln.startswith("{")]
    by = {b: [r for r in results if r["backend"] == b] for b in ("default", "cudnn")}
    if returncode != 0:
        tail = (stderr.strip().splitlines() or ["no output"])[-1][:300]
        return {"cudnn": False, "why": f"the test process failed ({tail})", "results": results}
    bad = [r for r in by["cudnn"] if r["ok"] is False]
    if bad:
        return {"cudnn": False, "why": f"cuDNN wrong at {bad[0]['shape']} (error {bad[0]['err']})", "results": results}
    run = [r for r in by["cudnn"] if r["ok"]]
    if not run:
        return {"cudnn": False, "why": "cuDNN has no kernel for these shapes", "results": results}
    default = {tuple(r["shape"]): r for r in by["default"]}
    if any(not default.get(tuple(r["shape"]), {}).get("ok") for r in run):
        return {"cudnn": False, "why": "the default backend failed the test too", "results": results}
    t_cudnn = sum(r["s"] for r in run)
    t_default = sum(default[tuple(r["shape"])]["s"] for r in run)
    faster = t_cudnn < (1 - MIN_GAIN) * t_default
    how = f"{t_cudnn * 1e3:.2f} ms against {t_default * 1e3:.2f} ms (flash / memory-efficient)"
    return {"cudnn": faster, "why": ("correct and faster: " if faster else "correct, not faster: ") + how,
            "results": results}


def _key(shapes: list[Shape], dtype: torch.dtype, device: torch.device) -> str:
    cap = torch.cuda.get_device_capability(device)
    return json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                       "card": torch.cuda.get_device_name(device), "cc": list(cap), "dtype": str(dtype),
                       "shapes": sorted(list(s) for s in shapes)}, sort_keys=True)


def self_test(shapes: list[Shape], dtype: torch.dtype, device: torch.device, timeout: float = 300.0) -> dict:
    """The verdict for these shapes on this card: from the cache, else from a child process (then cached)."""
    path = user_cache_dir() / "attention_selftest.json"
    key = _key(shapes, dtype, device)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return {**known[key], "cached": True}
    spec = {"shapes": [list(s) for s in shapes], "dtype": str(dtype).removeprefix("torch."),
            "device": f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"}
    try:
        p = subprocess.run([sys.executable, "-m", "trainer.attention", json.dumps(spec)], capture_output=True,
                           text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": _pythonpath()})
        out = verdict(p.stdout.splitlines(), p.returncode, p.stderr)
    except subprocess.TimeoutExpired:
        out = {"cudnn": False, "why": f"the test process took over {timeout:.0f} s", "results": []}
    from .fileio import write_text_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({**known, key: out}, indent=1))
    except OSError as e:  # a read-only home: the test runs again next time
        log.warning("attention self-test: verdict not cached (%s)", e)
    return {**out, "cached": False}


def _pythonpath() -> str:
    """The child imports this package from where the parent did (an editable checkout, a ComfyUI custom node)."""
    here = str(Path(__file__).resolve().parent.parent)
    rest = os.environ.get("PYTHONPATH")
    return here + (os.pathsep + rest if rest else "")


def use_cudnn(on: bool) -> None:
    """cuDNN attention on and first in the dispatcher's order, or off."""
    torch.backends.cuda.enable_cudnn_sdp(on)
    if on and hasattr(torch._C, "_set_sdp_priority_order"):
        from torch.nn.attention import SDPBackend

        first = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]
        rest = [b for b in torch._C._get_sdp_priority_order() if b not in [int(x) for x in first]]
        torch._C._set_sdp_priority_order([int(b) for b in first] + rest)


@contextmanager
def cudnn_attention_off() -> Iterator[None]:
    """cuDNN attention off for what runs inside (an eager forward in a run whose compiled blocks use it), then
    as it was."""
    was = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)


def main() -> None:
    spec = json.loads(sys.argv[1])
    device = torch.device(spec.get("device", "cuda"))
    backends = ("default", "cudnn") if device.type == "cuda" else ("default",)
    probe([tuple(s) for s in spec["shapes"]], getattr(torch, spec["dtype"]), device, backends,
          emit=lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()
