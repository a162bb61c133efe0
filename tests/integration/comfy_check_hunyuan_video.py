"""Runs INSIDE ComfyUI's own python: a HunyuanVideo transformer file and network files, the way ComfyUI loads and
runs them, and optionally its VAE file decoded by ComfyUI's VAE.

    cd <ComfyUI> && <comfy python> comfy_check_hunyuan_video.py --model hv.safetensors [--vae vae.safetensors] \
        --lora lora=lora.safetensors ... --inputs inputs.safetensors --out result.safetensors --report result.json \
        [--save-model renamed.safetensors]

inputs.safetensors: `latents` (b, 16, t, h, w), `context` (b, n, D: the prompt's tokens, unpadded, as ComfyUI's
tokenizer gives them), `pooled` (b, 768), `sigma` (b,), `guidance` (b,); with --vae, `vae_latent` (1, 16, t, h, w)
in the model's normalized space. Outputs: the velocity (x - denoised) / sigma for `base`, each `--lora`,
`base_after`; with --vae, `vae_pixels` (ComfyUI's decode of vae_latent: (1, f, H, W, 3) in [0, 1]).
--save-model writes the diffusion model's state dict as ComfyUI holds it (its renamed keys).
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
    ap.add_argument("--vae", default=None)
    ap.add_argument("--lora", action="append", default=[], type=named_file, metavar="NAME=FILE")
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--report", required=True)
    ap.add_argument("--save-model", default=None)
    a = ap.parse_args()
    capture = boot(a.comfyui)

    import torch
    from safetensors.torch import load_file, save_file

    import comfy.model_management
    import comfy.sd
    import comfy.utils

    inputs = load_file(a.inputs)
    x, sigma = inputs["latents"].float(), inputs["sigma"].float()
    mark = len(capture.messages)
    patcher = comfy.sd.load_diffusion_model(a.model, model_options={"dtype": torch.float32})
    load_messages = capture.messages[mark:]

    def run(p) -> torch.Tensor:
        comfy.model_management.load_models_gpu([p], force_full_load=True)
        with torch.no_grad():
            # what HunyuanVideo.extra_conds hands the model: the pooled CLIP output as `y`, the guidance as is
            denoised = p.model.apply_model(x, sigma, c_crossattn=inputs["context"].float(), y=inputs["pooled"].float(),
                                           guidance=inputs["guidance"].float())
        comfy.model_management.unload_all_models()
        return ((x - denoised.float()) / sigma.view(-1, 1, 1, 1, 1)).contiguous()

    outputs = {"base": run(patcher)}
    if a.save_model:
        sd = {k: v.detach().float().contiguous() for k, v in patcher.model.diffusion_model.state_dict().items()}
        save_file(sd, a.save_model)
    patched_outputs, loras = run_with_each_lora(patcher, a.lora, capture, run)
    outputs.update(patched_outputs)

    vae_report = None
    if a.vae:
        mark = len(capture.messages)
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(a.vae))
        messages = capture.messages[mark:]
        outputs["vae_pixels"] = vae.decode(inputs["vae_latent"].float()).float().contiguous()
        vae_report = {"class": type(vae.first_stage_model).__name__, "latent_channels": vae.latent_channels,
                      "missing": [m for m in messages if m.startswith("Missing VAE keys")],
                      "leftover": [m for m in messages if m.startswith("Leftover VAE keys")]}

    report = {"model_class": type(patcher.model.model_config).__name__, "model_type": patcher.model.model_type.name,
              "shift": float(patcher.model.model_sampling.shift),
              "timesteps": [float(t) for t in patcher.model.model_sampling.timestep(sigma)], "loras": loras,
              "latent_format": type(patcher.model.latent_format).__name__,
              "scale_factor": float(patcher.model.latent_format.scale_factor),
              "unet_missing": [m for m in load_messages if m.startswith(("unet missing", "unet unexpected"))],
              "unet_left_over": [m for m in load_messages if m.startswith("left over keys")], "vae": vae_report}
    save_file(outputs, a.out)
    with open(a.report, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
