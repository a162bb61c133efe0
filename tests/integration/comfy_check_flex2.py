"""Runs INSIDE ComfyUI's own python: load a Flex.2 file with ComfyUI's own loader (it detects Flux), then sample one
Euler step (sigma 1 -> 0: the output is the model's x0 prediction) through comfy.sample.sample, with this pack's
Flex.2 conditioning (trainer.models.flex2.comfy_flex2_model) for each case, and once without it.

    cd <ComfyUI> && <comfy python> comfy_check_flex2.py --repo <this repo> --model flex2.safetensors \
        --inputs inputs.safetensors --out out.safetensors --report report.json

inputs.safetensors: `noise` (1, 16, h, w), `t5`, `pooled`, raw VAE latents `control` and `inpaint` (as ComfyUI's
VAE.encode returns them), `mask` (H, W) at pixel size. Cases (name: control, inpaint, strength, stop): `full`
(both, 0.7, 1.0), `stopped` (control only, 1.0, 0.0: no step sees it), `none` (neither). --out holds each case's
x0 in the model's latent space (process_latent_in of the sampled latent); --report the latent format's constants
and what plain ComfyUI (no node) does with the file.
"""

from __future__ import annotations

import argparse
import json
import os

from comfy_boot import boot


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", default=os.getcwd())
    ap.add_argument("--repo", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--report", required=True)
    a = ap.parse_args()
    boot(a.comfyui, a.repo)

    import torch
    from safetensors.torch import load_file, save_file

    import comfy.sample
    import comfy.sd

    from trainer.models.flex2 import comfy_flex2_model

    inputs = load_file(a.inputs)
    patcher = comfy.sd.load_diffusion_model(a.model)
    positive = [[inputs["t5"], {"pooled_output": inputs["pooled"], "guidance": 3.5}]]
    noise = inputs["noise"]

    def x0(model) -> torch.Tensor:
        out = comfy.sample.sample(model, noise, 1, 1.0, "euler", "simple", positive, positive,
                                  torch.zeros_like(noise), denoise=1.0, seed=0)
        return model.model.process_latent_in(out).float()

    cases = {"full": (inputs["control"], inputs["inpaint"], inputs["mask"], 0.7, 1.0),
             "stopped": (inputs["control"], None, None, 1.0, 0.0),
             "none": (None, None, None, 1.0, 1.0)}
    outs = {name: x0(comfy_flex2_model(patcher, *args)) for name, args in cases.items()}
    try:
        x0(patcher)
        plain = "sampled"
    except Exception as e:  # what a user sees without the node
        plain = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    lf = patcher.model.latent_format
    report = {"model_class": type(patcher.model).__name__, "latent_scale": lf.scale_factor,
              "latent_shift": lf.shift_factor, "plain_comfyui": plain}
    save_file({k: v.contiguous() for k, v in outs.items()}, a.out)
    with open(a.report, "w") as f:
        json.dump(report, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
