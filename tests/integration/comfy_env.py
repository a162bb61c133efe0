"""Where the real ComfyUI for the integration tests is: COMFYUI_PATH, and its python (COMFYUI_PYTHON, or
<COMFYUI_PATH>/../comfy-venv/bin/python). Without them the tests skip and say why."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def comfy_install(what: str) -> tuple[Path, Path]:
    """(ComfyUI folder, its python), or skip naming the test `what`."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip(f"set COMFYUI_PATH to a ComfyUI install to run the {what}")
    comfy = Path(path).expanduser().resolve()
    if not (comfy / "main.py").is_file() or not (comfy / "comfy" / "sd.py").is_file():
        pytest.skip(f"COMFYUI_PATH={path} is not a ComfyUI folder (no main.py, comfy/sd.py)")
    py = os.environ.get("COMFYUI_PYTHON")
    python = Path(py).expanduser() if py else comfy.parent / "comfy-venv" / "bin" / "python"
    if not python.exists():
        pytest.skip(f"set COMFYUI_PYTHON to ComfyUI's python ({python} does not exist)")
    return comfy, python


def fixture_cache() -> Path:
    """Where the integration tests keep the random model files they write (ERI_FIXTURE_CACHE)."""
    default = Path.home() / ".cache" / "eridiffusion" / "comfy-fixtures"
    return Path(os.environ.get("ERI_FIXTURE_CACHE", default)).expanduser()
