"""Runs INSIDE ComfyUI's own python with ComfyUI-Kolors-MZ in custom_nodes: Kolors as that custom node loads and runs
it (ComfyUI core has no Kolors), the trainer's files and network files.

    cd <ComfyUI> && <comfy python> comfy_check_kolors.py --real-shapes real.json --unet tiny_unet.safetensors \
        --unet-config tiny_config.json --lora lora=lora.safetensors ... --inputs inputs.safetensors \
        --chatglm tiny_chatglm.safetensors --chatglm-config glm.json --prompts prompts.json --out out.safetensors \
        --report report.json

The node is loaded by ComfyUI's own custom-node loader (nodes.load_custom_node).
1. Real size, names only: --real-shapes holds `diffusers_shapes` (Kolors' UNet in diffusers' layout, the file MZ
   users keep in models/unet) and `targets` (the trainer's LoRA target keys and weight shapes). Inside the node's
   `apply_kolors` hook, ComfyUI's diffusers-UNet detection (the node's kolors_unet_config_from_diffusers_unet) must
   give the node's KolorsSupported, ComfyUI's diffusers -> LDM key table must take every tensor, and ComfyUI's LoRA key
   map over the node's model (KolorsSDXL / KolorsUNetModel, built on the meta device) must take every target key
   onto a weight of the same shape.
2. Tiny, numbers: the node's loader node (MZ_KolorsUNETLoaderV2) loads --unet from models/unet. It detects only the
   full 2.6B Kolors (its config table is hard-coded), so two names of its hook module are given the tiny size: the
   detection returns --unet-config (the node's config dict at the tiny widths) and KolorsSupported matches those
   widths; everything else is the node's and ComfyUI's code. Written: `base` (eps = (x - denoised) / sigma from
   BaseModel.apply_model with SDXL's encode_adm and the node's encoder_hid_proj), one output per `--lora NAME=FILE`
   applied through comfy.sd.load_lora_for_models (what LoraLoaderModelOnly calls), `base_after`.
3. Text: the node's own ChatGLM3 code (its chatglm3 package: THUDM's modeling and tokenizer) with its own config file
   at the sizes of --chatglm-config (in fp32, where the node's file and config are fp16), the weights of --chatglm loaded as its MZ_ChatGLM3Loader loads them, the tokenizer it ships (configs/tokenizer,
   ChatGLM3's real vocabulary), through its chatglm3_text_encode for each prompt of --prompts: `text_context_<i>`,
   `text_pooled_<i>` and `text_ids_<i>`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import shutil
import sys

from comfy_boot import boot, named_file, run_with_each_lora

NODE = "ComfyUI-Kolors-MZ"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", default=os.getcwd())
    ap.add_argument("--real-shapes", required=True)
    ap.add_argument("--unet", required=True)
    ap.add_argument("--unet-config", required=True)
    ap.add_argument("--lora", action="append", default=[], type=named_file, metavar="NAME=FILE")
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--chatglm", required=True)
    ap.add_argument("--chatglm-config", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--report", required=True)
    a = ap.parse_args()
    capture = boot(a.comfyui)

    import torch
    from safetensors.torch import load_file, save_file

    import comfy.lora
    import comfy.model_detection
    import comfy.model_management
    import comfy.sd
    import comfy.supported_models
    import comfy.utils
    import folder_paths
    import nodes

    report: dict = {}
    outputs: dict = {}

    # the custom node, loaded as ComfyUI loads custom nodes at startup
    node_dir = os.path.join(a.comfyui, "custom_nodes", NODE)
    report["node_loaded"] = asyncio.run(nodes.load_custom_node(node_dir))
    package = node_dir.replace(".", "_x_")
    mz = sys.modules[package]
    report["node_classes"] = sorted(mz.NODE_CLASS_MAPPINGS)
    hook = importlib.import_module(f"{package}.hook_comfyui_kolors_v2")
    core = importlib.import_module(f"{package}.mz_kolors_core")

    # 1. real size: the node's detection, ComfyUI's key table, the LoRA key map over the node's model
    real = json.load(open(a.real_shapes))
    fake = {k: torch.empty(v, device="meta") for k, v in real["diffusers_shapes"].items()}
    with hook.apply_kolors():
        model_config = comfy.model_detection.model_config_from_diffusers_unet(dict(fake))
        report["real_model_config"] = type(model_config).__name__ if model_config is not None else None
        if model_config is not None:
            to_ldm = comfy.utils.unet_to_diffusers(model_config.unet_config)
            report["real_unconverted"] = sorted(k for k in fake if k not in to_ldm)
            ldm = {to_ldm[k]: v for k, v in fake.items() if k in to_ldm}
            model_config.set_inference_dtype(torch.float16, None)
            model = model_config.get_model(ldm, "", device="meta")
            report["real_model_class"] = type(model.diffusion_model).__name__
            ldm_shapes = {k: list(v.shape) for k, v in ldm.items()}
            weights = {k[len("diffusion_model."):]: list(v.shape) for k, v in model.state_dict().items()
                       if k.startswith("diffusion_model.")}
            report["real_weight_mismatch"] = sorted(k for k, s in ldm_shapes.items() if weights.get(k) != s)
            report["real_weights_not_in_file"] = sorted(set(weights) - set(ldm_shapes))
            key_map = comfy.lora.model_lora_keys_unet(model, {})
            model_weights = {k: list(v.shape) for k, v in model.state_dict().items()}
            report["real_targets"] = len(real["targets"])
            report["real_unmapped"] = [k for k in real["targets"] if k not in key_map]
            report["real_shape_mismatch"] = [k for k, s in real["targets"].items()
                                             if k in key_map and model_weights.get(key_map[k]) != s]
            del model
    del fake

    # 2. tiny: the node's UNet loader node, its detection table given the tiny size
    tiny = json.load(open(a.unet_config))

    class TinyKolors(hook.KolorsSupported):
        unet_config = {k: tiny[k] for k in hook.KolorsSupported.unet_config}

    def tiny_detection(state_dict, dtype=None):
        return comfy.model_detection.convert_config(dict(tiny, dtype=dtype))

    hook.KolorsSupported, full_size = TinyKolors, hook.KolorsSupported
    hook.kolors_unet_config_from_diffusers_unet = tiny_detection
    unet_dir = os.path.join(os.path.dirname(os.path.abspath(a.out)), "models_unet")  # beside the outputs, not in /tmp
    os.makedirs(unet_dir, exist_ok=True)
    shutil.copy(a.unet, os.path.join(unet_dir, "kolors_tiny.safetensors"))
    folder_paths.add_model_folder_path("unet", unet_dir)
    mark = len(capture.messages)
    (patcher,) = mz.NODE_CLASS_MAPPINGS["MZ_KolorsUNETLoaderV2"]().load_unet(unet_name="kolors_tiny.safetensors")
    load_log = capture.messages[mark:]
    report["load_problems"] = [m for m in load_log if m.startswith(("unet missing", "unet unexpected", "left over keys"))
                               or "does not match" in m]
    report["model_class"] = type(patcher.model).__name__
    report["unet_class"] = type(patcher.model.diffusion_model).__name__
    report["model_type"] = patcher.model.model_type.name
    report["sampling"] = {"timesteps": len(patcher.model.model_sampling.sigmas),
                          "sigma_max": float(patcher.model.model_sampling.sigma_max)}

    inputs = load_file(a.inputs)
    x, sigma = inputs["latents"].float(), inputs["sigma"].float()
    h, w = inputs["size"].tolist()
    report["timestep"] = [float(t) for t in patcher.model.model_sampling.timestep(sigma)]

    def run(p) -> torch.Tensor:
        comfy.model_management.load_models_gpu([p], force_full_load=True)
        m = p.model
        with torch.no_grad():
            y = m.encode_adm(pooled_output=inputs["pooled"].float(), width=w, height=h)
            denoised = m.apply_model(x, sigma, c_crossattn=inputs["context"].float(), y=y)
        comfy.model_management.unload_all_models()
        return ((x - denoised.float()) / sigma.view(-1, 1, 1, 1)).contiguous()

    outputs["base"] = run(patcher)
    patched_outputs, report["loras"] = run_with_each_lora(patcher, a.lora, capture, run)
    outputs.update(patched_outputs)
    hook.KolorsSupported = full_size

    # 3. text: the node's ChatGLM3 code and tokenizer, its encode function
    glm_config = importlib.import_module(f"{package}.chatglm3.configuration_chatglm")
    glm_model = importlib.import_module(f"{package}.chatglm3.modeling_chatglm")
    glm_tok = importlib.import_module(f"{package}.chatglm3.tokenization_chatglm")
    # the node's own config file (configs/text_encoder_config.json), its sizes those of the tiny model
    config = json.load(open(os.path.join(node_dir, "configs", "text_encoder_config.json")))
    config.update(json.load(open(a.chatglm_config)))
    glm = glm_config.ChatGLMConfig(**config)
    if not hasattr(glm, "use_cache"):
        # transformers 5 no longer keeps `use_cache` on a config, and the node's modeling code reads it: the node's
        # text encoding fails there as it ships; the value its config file holds is set back (it changes no output)
        glm.use_cache = config["use_cache"]
        report["chatglm_use_cache_restored"] = True
    with torch.no_grad():
        # the config file says float16 (the node runs the fp16 file in half precision): fp32 here, as the trainer's
        # side, so that the comparison is of the code and not of the rounding
        encoder = glm_model.ChatGLMModel(glm).eval().float()
    encoder.load_state_dict(comfy.utils.load_torch_file(a.chatglm))  # the loader's path without accelerate
    tokenizer = glm_tok.ChatGLMTokenizer.from_pretrained(os.path.join(node_dir, "configs", "tokenizer"))
    for i, prompt in enumerate(json.load(open(a.prompts))):
        with torch.no_grad():
            context, pooled = core.chatglm3_text_encode({"text_encoder": encoder, "tokenizer": tokenizer}, prompt)
        outputs[f"text_context_{i}"] = context.float().contiguous()
        outputs[f"text_pooled_{i}"] = pooled.float().contiguous()
        ids = tokenizer(prompt, padding="max_length", max_length=256, truncation=True, return_tensors="pt")["input_ids"]
        outputs[f"text_ids_{i}"] = ids.contiguous()

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
