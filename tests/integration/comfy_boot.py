"""What every comfy_check_*.py script does first, inside ComfyUI's python: ComfyUI (and this repository) on
sys.path, every log record captured (ComfyUI reports unloaded LoRA keys and missing weights only in its log),
and the CPU selected before any other comfy import (model_management reads it at import time)."""

from __future__ import annotations

import logging
import os
import sys


class LogCapture(logging.Handler):
    """Every record logged anywhere while ComfyUI loads and patches."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.messages.append(record.getMessage())
        except Exception:  # a malformed record must not hide the rest
            self.messages.append(str(record.msg))


def boot(comfyui: str, repo: str | None = None) -> LogCapture:
    for p in (repo, comfyui):
        if p:
            sys.path.insert(0, os.path.abspath(p))
    capture = LogCapture()
    root = logging.getLogger()
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    from comfy.cli_args import args

    args.cpu = True
    return capture
