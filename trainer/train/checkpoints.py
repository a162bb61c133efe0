"""The run folder: step saves, the final save, and the state a resumed run starts from.

`{name}_{step:09d}.safetensors` is what users load; `training_state.safetensors` (full-precision network,
optimizer, scheduler, step; data only, checksummed: see state_file.py) is what resume reads. Every write is
atomic. A `training_state.pt` of an earlier version is read with torch's weights-only loader, never unpickled.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from ..errors import UserError
from ..fileio import save_safetensors_atomic
from .state_file import StateFileError, encode_state, read_state

log = logging.getLogger("trainer")

STATE_FILE = "training_state.safetensors"
LEGACY_STATE_FILE = "training_state.pt"
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


LOCK_FILE = ".lock"
_HELD: dict[str, "RunFolder"] = {}  # run folders this process holds the lock of: a newer session takes it over


class RunFolder:
    """One run's folder. Opening it checks that it is a folder that can be written, takes its lock (one run per
    folder at a time: a second one is told which process holds it) and removes temp files a killed run left."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name
        self.samples = root / "samples"
        self._lock = None
        if root.exists() and not root.is_dir():
            raise UserError(f"{root}: the run folder is a file; move it away or use another config.name")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{root}: cannot create the run folder ({e.strerror or e})") from None
        for path, kind in ((self.samples, "folder"), (self.metrics_path, "file"), (self.state_path, "file")):
            if path.exists() and (path.is_dir() if kind == "file" else not path.is_dir()):
                raise UserError(f"{path}: expected a {kind} here; move it away")

    def lock(self) -> None:
        """Take the run folder's lock (released on exit, and by the OS if the process dies)."""
        import filelock

        key = str(self.root.resolve())
        if key in _HELD:  # this process's older run of the same folder (a host's replaced session) gives it up
            _HELD.pop(key).unlock()
        lock = filelock.FileLock(str(self.root / LOCK_FILE), timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            holder = _lock_holder(self.root / LOCK_FILE)
            raise UserError(f"{self.root}: another run is training into this folder{holder}; wait for it to end, or"
                            " use another config.name") from None
        except OSError as e:
            raise UserError(f"{self.root}: cannot write into the run folder ({e.strerror or e})") from None
        (self.root / LOCK_FILE).with_suffix(".pid").write_text(str(os.getpid()))
        self._lock = lock
        _HELD[key] = self
        self.remove_stale_temp_files()

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
            if _HELD.get(str(self.root.resolve())) is self:
                _HELD.pop(str(self.root.resolve()))

    def trim_metrics(self, step: int) -> None:
        """On resume: metrics of steps after the resume point (trained, then lost with an interrupted run) go."""
        from ..fileio import read_jsonl, write_text_atomic

        if not self.metrics_path.is_file():
            return
        records = read_jsonl(self.metrics_path)
        kept = [r for r in records if not isinstance(r.get("step"), int) or r["step"] <= step]
        if len(kept) != len(records):
            import json

            write_text_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    def restart(self) -> None:
        """`--restart`: the state and metrics set aside (renamed with a time stamp), so the run starts over."""
        import time

        stamp = time.strftime("%Y%m%d-%H%M%S")
        for p in (self.state_path, self.root / LEGACY_STATE_FILE, self.metrics_path):
            if p.exists():
                p.rename(p.with_name(f"{p.stem}.{stamp}.old{p.suffix}"))

    def remove_stale_temp_files(self) -> int:
        """Temp files of atomic writes a killed run left behind (a Flux state is GBs); only with the lock held."""
        n = 0
        for folder in (self.root, self.samples):
            if folder.is_dir():
                for p in folder.glob(".*.tmp"):
                    p.unlink(missing_ok=True)
                    n += 1
        if n:
            log.info("removed %d temp files an interrupted run left in %s", n, self.root)
        return n

    @property
    def state_path(self) -> Path:
        return self.root / STATE_FILE

    @property
    def final_path(self) -> Path:
        return self.root / f"{self.name}.safetensors"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    def step_path(self, step: int) -> Path:
        return self.root / f"{self.name}_{step:09d}.safetensors"

    def step_saves(self) -> list[tuple[int, Path]]:
        pat = re.compile(re.escape(self.name) + r"_(\d{9})\.safetensors$")
        out = []
        for p in self.root.iterdir():
            m = pat.match(p.name)
            if m:
                out.append((int(m.group(1)), p))
        return sorted(out)

    def save_network(self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        save_safetensors_atomic(tensors, path, metadata)

    def prune(self, keep: int) -> None:
        saves = self.step_saves()
        for _, p in saves[: max(0, len(saves) - keep)] if keep > 0 else saves:
            p.unlink(missing_ok=True)

    def save_state(self, state: dict) -> None:
        tensors, metadata = encode_state(state)
        save_safetensors_atomic(tensors, self.state_path, metadata)
        (self.root / LEGACY_STATE_FILE).unlink(missing_ok=True)  # superseded

    def load_state(self) -> dict | None:
        legacy = self.root / LEGACY_STATE_FILE
        if not self.state_path.exists() and legacy.exists():
            return self._load_legacy(legacy)
        if not self.state_path.exists():
            return None
        try:
            return read_state(self.state_path)
        except StateFileError as e:
            raise UserError(self._unusable(self.state_path, str(e))) from None

    def _load_legacy(self, path: Path) -> dict:
        try:  # torch's restricted unpickler: tensors and plain containers only, never code
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many kinds here
            raise UserError(self._unusable(path, f"not a plain-data state ({type(e).__name__})")) from None

    def _unusable(self, path: Path, why: str) -> str:
        saves = [p for _, p in self.step_saves()] + ([self.final_path] if self.final_path.exists() else [])
        last = f" The last LoRA save is {saves[-1]}." if saves else ""
        return (f"{path}: cannot resume from this training state: {why}. Nothing was changed; the saved LoRA files"
                f" are untouched.{last} To start over, move {path.name} away (or use a new config.name); to continue"
                f" from a LoRA save, start a new run with network.pretrained_lora_path set to it.")


STATE_FIELDS = {"step": int, "arch": str, "network": dict, "network_shapes": dict, "optimizer": dict,
                "scheduler": dict}


def check_resumable(state: dict, network_shapes: dict[str, tuple[int, ...]], arch: str, total_steps: int,
                    path: Path) -> None:
    """A state is used only if it is whole and of this run's model and network; else one message that says why."""
    for key, kind in STATE_FIELDS.items():
        if not isinstance(state.get(key), kind) or (kind is int and isinstance(state.get(key), bool)):
            raise UserError(f"{path}: damaged training state ({key!r} is missing or not a {kind.__name__}); the"
                            " saved LoRA files are untouched. Move the state away to start over.")
    if not 0 <= state["step"] <= total_steps:
        raise UserError(f"{path}: the state is at step {state['step']}, outside this run's 0..{total_steps}")
    saved = {k: tuple(v) for k, v in state["network_shapes"].items()}
    if state["arch"] != arch or saved != network_shapes:
        changed = [k for k in sorted(set(saved) | set(network_shapes)) if saved.get(k) != network_shapes.get(k)]
        what = (f"arch {state['arch']!r} -> {arch!r}" if state["arch"] != arch else
                f"{len(changed)} network tensors differ (e.g. {changed[0]}: {saved.get(changed[0])} ->"
                f" {network_shapes.get(changed[0])})")
        raise UserError(
            f"{path}: this run folder holds a run of another model or network ({what}); use a new config.name,"
            " or move the folder away to start over"
        )
    for k, t in state["network"].items():
        if not isinstance(t, torch.Tensor) or not bool(torch.isfinite(t).all()):
            raise UserError(f"{path}: the saved network tensor {k} is not finite; the state is unusable (the step"
                            " saves are untouched)")


def _lock_holder(lock: Path) -> str:
    try:
        return f" (process {int(lock.with_suffix('.pid').read_text().strip())})"
    except (OSError, ValueError):
        return ""
