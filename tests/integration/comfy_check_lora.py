"""Runs INSIDE ComfyUI's own python (not the trainer's): load a Flux checkpoint once and one or more LoRA
files (LoRA, LoHa, LoKr, DoRA: any network file ComfyUI reads) the way ComfyUI does, and report what it
loaded and what each patched model computes.

    cd <ComfyUI> && <comfy python> comfy_check_lora.py --model flux.safetensors \
        --lora lora=lora.safetensors --lora loha=loha.safetensors ... \
        --inputs inputs.safetensors --out result.safetensors --report result.json

inputs.safetensors holds `latents` (b, 16, h, w), `t5` (b, n, d), `pooled` (b, d), `sigma` (b,) and
`guidance` (b,). The script writes to --out: `base` (the model without any LoRA), one output per
`--lora NAME=FILE` under NAME (that file applied alone at strength 1 to the unpatched model), and
`base_after` (the model without LoRA again, after all of them: proves each file was unpatched before the
next). To --report: ComfyUI's version and model class, and per NAME the LoRA-loading warnings ComfyUI
logged ("lora key not loaded", "NOT LOADED"), the number of tensors in the file and the weight keys it
patches.

The model is loaded once (ComfyUI startup and model load dominate the time); each file is applied to a
clone of its patcher, as the LoraLoaderModelOnly node does, and all models are unloaded (weights
restored) before the next file. Only ComfyUI's public loading path is used: comfy.sd.load_diffusion_model,
comfy.sd.load_lora_for_models (what LoraLoaderModelOnly calls) and comfy.model_management.load_models_gpu,
which patches the weights before a forward pass.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from comfy_boot import boot, named_file
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", default=os.getcwd(), help="ComfyUI folder (default: the working directory)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--lora", required=True, action="append", type=named_file, metavar="NAME=FILE",
                    help="a LoRA file to apply (alone) and the name of its output; repeatable")
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--report", required=True)
    a = ap.parse_args()
    names = [n for n, _ in a.lora]
    if len(set(names)) != len(names):
        ap.error(f"--lora names must be unique: {names}")

    capture = boot(a.comfyui)  # before any comfy import

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
        # unpatch (restore the original weights) so the next file starts from the base model
        comfy.model_management.unload_all_models()
        return out.float().cpu().contiguous()

    outputs = {"base": run(model)}
    per_lora = {}
    for name, path in a.lora:
        t0 = time.monotonic()
        lora_sd = comfy.utils.load_torch_file(path, safe_load=True)
        mark = len(capture.messages)
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, 1.0, 0)
        messages = capture.messages[mark:]
        outputs[name] = run(patched)
        per_lora[name] = {
            "file": path,
            "lora_tensors": len(lora_sd),
            "not_loaded": [m for m in messages if "lora key not loaded" in m or m.startswith("NOT LOADED")],
            "patched_keys": sorted(patched.patches.keys()),
            "lora_messages": messages[-50:],
            "seconds": round(time.monotonic() - t0, 2),
        }
        del patched, lora_sd
    outputs["base_after"] = run(model)

    try:
        from comfyui_version import __version__ as comfy_version
    except Exception:
        comfy_version = "unknown"

    report = {
        "comfyui_version": comfy_version,
        "model_class": type(model.model).__name__,
        "diffusion_model_class": type(model.model.diffusion_model).__name__,
        "weight_dtype": str(next(model.model.diffusion_model.parameters()).dtype),
        "load_messages": capture.messages[:mark_loaded][-20:],
        "loras": per_lora,
    }
    save_file(outputs, a.out)
    with open(a.report, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
