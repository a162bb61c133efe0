"""Runs INSIDE ComfyUI's own python: a small OmniGen2 file (written by trainer.demo.omnigen2) in ComfyUI's own
OmniGen2 model, its predictions through ComfyUI's conditioning and apply_model, the network files applied through
ComfyUI's LoRA loader, images sampled by ComfyUI's own KSampler, and ComfyUI's detection of a full-size key set.

    cd <ComfyUI> && <comfy python> comfy_check_omnigen2.py --model og.safetensors --unet-config cfg.json \
        --lora lora=lora.safetensors ... --inputs inputs.safetensors --out result.safetensors --report result.json \
        [--detect full_header.safetensors --keys keys.json]

ComfyUI fixes OmniGen2's config at full size (model_detection.py), so the small model is built as ComfyUI builds a
detected one, from its `supported_models.Omnigen2` entry with the small `unet_config` given (load_diffusion_model's
own steps: model_config.get_model, load_model_weights, ModelPatcher), in fp32 on the CPU.

inputs.safetensors: `x` (b, 16, h, w) model-space latent, `sigma` (b,), `context` (1, n, d) an unpadded caption,
`ref` (1, 16, hr, wr) ComfyUI-space reference latent (what VAEEncode returns: ReferenceLatent hands it over and
extra_conds applies process_latent_in), `noise` (1, 16, h, w) the sampler's noise, `neg_context` (1, m, d).
Outputs, as velocities (x - denoised) / sigma: `base`, `base.ref`, each `--lora` NAME and `NAME.ref`, `base_after` and `base_after.ref`; `ref_in` (the reference after process_latent_in);
the sampled latents `sample.cfg1` (text only, cfg 1) and `sample.cfg4` (reference in the positive, negative
caption, cfg 4), each in model space (process_latent_in of what ComfyUI's sampler returns) and `raw.` as returned.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from comfy_boot import boot, detect_header, named_file, run_with_each_lora

STEPS = 4


def detect(path: str, keys_file: str | None) -> dict:
    import comfy.model_base
    from comfy.ldm.omnigen.omnigen2 import OmniGen2Transformer2DModel

    return detect_header(path, keys_file, OmniGen2Transformer2DModel, comfy.model_base.Omnigen2)


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
    import comfy.sample
    import comfy.samplers
    import comfy.supported_models
    import comfy.utils

    inputs = load_file(a.inputs)
    x, sigma = inputs["x"].float(), inputs["sigma"].float()
    context, neg_context, ref = inputs["context"].float(), inputs["neg_context"].float(), inputs["ref"].float()
    unet_config = {"image_model": "omnigen2", **json.loads(open(a.unet_config, encoding="utf-8").read())}
    model_config = comfy.supported_models.Omnigen2(unet_config)
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

    def ones(c: torch.Tensor) -> torch.Tensor:  # ComfyUI's text encoder returns a (long) mask with every caption
        return torch.ones(c.shape[:2], dtype=torch.long)

    def run_one(p, refs) -> torch.Tensor:
        kwargs = {"cross_attn": context, "attention_mask": ones(context)}
        if refs is not None:
            kwargs["reference_latents"] = refs
        conds = p.model.extra_conds(**kwargs)
        args = {k: c.process_cond(batch_size=x.shape[0]).cond for k, c in conds.items()}
        with torch.no_grad():
            denoised = p.model.apply_model(x, sigma, **args)
        return ((x - denoised.float()) / sigma.view(-1, 1, 1, 1)).contiguous()

    def run(p):
        comfy.model_management.load_models_gpu([p], force_full_load=True)
        out = {"": run_one(p, None), ".ref": run_one(p, [ref])}
        comfy.model_management.unload_all_models()
        return out

    nested = {"base": run(patcher)}
    patched, loras = run_with_each_lora(patcher, a.lora, capture, run)
    nested.update(patched)
    outputs = {f"{name}{suffix}": t for name, d in nested.items() for suffix, t in d.items()}

    # sampling: KSampler's own path (comfy.sample.sample) from an empty latent, euler / simple
    noise = inputs["noise"].float()
    empty = torch.zeros_like(noise)
    pos = [[context, {"attention_mask": ones(context)}]]
    pos_ref = [[context, {"attention_mask": ones(context), "reference_latents": [ref]}]]
    neg = [[neg_context, {"attention_mask": ones(neg_context)}]]
    samples = {}
    for name, (positive, cfg) in {"cfg1": (pos, 1.0), "cfg4": (pos_ref, 4.0)}.items():
        raw = comfy.sample.sample(patcher, noise, STEPS, cfg, "euler", "simple", positive, neg, empty, seed=0,
                                  disable_pbar=True)
        outputs[f"raw.sample.{name}"] = raw.float().contiguous()
        outputs[f"sample.{name}"] = model.process_latent_in(raw.float()).contiguous()
    sampling_sigmas = comfy.samplers.calculate_sigmas(model.model_sampling, "simple", STEPS)
    outputs["ref_in"] = model.process_latent_in(ref).contiguous()  # what the model is given as the reference

    report = {"model_class": type(model).__name__, "config_class": type(model_config).__name__,
              "model_type": model.model_type.name, "load_messages": load_messages,
              "timesteps": [float(t) for t in model.model_sampling.timestep(sigma)],
              "shift": float(model.model_sampling.shift), "multiplier": float(model.model_sampling.multiplier),
              "sampling_sigmas": [float(s) for s in sampling_sigmas],
              "latent_format": type(model.latent_format).__name__, "loras": loras}
    if a.detect:
        report["detection"] = detect(a.detect, a.keys)
    save_file(outputs, a.out)
    with open(a.report, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
