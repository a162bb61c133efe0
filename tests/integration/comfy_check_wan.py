"""Runs INSIDE ComfyUI's own python: a Wan 2.1 transformer file and network files, the way ComfyUI loads and runs
them, plus ComfyUI's own I2V conditioning (the WanImageToVideo node) and CLIP preprocessing.

    cd <ComfyUI> && <comfy python> comfy_check_wan.py --model wan.safetensors [--vae vae.safetensors] \
        --lora lora=lora.safetensors ... --inputs inputs.safetensors --out result.safetensors --report result.json

inputs.safetensors: `latents` (b, 16, t, h, w), `context` (b, n, 4096), `sigma` (b,); for I2V also `image_cond`
(b, 20, t, h, w: mask and start-image latent, as the trainer builds them) and `clip_fea` (b, k, 1280), and
`start_image` (1, H, W, 3) in [0, 1] for the node check. Outputs: the velocity (x - denoised) / sigma for `base`,
each `--lora`, `base_after`; with --vae and a start image, `node_concat` (the concat_latent_image WanImageToVideo
builds, put through the model's process_latent_in as WAN21.concat_cond does) and `node_mask`, and `clip_pixels`
(comfy.clip_model.clip_preprocess of the start image at 28 px).
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
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--lora", action="append", default=[], type=named_file, metavar="NAME=FILE")
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
    patcher = comfy.sd.load_diffusion_model(a.model, model_options={"dtype": torch.float32})
    extra = {}
    if "image_cond" in inputs:
        extra = {"c_concat": inputs["image_cond"].float(), "clip_fea": inputs["clip_fea"].float()}
    if "vace" in inputs:  # what WAN21_Vace.extra_conds makes of vace_frames and vace_mask: one context, strength 1
        extra = {"vace_context": inputs["vace"].float()[:, None], "vace_strength": [1.0]}

    def run(p) -> torch.Tensor:
        comfy.model_management.load_models_gpu([p], force_full_load=True)
        with torch.no_grad():
            denoised = p.model.apply_model(x, sigma, c_crossattn=inputs["context"].float(), **extra)
        comfy.model_management.unload_all_models()
        return ((x - denoised.float()) / sigma.view(-1, 1, 1, 1, 1)).contiguous()

    outputs = {"base": run(patcher)}
    patched_outputs, loras = run_with_each_lora(patcher, a.lora, capture, run)
    outputs.update(patched_outputs)

    if a.vae and "start_image" in inputs:
        from comfy_extras.nodes_wan import WanImageToVideo

        import comfy.clip_model

        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(a.vae))
        start = inputs["start_image"].float()
        h, w = start.shape[1:3]
        out = WanImageToVideo.execute([[torch.zeros(1, 4, 4096), {}]], [[torch.zeros(1, 4, 4096), {}]], vae, w, h,
                                      a.frames, 1, start_image=start)
        pos = out.args[0] if hasattr(out, "args") else out[0]
        values = pos[0][1]
        image = values["concat_latent_image"].float()
        model = patcher.model
        outputs["node_concat"] = model.process_latent_in(image).contiguous()
        outputs["node_mask"] = (1.0 - values["concat_mask"].float()).contiguous()
        outputs["clip_pixels"] = comfy.clip_model.clip_preprocess(start, size=28).float().contiguous()

    extra_report = {}
    if a.vae and "control_video" in inputs:
        from comfy_extras.nodes_wan import WanVaceToVideo

        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(a.vae))
        video = inputs["control_video"].float()
        h, w = video.shape[1:3]
        out = WanVaceToVideo.execute([[torch.zeros(1, 4, 4096), {}]], [[torch.zeros(1, 4, 4096), {}]], vae, w, h,
                                     video.shape[0], 1, 1.0, control_video=video,
                                     control_masks=inputs["control_mask"].float())
        pos = out.args[0] if hasattr(out, "args") else out[0]
        frames, mask = pos[0][1]["vace_frames"][0].float().clone(), pos[0][1]["vace_mask"][0].float()
        for i in range(0, frames.shape[1], 16):
            frames[:, i:i + 16] = patcher.model.process_latent_in(frames[:, i:i + 16])
        outputs["node_vace"] = torch.cat([frames, mask], dim=1).contiguous()
        if "reference_image" in inputs:  # the same with a reference image: its latent frame first, trimmed later
            out = WanVaceToVideo.execute([[torch.zeros(1, 4, 4096), {}]], [[torch.zeros(1, 4, 4096), {}]], vae, w, h,
                                         video.shape[0], 1, 1.0, control_video=video,
                                         control_masks=inputs["control_mask"].float(),
                                         reference_image=inputs["reference_image"].float())
            args = out.args if hasattr(out, "args") else out
            pos = args[0]
            frames, mask = pos[0][1]["vace_frames"][0].float().clone(), pos[0][1]["vace_mask"][0].float()
            for i in range(0, frames.shape[1], 16):
                frames[:, i:i + 16] = patcher.model.process_latent_in(frames[:, i:i + 16])
            outputs["node_vace_ref"] = torch.cat([frames, mask], dim=1).contiguous()
            extra_report["vace_ref_trim"] = int(args[3])
            extra_report["vace_ref_latent_frames"] = int(args[2]["samples"].shape[2])

    report = {"model_class": type(patcher.model.model_config).__name__, "model_type": patcher.model.model_type.name,
              "shift": float(patcher.model.model_sampling.shift),
              "timesteps": [float(t) for t in patcher.model.model_sampling.timestep(sigma)], "loras": loras,
              "latent_format": type(patcher.model.latent_format).__name__, **extra_report}
    save_file(outputs, a.out)
    with open(a.report, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
