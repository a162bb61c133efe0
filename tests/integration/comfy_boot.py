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


def _header_tensors(path: str):
    """A safetensors header's tensors on the meta device (what ComfyUI's detection reads), no weights."""
    import json
    import struct

    import torch

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: torch.empty(v["shape"], dtype=torch.bfloat16, device="meta") for k, v in header.items()
            if k != "__metadata__"}


def detect_header(path: str, keys_file: str | None, model_cls, base_cls) -> dict:
    """ComfyUI's detection of a header-only file with a full-size key set: the config class it picks, its own
    diffusion model (`model_cls`) at the detected config built on the meta device and compared key by key with the
    file, and, with `keys_file` (LoRA target keys), those keys looked up in the LoRA key map of its `base_cls` model."""
    import json

    import torch

    import comfy.lora
    import comfy.model_detection as md
    import comfy.ops
    import comfy.utils

    sd = _header_tensors(path)
    prefix = md.unet_prefix_from_state_dict(sd)
    stripped = comfy.utils.state_dict_prefix_replace(sd, {prefix: ""}, filter_keys=True) or sd
    cfg = md.model_config_from_unet(stripped, "")
    out = {"class": type(cfg).__name__ if cfg is not None else None, "prefix": prefix}
    if cfg is None:
        return out
    out["unet_config"] = {k: v for k, v in cfg.unet_config.items() if isinstance(v, (int, float, str, list, tuple))
                          or v is None}
    with torch.device("meta"):
        comfy_model = model_cls(**cfg.unet_config, operations=comfy.ops.disable_weight_init)
    theirs = {k: list(v.shape) for k, v in comfy_model.state_dict().items()}
    ours = {k: list(v.shape) for k, v in stripped.items()}
    out["keys_only_in_file"] = sorted(set(ours) - set(theirs))[:20]
    out["keys_only_in_comfy"] = sorted(set(theirs) - set(ours))[:20]
    out["shape_mismatches"] = sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])[:20]
    out["n_keys"] = len(theirs)
    if keys_file:
        cfg.set_inference_dtype(torch.bfloat16, None)
        base = base_cls(cfg, device=torch.device("meta"))
        key_map = comfy.lora.model_lora_keys_unet(base, {})
        wanted = json.loads(open(keys_file, encoding="utf-8").read())
        out["lora_keys"] = len(wanted)
        out["lora_keys_unmapped"] = [k for k in wanted if key_map.get(k) != f"{k}.weight"][:20]
    return out
