"""Runs INSIDE ComfyUI's own python (not the trainer's): SDXL checks with ComfyUI's own code.

    cd <ComfyUI> && <comfy python> comfy_check_sdxl.py --real-shapes shapes.json --model tiny.safetensors \
        [--vpred-model tiny_v.safetensors] --lora lora=lora.safetensors ... --inputs inputs.safetensors \
        --out result.safetensors --report result.json

1. Real size, names only: --real-shapes holds `ldm_shapes` (the LDM tensor names and shapes of a real-size
   SDXL UNet as the trainer writes them) and `targets` (the trainer's LoRA target keys and weight shapes).
   ComfyUI's detection reads the shapes (comfy.model_detection: which model, which config), builds that
   model on the meta device, and its LoRA key map (comfy.lora.model_lora_keys_unet, what LoraLoader uses)
   must take every target key onto a weight of the same shape.
2. Tiny, numbers: --model is a tiny SDXL-structured full checkpoint. ComfyUI only detects SDXL at its real
   size, so its config is ComfyUI's own detect_unet_config of the file, put into ComfyUI's SDXL model class
   (heads of 64 channels, 6 x 256 time ids) and loaded with ComfyUI's checkpoint prefix. The script writes
   `base` (eps = (x - denoised) / sigma from BaseModel.apply_model with SDXL's encode_adm), one output per
   `--lora NAME=FILE` applied alone through comfy.sd.load_lora_for_models (what LoraLoaderModelOnly calls),
   `base_after`, and `vpred_base` for --vpred-model (ComfyUI decides v-prediction from the file's marker).
3. Text encoders (--te-model, --te-lora, --te-config): at real size, ComfyUI's SDXLClipModel on the meta device
   and its key map (comfy.lora.model_lora_keys_clip) must take every `te_targets` key of --real-shapes onto a
   weight of the same shape. Tiny numbers: ComfyUI's SDXL clip_target over the tiny checkpoint's CLIP state
   (converted by ComfyUI's own process_clip_state_dict, OpenCLIP-G included), built as comfy.sd.CLIP with the
   tiny widths as ComfyUI's own per-encoder config overrides (`clip_l_model_config` / `clip_g_model_config`)
   and the tiny tokenizer's end/pad ids (its vocabulary table padded to ComfyUI's fixed 49408 rows, CLIP-G's
   projection square as ComfyUI builds it); the token ids come from the trainer's tokenizers (ComfyUI's tokenizer
   is the real CLIP vocabulary). Written: `te_base_cond` / `te_base_pooled`, then with --te-lora (UNet and
   text-encoder parts) applied to both MODEL and CLIP by comfy.sd.load_lora_for_models: `te_lora_cond`,
   `te_lora_pooled` and the UNet's `te_lora_eps`.
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
    ap.add_argument("--real-shapes", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--vpred-model")
    ap.add_argument("--lora", action="append", default=[], type=named_file, metavar="NAME=FILE")
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--report", required=True)
    ap.add_argument("--te-model")
    ap.add_argument("--te-lora")
    ap.add_argument("--te-config")
    a = ap.parse_args()

    capture = boot(a.comfyui)  # before any comfy import

    import torch
    from safetensors.torch import load_file, save_file

    import comfy.lora
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    report: dict = {}

    # 1. real size: detection and LoRA key names
    real = json.load(open(a.real_shapes))
    fake = {k: torch.empty(v, device="meta") for k, v in real["ldm_shapes"].items()}
    unet_config = comfy.model_detection.detect_unet_config(fake, "")
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, fake)
    report["real_model_config"] = type(model_config).__name__ if model_config is not None else None
    if model_config is not None:
        model_config.set_inference_dtype(torch.float16, None)
        model = model_config.get_model(fake, "", device="meta")
        key_map = comfy.lora.model_lora_keys_unet(model, {})
        weights = {k: list(v.shape) for k, v in model.state_dict().items()}
        report["real_targets"] = len(real["targets"])
        report["real_unmapped"] = [k for k in real["targets"] if k not in key_map]
        report["real_shape_mismatch"] = [
            k for k, shape in real["targets"].items() if k in key_map and weights.get(key_map[k]) != shape
        ]
        del model, fake

    # 2. tiny: numbers through ComfyUI's SDXL model and LoRA loader
    inputs = load_file(a.inputs)
    x, sigma = inputs["latents"].float(), inputs["sigma"].float()
    h, w = inputs["size"].tolist()
    cpu = torch.device("cpu")

    def load_patcher(path: str):
        sd = comfy.utils.load_torch_file(path, safe_load=True)
        prefix = "model.diffusion_model."
        mc = comfy.supported_models.SDXL(comfy.model_detection.detect_unet_config(sd, prefix))
        mc.set_inference_dtype(torch.float32, None)
        m = mc.get_model(sd, prefix, device=cpu)
        m.load_model_weights(sd, prefix)
        return comfy.model_patcher.ModelPatcher(m, load_device=cpu, offload_device=cpu)

    def run(patcher, pooled: str = "pooled") -> torch.Tensor:
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)
        m = patcher.model
        with torch.no_grad():
            y = m.encode_adm(pooled_output=inputs[pooled].float(), width=w, height=h)
            denoised = m.apply_model(x, sigma, c_crossattn=inputs["crossattn"].float(), y=y)
        comfy.model_management.unload_all_models()
        return ((x - denoised.float()) / sigma.view(-1, 1, 1, 1)).contiguous()

    patcher = load_patcher(a.model)
    report["model_class"] = type(patcher.model).__name__
    report["model_type"] = patcher.model.model_type.name
    outputs = {"base": run(patcher)}
    patched_outputs, report["loras"] = run_with_each_lora(patcher, a.lora, capture, run)
    outputs.update(patched_outputs)
    if a.vpred_model:
        v = load_patcher(a.vpred_model)
        report["vpred_model_type"] = v.model.model_type.name
        outputs["vpred_base"] = run(v)

    if real.get("te_targets"):
        import comfy.sdxl_clip

        clip_meta = comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float16)
        te_map = comfy.lora.model_lora_keys_clip(clip_meta, {})
        te_weights = {k: list(v.shape) for k, v in clip_meta.state_dict().items()}
        report["te_real_targets"] = len(real["te_targets"])
        report["te_real_unmapped"] = [k for k in real["te_targets"] if k not in te_map]
        report["te_real_shape_mismatch"] = [k for k, shape in real["te_targets"].items()
                                            if k in te_map and te_weights.get(te_map[k]) != shape]
        report["te_real_targets_by_encoder"] = sorted({te_map[k].split(".")[0] for k in real["te_targets"] if k in te_map})
        del clip_meta

    if a.te_model:
        te_cfg = json.load(open(a.te_config))
        sd = comfy.utils.load_torch_file(a.te_model, safe_load=True)
        mc = comfy.supported_models.SDXL(comfy.model_detection.detect_unet_config(sd, "model.diffusion_model."))
        clip_sd = mc.process_clip_state_dict(sd)
        # ComfyUI's CLIP has the real vocabulary (49408 rows, comfy.clip_model.CLIPEmbeddings): the tiny table is
        # padded with rows no token id of the test reaches
        for k, v in list(clip_sd.items()):
            if k.endswith("token_embedding.weight") and v.shape[0] < 49408:
                clip_sd[k] = torch.cat([v, v.new_zeros(49408 - v.shape[0], v.shape[1])])
        options = {"dtype": torch.float32, "clip_l_model_config": te_cfg["clip_l"], "clip_g_model_config": te_cfg["clip_g"]}
        clip = comfy.sd.CLIP(mc.clip_target(state_dict=clip_sd), state_dict=clip_sd, model_options=options)
        for name in ("clip_l", "clip_g"):
            getattr(clip.cond_stage_model, name).special_tokens = te_cfg["special_tokens"][name]
        tokens = {"l": [[(int(t), 1.0) for t in inputs["te_ids_l"][0]]],
                  "g": [[(int(t), 1.0) for t in inputs["te_ids_g"][0]]]}
        te_patcher = load_patcher(a.te_model)

        def encode(c) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                cond, pooled = c.encode_from_tokens(tokens, return_pooled=True)
            return cond.float().contiguous(), pooled.float().contiguous()

        outputs["te_base_cond"], outputs["te_base_pooled"] = encode(clip)
        lora_sd = comfy.utils.load_torch_file(a.te_lora, safe_load=True)
        mark = len(capture.messages)
        patched_model, patched_clip = comfy.sd.load_lora_for_models(te_patcher, clip, lora_sd, 1.0, 1.0)
        outputs["te_lora_cond"], outputs["te_lora_pooled"] = encode(patched_clip)
        messages = capture.messages[mark:]
        outputs["te_lora_eps"] = run(patched_model, "te_pooled")
        report["te_lora"] = {
            "lora_tensors": len(lora_sd),
            "not_loaded": [m for m in messages if "lora key not loaded" in m or m.startswith("NOT LOADED")],
            "clip_patched_keys": sorted(patched_clip.patcher.patches.keys()),
            "model_patched_keys": sorted(patched_model.patches.keys()),
        }

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
