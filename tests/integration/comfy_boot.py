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


def named_file(text: str) -> tuple[str, str]:
    """argparse type of `--lora NAME=FILE`."""
    import argparse

    name, sep, path = text.partition("=")
    if not sep or not name or not path or name in ("base", "base_after"):
        raise argparse.ArgumentTypeError(f"expected NAME=FILE (NAME not base / base_after), got {text!r}")
    return name, path


def run_with_each_lora(patcher, loras: list[tuple[str, str]], capture: LogCapture, run) -> tuple[dict, dict]:
    """`run(model)` with each LoRA file applied alone through comfy.sd.load_lora_for_models (what LoraLoaderModelOnly
    calls), then once more on the unpatched model (`base_after`: patching left it untouched). Returns the outputs by
    name and, per LoRA, its tensor count, what ComfyUI logged as not loaded, and the keys it patched."""
    import comfy.sd
    import comfy.utils

    outputs, report = {}, {}
    for name, path in loras:
        lora_sd = comfy.utils.load_torch_file(path, safe_load=True)
        mark = len(capture.messages)
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora_sd, 1.0, 0)
        messages = capture.messages[mark:]
        outputs[name] = run(patched)
        report[name] = {"lora_tensors": len(lora_sd),
                        "not_loaded": [m for m in messages if "lora key not loaded" in m or m.startswith("NOT LOADED")],
                        "patched_keys": sorted(patched.patches.keys())}
        del patched, lora_sd
    outputs["base_after"] = run(patcher)
    return outputs, report
