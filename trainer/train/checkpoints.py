"""The run folder: step saves, the final save, and the state a resumed run starts from.

`{name}_{step:09d}.safetensors` is what users load; `training_state.pt` (full-precision network,
optimizer, scheduler, step) is what resume reads. Every write is atomic.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from ..errors import UserError
from ..fileio import save_safetensors_atomic, torch_save_atomic

log = logging.getLogger("trainer")

STATE_FILE = "training_state.pt"
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


class RunFolder:
    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name
        self.samples = root / "samples"
        root.mkdir(parents=True, exist_ok=True)

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
        torch_save_atomic(state, self.state_path)

    def load_state(self) -> dict | None:
        if not self.state_path.exists():
            return None
        try:
            return torch.load(self.state_path, map_location="cpu", weights_only=False)
        except Exception as e:  # a state we cannot read must not be silently replaced
            raise UserError(
                f"{self.state_path}: cannot read the saved training state ({e}). Move it away to start over;"
                " the saved LoRA files are untouched."
            ) from None


def check_resumable(state: dict, network_shapes: dict[str, tuple[int, ...]], arch: str, path: Path) -> None:
    saved = state.get("network_shapes")
    if state.get("arch") != arch or saved != network_shapes:
        raise UserError(
            f"{path}: this run folder holds a run of another model or network (arch {state.get('arch')!r},"
            f" {len(saved or {})} tensors); use a new config.name, or move the folder away to start over"
        )
