"""Runs INSIDE ComfyUI's own python (not the trainer's): an SD3 transformer file and network files, the way
ComfyUI loads and runs them.

    cd <ComfyUI> && <comfy python> comfy_check_sd3.py --model sd3.safetensors \
        --lora lora=lora.safetensors ... --inputs inputs.safetensors --out result.safetensors --report result.json

inputs.safetensors holds `latents` (b, 16, h, w), `context` (b, n, d), `pooled` (b, p) and `sigma` (b,). The model
is loaded by comfy.sd.load_diffusion_model (ComfyUI's detection decides what it is) and run through
BaseModel.apply_model, so ComfyUI's own model_sampling turns sigma into the timestep and the output into a
denoised latent; the script writes the velocity (x - denoised) / sigma: `base`, one output per `--lora NAME=FILE`
applied alone through comfy.sd.load_lora_for_models (what LoraLoaderModelOnly calls), and `base_after`. The
report holds the model and sampling classes, ComfyUI's shift and timestep of each sigma, its SD3 latent format,
and per file the LoRA-loading warnings ("lora key not loaded", "NOT LOADED") and the weights it patches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from comfy_boot import boot, named_file, run_with_each_lora


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", default=os.getcwd())
    ap.add_argument("--model", required=True)
    ap.add_argument("--lora", action="append", default=[], type=named_file, metavar="NAME=FILE")
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--report", required=True)
    a = ap.parse_args()

    capture = boot(a.comfyui)  # before any comfy import

    import torch
    from safetensors.torch import load_file, save_file

    import comfy.model_management
    import comfy.sd
    import comfy.utils

    inputs = load_file(a.inputs)
    x, sigma = inputs["latents"].float(), inputs["sigma"].float()
    patcher = comfy.sd.load_diffusion_model(a.model, model_options={"dtype": torch.float32})
    ms = patcher.model.model_sampling

    def run(p) -> torch.Tensor:
        comfy.model_management.load_models_gpu([p], force_full_load=True)
        with torch.no_grad():
            denoised = p.model.apply_model(x, sigma, c_crossattn=inputs["context"].float(), y=inputs["pooled"].float())
        comfy.model_management.unload_all_models()  # restores the unpatched weights
        return ((x - denoised.float()) / sigma.view(-1, 1, 1, 1)).contiguous()

    outputs = {"base": run(patcher)}
    patched_outputs, loras = run_with_each_lora(patcher, a.lora, capture, run)
    outputs.update(patched_outputs)

    try:
        from comfyui_version import __version__ as comfy_version
    except Exception:
        comfy_version = "unknown"
    fmt = patcher.model.latent_format
    report = {
        "comfyui_version": comfy_version,
        "model_class": type(patcher.model).__name__,
        "model_type": patcher.model.model_type.name,
        # ComfyUI builds its sampling class on the fly from ModelSamplingDiscreteFlow and the CONST (flow) objective
        "sampling_bases": sorted(c.__name__ for c in type(ms).__mro__ if c.__module__ == "comfy.model_sampling"),
        "shift": float(ms.shift),
        "timesteps": [float(t) for t in ms.timestep(sigma)],
        "latent_scale": float(fmt.scale_factor),
        "latent_shift": float(fmt.shift_factor),
        "unet_config": {k: v for k, v in patcher.model.model_config.unet_config.items()
                        if isinstance(v, (int, float, str, list, type(None)))},
        "loras": loras,
    }
    save_file(outputs, a.out)
    with open(a.report, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
