"""Starting a job's ranks on the CPU (gloo) as torchrun does, for the several-process tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

import trainer

ROOT = Path(trainer.__file__).resolve().parent.parent  # the checkout under test: the ranks import this one
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launch_env(**launch: str) -> dict[str, str]:
    """This environment without a launch's variables (plus `launch`), the checkout first on the path, one thread."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    return {**env, **launch}


def write_job(d: dict, folder: Path) -> Path:
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def torchrun(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 ARGS...` (through torch.distributed.run)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], cwd=cwd, env=env or launch_env(), capture_output=True, text=True, timeout=timeout)


def rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """|a - b| / |b| over every tensor of two state dicts with the same keys."""
    assert a.keys() == b.keys()
    va = torch.cat([a[k].double().flatten() for k in sorted(a)])
    vb = torch.cat([b[k].double().flatten() for k in sorted(b)])
    return float((va - vb).norm() / vb.norm())
