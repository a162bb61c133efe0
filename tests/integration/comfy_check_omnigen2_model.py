"""Runs INSIDE ComfyUI's own python: a small OmniGen2 transformer file in ComfyUI's own OmniGen2 model class, on
several input cases, through ComfyUI's own conditioning and sampling steps.

    cd <ComfyUI> && <comfy python> comfy_check_omnigen2_model.py --model model.safetensors --unet-config cfg.json \
        --inputs inputs.safetensors --out result.safetensors --report result.json

ComfyUI fixes OmniGen2's config at full size (model_detection.py), so the small model is built as ComfyUI builds a
detected one, from its `supported_models.Omnigen2` entry with the small `unet_config` given (load_diffusion_model's
steps: model_config.get_model, load_model_weights), in fp32, with the operations ComfyUI picks for that (the report's
`linear_class`: comfy.ops.disable_weight_init).

inputs.safetensors holds cases named CASE: `CASE.x` (b, 16, h, w) model-space latent, `CASE.sigma` (b,),
`CASE.context` (b, n, 2048), optionally `CASE.mask` (b, n) 0/1 (its first row is the cond's mask) and
`CASE.ref.J` (1 or b, 16, hr, wr) model-space reference latents (J = 0, 1, ...). Each case goes through
model_base.Omnigen2.extra_conds as the sampler calls it (cross_attn, attention_mask, reference_latents; it applies
process_latent_in to the references, so they are handed over through process_latent_out), then apply_model.
Output `CASE`: the velocity (x - denoised) / sigma, i.e. the diffusion model's output. A case ComfyUI cannot run is
recorded in the report with its error, not raised.

The report also holds ComfyUI's LoRA key map of the small model (comfy.lora.model_lora_keys_unet) and, under
`full_size`, what ComfyUI detects from the released model's marker key: the config class, the unet config, and the
parameter shapes of its own model built at that config on the meta device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from comfy_boot import boot


def full_size() -> dict:
    import torch

    import comfy.model_detection as md
    import comfy.ops
    from comfy.ldm.omnigen.omnigen2 import OmniGen2Transformer2DModel

    # the key model_detection tells OmniGen2 by; the rest of the config is fixed there
    marker = {"time_caption_embed.timestep_embedder.linear_1.bias": torch.empty(1024, device="meta")}
    cfg = md.model_config_from_unet(marker, "")
    unet_config = {k: v for k, v in cfg.unet_config.items() if k != "image_model"}
    with torch.device("meta"):
        full = OmniGen2Transformer2DModel(**unet_config, operations=comfy.ops.disable_weight_init)
    return {"config_class": type(cfg).__name__, "unet_config": unet_config,
            "shapes": {k: list(v.shape) for k, v in full.state_dict().items()}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", default=os.getcwd())
    ap.add_argument("--model", required=True)
    ap.add_argument("--unet-config", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--report", required=True)
    a = ap.parse_args()
    capture = boot(a.comfyui)

    import torch
    from safetensors.torch import load_file, save_file

    import comfy.model_management
    import comfy.supported_models
    import comfy.utils

    inputs = load_file(a.inputs)
    unet_config = {"image_model": "omnigen2", **json.loads(open(a.unet_config, encoding="utf-8").read())}
    model_config = comfy.supported_models.Omnigen2(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    sd = comfy.utils.load_torch_file(a.model)
    mark = len(capture.messages)
    model = model_config.get_model(sd, "")
    model.load_model_weights(sd, "")
    load_messages = [m for m in capture.messages[mark:] if m.startswith(("unet missing", "unet unexpected"))]
    model.eval()

    cases = sorted({k.split(".", 1)[0] for k in inputs})
    outputs, report = {}, {"model_class": type(model).__name__, "config_class": type(model_config).__name__,
                           "model_type": model.model_type.name, "load_messages": load_messages,
                           "diffusion_model_class": type(model.diffusion_model).__name__,
                           "linear_class": type(model.diffusion_model.x_embedder).__qualname__, "cases": {}}
    for case in cases:
        x, sigma = inputs[f"{case}.x"].float(), inputs[f"{case}.sigma"].float()
        refs = [inputs[f"{case}.ref.{j}"].float() for j in range(8) if f"{case}.ref.{j}" in inputs]
        kwargs = {"cross_attn": inputs[f"{case}.context"].float()}
        if f"{case}.mask" in inputs:
            # a cond's mask as ComfyUI's text encoder returns it: long, one row (extra_conds runs per cond, batch 1,
            # and counts num_tokens over the whole mask); a batch of the same caption shares it
            kwargs["attention_mask"] = inputs[f"{case}.mask"][:1].long()
        if refs:
            kwargs["reference_latents"] = [model.process_latent_out(r) for r in refs]
        info = {"timesteps": [float(t) for t in model.model_sampling.timestep(sigma)]}
        try:
            conds = model.extra_conds(**kwargs)
            info["conds"] = sorted(conds)
            args = {k: c.process_cond(batch_size=x.shape[0]).cond for k, c in conds.items()}
            if "num_tokens" in args:
                info["num_tokens"] = int(args["num_tokens"])
            with torch.no_grad():
                denoised = model.apply_model(x, sigma, **args)
            outputs[case] = ((x - denoised.float()) / sigma.view(-1, 1, 1, 1)).contiguous()
        except Exception as e:  # recorded so the test can say what ComfyUI does with this input
            info["error"] = f"{type(e).__name__}: {e}"
            info["traceback"] = traceback.format_exc()[-2000:]
        report["cases"][case] = info

    import comfy.lora

    report["lora_key_map"] = comfy.lora.model_lora_keys_unet(model, {})
    report["full_size"] = full_size()
    save_file(outputs, a.out)
    with open(a.report, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
