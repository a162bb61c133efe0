"""Flex.2 in real ComfyUI's own sampling, through this pack's Flex.2 conditioning (EriFlex2Conditioning's math,
trainer.models.flex2.comfy_flex2_model): ComfyUI loads the file as Flux and, without the node, builds Flux Fill's
extra inputs, which a Flex.2 img_in cannot take; with it, one Euler step of comfy.sample.sample from sigma 1 (the
model's x0 prediction) equals the trainer's Flex2 prediction for a control image and an inpaint image with its mask
(control_strength 0.7), for a control stopped before the first step (control_stop 0: as if none), and for neither.

Needs COMFYUI_PATH (and COMFYUI_PYTHON, see comfy_env.py); skipped otherwise. The model is the smallest Flux-layout
file ComfyUI detects (hidden 3072, one double and one single block) with Flex.2's 196-feature img_in, fp32 on CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F

from integration.comfy_env import comfy_install
from integration.test_comfyui_flux_lora import _make_checkpoint

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
TOL = 1e-3
FLUX_VAE_SHIFT, FLUX_VAE_SCALE = 0.1159, 0.3611  # diffusers' Flux AutoencoderKL config


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_flex2_conditioning_in_comfyui_sampling(tmp_path):
    comfy, python = comfy_install("ComfyUI Flex.2 conditioning test")
    from safetensors.torch import load_file

    from trainer.demo.flux import flux_diffusers_config
    from trainer.fileio import save_safetensors_atomic
    from trainer.models.flex2 import FLEX2
    from trainer.models.flux import FluxModel, load_flux_transformer

    cfg = flux_diffusers_config(hidden=3072, head_dim=128, double=1, single=1, context_dim=64, pooled_dim=64,
                                guidance=True, in_channels=196)
    cfg.update(out_channels=64)
    ckpt = tmp_path / "flex2.safetensors"
    _make_checkpoint(ckpt, cfg)
    transformer = load_flux_transformer(ckpt, torch.float32, "flex2").eval().requires_grad_(False)
    model = FluxModel(transformer, None, None, None, None, None, 8, torch.device("cpu"), torch.float32,
                      variant=FLEX2)

    g = torch.Generator().manual_seed(3)
    inputs = {"noise": torch.randn(1, 16, 8, 8, generator=g), "t5": torch.randn(1, 8, 64, generator=g),
              "pooled": torch.randn(1, 64, generator=g), "control": torch.randn(1, 16, 8, 8, generator=g),
              "inpaint": torch.randn(1, 16, 8, 8, generator=g), "mask": torch.zeros(64, 64)}
    inputs["mask"][8:40, 16:56] = 1.0
    files = {n: tmp_path / f"{n}.safetensors" for n in ("inputs", "out")}
    save_safetensors_atomic(inputs, files["inputs"])

    # ours: the trainer's Flex.2 prediction at sigma 1, the latents normalized as the Flux VAE's are
    text = {"t5": inputs["t5"], "pooled": inputs["pooled"]}
    control = (inputs["control"] - FLUX_VAE_SHIFT) * FLUX_VAE_SCALE
    inpaint = (inputs["inpaint"] - FLUX_VAE_SHIFT) * FLUX_VAE_SCALE
    m = F.interpolate(inputs["mask"][None, None], size=(8, 8), mode="bilinear", align_corners=False)
    conds = {"full": dict(text, control=control, inpaint=inpaint * (1 - m), inpaint_keep=1 - m,
                          control_strength=torch.tensor([0.7])),
             "stopped": model.conditions_at(dict(text, control=control, control_stop=torch.tensor([0.0])), 0, 1),
             "none": text}
    with torch.no_grad():
        ours = {n: inputs["noise"] - model.predict(inputs["noise"], torch.tensor([1.0]), c, guidance=3.5)
                for n, c in conds.items()}
    del transformer, model

    report_file = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    cmd = [str(python), str(HERE / "comfy_check_flex2.py"), "--comfyui", str(comfy), "--repo", str(REPO),
           "--model", str(ckpt), "--inputs", str(files["inputs"]), "--out", str(files["out"]),
           "--report", str(report_file)]
    proc = subprocess.run(cmd, cwd=str(comfy), env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(report_file.read_text())
    theirs = load_file(str(files["out"]))

    assert report["model_class"] == "Flux"
    assert (report["latent_shift"], report["latent_scale"]) == (FLUX_VAE_SHIFT, FLUX_VAE_SCALE)
    assert report["plain_comfyui"] != "sampled"  # without the node, ComfyUI's Flux Fill concat does not fit img_in
    for name in ours:
        assert _rel(theirs[name], ours[name]) < TOL, (name, _rel(theirs[name], ours[name]))
    assert _rel(ours["full"], ours["none"]) > 100 * TOL  # the control and inpaint inputs reach the model
    assert _rel(ours["stopped"], ours["none"]) < 1e-6
