"""Runs INSIDE ComfyUI's own python with ComfyUI_ExtraModels in custom_nodes: Sana as that custom node loads and runs
it (ComfyUI core has no Sana), the trainer's transformer file and network files.

    cd <ComfyUI> && <comfy python> comfy_check_sana.py --model sana.safetensors --unet-config conf.json \
        --inputs inputs.safetensors --lora lora=lora.safetensors ... --out out.safetensors --report report.json

The node is loaded by ComfyUI's own custom-node loader (nodes.load_custom_node). Its `Sana.loader.load_sana` reads
--model with a model_conf of the node's shape ({"target": "SanaMS", "unet_config": ..., "sampling_settings":
{"shift": 3}}), the unet_config being --unet-config (the node's presets are full size only; its Checkpoint Loader
node picks one of them by name). Reported: the missing / unexpected keys of the node's own load_state_dict call.
Written: `base`, the velocity (x - denoised) / sigma from BaseModel.apply_model (FLOW: timestep 1000 sigma,
denoised = x - sigma v), one output per `--lora NAME=FILE` applied through comfy.sd.load_lora_for_models (what
LoraLoaderModelOnly calls), `base_after`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys

from comfy_boot import boot, named_file, run_with_each_lora

NODE = "ComfyUI_ExtraModels"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", default=os.getcwd())
    ap.add_argument("--model", required=True)
    ap.add_argument("--unet-config", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--lora", action="append", default=[], type=named_file, metavar="NAME=FILE")
    ap.add_argument("--out", required=True)
    ap.add_argument("--report", required=True)
    a = ap.parse_args()
    capture = boot(a.comfyui)

    import torch
    from safetensors.torch import load_file, save_file

    import comfy.model_management
    import nodes

    report: dict = {}
    node_dir = os.path.join(a.comfyui, "custom_nodes", NODE)
    report["node_loaded"] = asyncio.run(nodes.load_custom_node(node_dir))
    package = node_dir.replace(".", "_x_")
    report["node_classes"] = sorted(sys.modules[package].NODE_CLASS_MAPPINGS)
    loader = importlib.import_module(f"{package}.Sana.loader")
    conf = importlib.import_module(f"{package}.Sana.conf")

    # load_sana only prints what its load_state_dict left over: record that call's result instead
    loads = []
    real_load = torch.nn.Module.load_state_dict

    def recording_load(self, state_dict, *args, **kwargs):
        result = real_load(self, state_dict, *args, **kwargs)
        if type(self).__name__ == "SanaMS":
            loads.append({"missing": sorted(result.missing_keys), "unexpected": sorted(result.unexpected_keys),
                          "file_keys": len(state_dict)})
        return result

    model_conf = {"target": "SanaMS", "unet_config": json.load(open(a.unet_config)),
                  "sampling_settings": dict(conf.sampling_settings)}
    torch.nn.Module.load_state_dict = recording_load
    try:
        patcher = loader.load_sana(model_path=a.model, model_conf=model_conf, dtype=torch.float32)
    finally:
        torch.nn.Module.load_state_dict = real_load
    report["load"] = loads
    m = patcher.model
    report["model_class"] = type(m).__name__
    report["unet_class"] = type(m.diffusion_model).__name__
    report["model_type"] = m.model_type.name
    # ComfyUI builds the sampling class on the fly (ModelSampling(sampling, prediction)): name its bases
    report["sampling"] = {"bases": [b.__name__ for b in type(m.model_sampling).__bases__], "shift": float(m.model_sampling.shift),
                          "multiplier": float(m.model_sampling.multiplier)}
    report["weight_dtype"] = str(next(m.diffusion_model.parameters()).dtype)

    inputs = load_file(a.inputs)
    x, sigma, context = inputs["latents"].float(), inputs["sigma"].float(), inputs["context"].float()
    report["timestep"] = [float(t) for t in m.model_sampling.timestep(sigma)]

    def run(p) -> torch.Tensor:
        comfy.model_management.load_models_gpu([p], force_full_load=True)
        with torch.no_grad():
            denoised = p.model.apply_model(x, sigma, c_crossattn=context)
        comfy.model_management.unload_all_models()
        return ((x - denoised.float()) / sigma.view(-1, 1, 1, 1)).contiguous()

    outputs = {"base": run(patcher)}
    patched, report["loras"] = run_with_each_lora(patcher, a.lora, capture, run)
    outputs.update(patched)

    try:
        from comfyui_version import __version__ as comfy_version
    except Exception:
        comfy_version = "unknown"
    report["comfyui_version"] = comfy_version
    save_file(outputs, a.out)
    with open(a.report, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
