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
import struct
import sys

from comfy_boot import boot, named_file, run_with_each_lora


def _header_tensors(path: str):
    import torch

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: torch.empty(v["shape"], dtype=torch.bfloat16, device="meta") for k, v in header.items()
            if k != "__metadata__"}


def detect(path: str, keys_file: str | None) -> dict:
    import torch

    import comfy.lora
    import comfy.model_base
    import comfy.model_detection as md
    import comfy.ops
    import comfy.utils
    from comfy.ldm.hidream.model import HiDreamImageTransformer2DModel

    sd = _header_tensors(path)
    prefix = md.unet_prefix_from_state_dict(sd)
    stripped = comfy.utils.state_dict_prefix_replace(sd, {prefix: ""}, filter_keys=True) or sd
    cfg = md.model_config_from_unet(stripped, "")
    out = {"class": type(cfg).__name__ if cfg is not None else None, "prefix": prefix}
    if cfg is None:
        return out
    out["unet_config"] = {k: v for k, v in cfg.unet_config.items() if isinstance(v, (int, float, str, list, tuple))}
    with torch.device("meta"):
        comfy_model = HiDreamImageTransformer2DModel(**cfg.unet_config, operations=comfy.ops.disable_weight_init)
    theirs = {k: list(v.shape) for k, v in comfy_model.state_dict().items()}
    ours = {k: list(v.shape) for k, v in stripped.items()}
    out["keys_only_in_file"] = sorted(set(ours) - set(theirs))[:20]
    out["keys_only_in_comfy"] = sorted(set(theirs) - set(ours))[:20]
    out["shape_mismatches"] = sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])[:20]
    out["n_keys"] = len(theirs)
    if keys_file:
        cfg.set_inference_dtype(torch.bfloat16, None)
        base = comfy.model_base.HiDream(cfg, device=torch.device("meta"))
        key_map = comfy.lora.model_lora_keys_unet(base, {})
        wanted = json.loads(open(keys_file, encoding="utf-8").read())
        out["lora_keys"] = len(wanted)
        out["lora_keys_unmapped"] = [k for k in wanted if key_map.get(k) != f"{k}.weight"][:20]
    return out


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
