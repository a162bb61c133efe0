"""Runs INSIDE ComfyUI's own python: a small HiDream transformer file in ComfyUI's own HiDream model class, the
network files applied through ComfyUI's LoRA loader, and ComfyUI's detection of a full-size HiDream key set.

    cd <ComfyUI> && <comfy python> comfy_check_hidream.py --model hidream.safetensors --unet-config cfg.json \
        --lora lora=lora.safetensors ... --inputs inputs.safetensors --out result.safetensors --report result.json \
        [--detect full_header.safetensors --keys keys.json]

ComfyUI fixes HiDream's config at full size (model_detection.py), so the small model is built as ComfyUI builds a
detected one, from its `supported_models.HiDream` entry, with the small `unet_config` given (load_diffusion_model's
own steps: model_config.get_model, load_model_weights, ModelPatcher). inputs.safetensors: `latents` (b, 16, h, w),
`t5` (b, n, d), `llama` (b, layers, n, d: ComfyUI's conditioning_llama3), `pooled` (b, d), `sigma` (b,). Outputs: the
velocity (x - denoised) / sigma for `base`, each `--lora`, `base_after`. With --detect: a safetensors file whose
header holds a full-size key set (no weights); its tensors are made on the meta device and put through
comfy.model_detection; ComfyUI's own model at the detected config is built on the meta device and its key set and
shapes compared with the file's; and the `--keys` (LoRA target keys) looked up in ComfyUI's LoRA key map of it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from comfy_boot import boot, detect_header, named_file, run_with_each_lora


def detect(path: str, keys_file: str | None) -> dict:
    import comfy.model_base
    from comfy.ldm.hidream.model import HiDreamImageTransformer2DModel

    return detect_header(path, keys_file, HiDreamImageTransformer2DModel, comfy.model_base.HiDream)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", default=os.getcwd())
    ap.add_argument("--model", required=True)
    ap.add_argument("--unet-config", required=True)
    ap.add_argument("--lora", action="append", default=[], type=named_file, metavar="NAME=FILE")
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--report", required=True)
    ap.add_argument("--detect", default=None)
    ap.add_argument("--keys", default=None)
    a = ap.parse_args()
    capture = boot(a.comfyui)

    import torch
    from safetensors.torch import load_file, save_file

    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    inputs = load_file(a.inputs)
    x, sigma = inputs["latents"].float(), inputs["sigma"].float()
    unet_config = {"image_model": "hidream", **json.loads(open(a.unet_config, encoding="utf-8").read())}
    model_config = comfy.supported_models.HiDream(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    sd = comfy.utils.load_torch_file(a.model)
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    sd = comfy.utils.state_dict_prefix_replace(sd, {prefix: ""}, filter_keys=True) or sd
    mark = len(capture.messages)
    model = model_config.get_model(sd, "")
    model.load_model_weights(sd, "")
    load_messages = [m for m in capture.messages[mark:] if m.startswith(("unet missing", "unet unexpected"))]
    device = comfy.model_management.get_torch_device()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)

    def run(p) -> torch.Tensor:
        comfy.model_management.load_models_gpu([p], force_full_load=True)
        with torch.no_grad():
            denoised = p.model.apply_model(x, sigma, c_crossattn=inputs["t5"].float(), y=inputs["pooled"].float(),
                                           encoder_hidden_states_llama3=inputs["llama"].float())
        comfy.model_management.unload_all_models()
        return ((x - denoised.float()) / sigma.view(-1, 1, 1, 1)).contiguous()

    outputs = {"base": run(patcher)}
    patched_outputs, loras = run_with_each_lora(patcher, a.lora, capture, run)
    outputs.update(patched_outputs)

    report = {"model_class": type(model).__name__, "config_class": type(model_config).__name__,
              "model_type": model.model_type.name, "load_messages": load_messages,
              "timesteps": [float(t) for t in model.model_sampling.timestep(sigma)],
              "latent_format": type(model.latent_format).__name__, "loras": loras}
    if a.detect:
        report["detection"] = detect(a.detect, a.keys)
    save_file(outputs, a.out)
    with open(a.report, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
