"""The resume state on disk without pickle: tensors in a safetensors file, everything else as JSON in its
metadata, and a checksum over both that is checked before anything is used.

`torch.load` of a pickle can run any code the file carries; a state file is data only. Nested structures
(optimizer state dicts have int keys and tuples) are flattened: each tensor gets a name, the JSON tree holds
references to those names.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

FORMAT = "eridiffusion.state/1"


def _pack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and "__tensor__" not in obj:
            return {k: _pack(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_pack(k, tensors), _pack(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_pack(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_pack(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    raise TypeError(f"cannot store a {type(obj).__name__} in the training state")  # a programming error


def _unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {_unpack(k, tensors): _unpack(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_unpack(v, tensors) for v in obj["__tuple__"])
        if "__dtype__" in obj:
            return getattr(torch, obj["__dtype__"])
        return {k: _unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    return obj


def _checksum(tensors: dict[str, torch.Tensor], tree: str) -> str:
    h = hashlib.blake2b(digest_size=20)
    h.update(tree.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def encode_state(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a state dict, ready for safetensors."""
    tensors: dict[str, torch.Tensor] = {}
    tree = json.dumps(_pack(state, tensors), allow_nan=True, separators=(",", ":"))
    return tensors, {"format": FORMAT, "state": tree, "checksum": _checksum(tensors, tree)}


class StateFileError(ValueError):
    """The file is not a state this version wrote, or its checksum does not match."""


def read_state_step(path: str | os.PathLike) -> int | None:
    """The step a state file records, from its header alone (no tensors read, no checksum: for "is this run
    finished?", which the final file's own check completes); None when the header does not say."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        step = json.loads(meta["state"]).get("step") if meta.get("format") == FORMAT else None
    except Exception:  # an unreadable or foreign header: not a finished run; the full read names the problem
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def read_state(path: str | os.PathLike) -> dict:
    from safetensors import safe_open

    p = Path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise StateFileError(f"not a readable state file ({e})") from None
    if meta.get("format") != FORMAT or "state" not in meta:
        raise StateFileError(f"not a training state of this trainer (format {meta.get('format')!r})")
    if _checksum(tensors, meta["state"]) != meta.get("checksum"):
        raise StateFileError("checksum mismatch: the file was damaged after it was written")
    try:
        return _unpack(json.loads(meta["state"]), tensors)
    except (ValueError, KeyError, TypeError) as e:
        raise StateFileError(f"damaged state ({e})") from None
