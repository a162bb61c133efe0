"""Runs INSIDE ComfyUI's own python (not the trainer's): load a Flux checkpoint and a LoRA the way
ComfyUI does, and report what it loaded and what the patched model computes.

    cd <ComfyUI> && <comfy python> comfy_check_lora.py --model flux.safetensors --lora lora.safetensors \
        --inputs inputs.safetensors --out result.safetensors --report result.json

inputs.safetensors holds `latents` (b, 16, h, w), `t5` (b, n, d), `pooled` (b, d), `sigma` (b,) and
`guidance` (b,). The script writes `base` (model without LoRA) and `lora` (LoRA applied at strength 1)
outputs to --out, and to --report: the LoRA-loading warnings ComfyUI logged ("lora key not loaded",
"NOT LOADED"), the weight keys the LoRA patches, and ComfyUI's version.

Only ComfyUI's public loading path is used: comfy.sd.load_diffusion_model, comfy.sd.load_lora_for_models
(what the LoraLoaderModelOnly node calls) and comfy.model_management.load_models_gpu, which patches
the weights before a forward pass.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


class _Capture(logging.Handler):
    """Every record logged anywhere while ComfyUI loads and patches."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.messages.append(record.getMessage())
        except Exception:  # a malformed record must not hide the rest
            self.messages.append(str(record.msg))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", default=os.getcwd(), help="ComfyUI folder (default: the working directory)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--lora", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--report", required=True)
    a = ap.parse_args()

    sys.path.insert(0, os.path.abspath(a.comfyui))
    capture = _Capture()
    root = logging.getLogger()
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)

    from comfy.cli_args import args

    args.cpu = True  # must precede any other comfy import: model_management reads it at import time

    import torch
    from safetensors.torch import load_file, save_file

    import comfy.model_management
    import comfy.sd
    import comfy.utils

    torch.manual_seed(0)
    inputs = load_file(a.inputs)

    model = comfy.sd.load_diffusion_model(a.model, model_options={"dtype": torch.float32})
    mark_loaded = len(capture.messages)

    def run(patcher) -> torch.Tensor:
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)
        dm = patcher.model.diffusion_model
        with torch.no_grad():
            out = dm(
                inputs["latents"].float(),
                inputs["sigma"].float(),
                inputs["t5"].float(),
                y=inputs["pooled"].float(),
                guidance=inputs["guidance"].float(),
            )
        return out.float().cpu().contiguous()

    base = run(model)

    lora_sd = comfy.utils.load_torch_file(a.lora, safe_load=True)
    mark_lora = len(capture.messages)
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, 1.0, 0)
    lora_messages = capture.messages[mark_lora:]
    lora = run(patched)

    try:
        from comfyui_version import __version__ as comfy_version
    except Exception:
        comfy_version = "unknown"

    not_loaded = [m for m in lora_messages if "lora key not loaded" in m or m.startswith("NOT LOADED")]
    report = {
        "comfyui_version": comfy_version,
        "model_class": type(model.model).__name__,
        "diffusion_model_class": type(model.model.diffusion_model).__name__,
        "weight_dtype": str(next(model.model.diffusion_model.parameters()).dtype),
        "lora_tensors": len(lora_sd),
        "not_loaded": not_loaded,
        "patched_keys": sorted(patched.patches.keys()),
        "load_messages": capture.messages[:mark_loaded][-20:],
        "lora_messages": lora_messages[-50:],
    }
    save_file({"base": base, "lora": lora}, a.out)
    with open(a.report, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
