"""Runs INSIDE ComfyUI's own python: a Lightricks-style LTX-Video checkpoint and network files, the way ComfyUI loads
and runs them (Load Checkpoint: the model and the VAE from one file, configs from its metadata), plus ComfyUI's own
LTXVScheduler, LTXVImgToVideo and VAE.

    cd <ComfyUI> && <comfy python> comfy_check_ltxv.py --ckpt ltxv.safetensors --lora lora=lora.safetensors ... \
        --inputs inputs.safetensors --out result.safetensors --report result.json

inputs.safetensors: `latents` (b, 128, t, h, w), `context` (b, n, d), `attention_mask` (b, n) int64, `sigma` (b,);
`i2v_latents` and `denoise_mask` (b, 1, t, 1, 1): the I2V input (start frame given) and ComfyUI's noise mask for it;
`start_image` (1, H, W, 3) and `clip` (F, H, W, 3) in [0, 1]; `decode_latents` (1, 128, t', h', w').
Outputs: the velocity (x - denoised) / sigma for `base`, each `--lora`, `base_after`, `i2v`; `node_samples` and
`node_noise_mask` (what LTXVImgToVideo puts in the latent), `sigmas` (LTXVScheduler for the latents' token count),
`encoded` (VAE encode of `clip`), `decoded` (the VAE's decoder at timestep 0.05, without the decode noise).
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
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--lora", action="append", default=[], type=named_file, metavar="NAME=FILE")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--report", required=True)
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
    patcher, _, vae, _ = comfy.sd.load_checkpoint_guess_config(a.ckpt, output_vae=True, output_clip=False,
                                                               model_options={"dtype": torch.float32})
    load_messages = capture.messages[mark:]
    cond = {"c_crossattn": inputs["context"].float(), "attention_mask": inputs["attention_mask"].long(),
            "frame_rate": 25}

    def run(p, latents=x, **extra) -> torch.Tensor:
        comfy.model_management.load_models_gpu([p], force_full_load=True)
        with torch.no_grad():
            denoised = p.model.apply_model(latents, sigma, **cond, **extra)
        comfy.model_management.unload_all_models()
        return ((latents - denoised.float()) / sigma.view(-1, 1, 1, 1, 1)).contiguous()

    outputs = {"base": run(patcher)}
    i2v = inputs["i2v_latents"].float()
    # the sampler hands the model the noise mask reshaped to the latent (comfy.sampler_helpers.prepare_mask)
    mask = comfy.utils.reshape_mask(inputs["denoise_mask"].float(), i2v.shape)
    outputs["i2v"] = run(patcher, i2v, denoise_mask=mask)
    patched_outputs, loras = run_with_each_lora(patcher, a.lora, capture, run)
    outputs.update(patched_outputs)

    from comfy_extras.nodes_lt import LTXVImgToVideo, LTXVScheduler

    def first(out):
        return out.args if hasattr(out, "args") else out

    sig = first(LTXVScheduler.execute(a.steps, 2.05, 0.95, True, 0.1, latent={"samples": x}))[0]
    outputs["sigmas"] = sig.float().contiguous()
    start = inputs["start_image"].float()
    h, w = start.shape[1:3]
    frames = (x.shape[2] - 1) * 8 + 1
    _, _, latent = first(LTXVImgToVideo.execute([], [], start, vae, w, h, frames, 1, 1.0))
    outputs["node_samples"] = latent["samples"].float().contiguous()
    outputs["node_noise_mask"] = latent["noise_mask"].float().contiguous()
    outputs["encoded"] = vae.encode(inputs["clip"].float()).float().contiguous()
    model = vae.first_stage_model
    with torch.no_grad():
        z = model.per_channel_statistics.un_normalize(inputs["decode_latents"].float())
        outputs["decoded"] = model.decoder(z, timestep=torch.tensor([0.05])).float().contiguous()

    report = {"model_class": type(patcher.model.model_config).__name__, "model_type": patcher.model.model_type.name,
              "latent_format": type(patcher.model.latent_format).__name__,
              "timesteps": [float(t) for t in patcher.model.model_sampling.timestep(sigma)],
              "causal": bool(patcher.model.diffusion_model.causal_temporal_positioning),
              "heads": int(patcher.model.diffusion_model.num_attention_heads),
              "vae_class": type(vae.first_stage_model).__name__, "vae_timestep": bool(model.timestep_conditioning),
              "load_warnings": [m for m in load_messages if "missing" in m.lower() or "unexpected" in m.lower()
                                or "left over" in m.lower()],
              "loras": loras}
    save_file(outputs, a.out)
    with open(a.report, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
