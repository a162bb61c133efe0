"""Runs INSIDE ComfyUI's own python: the ComfyUI backend (trainer/models/comfy.py, training on the MODEL that
ComfyUI loaded) computes the same prediction and the same LoRA gradients as the engine's own Flux backend
(diffusers, trainer/models/flux.py) on the same original-layout Flux file.

    cd <ComfyUI> && <comfy python> comfy_check_grads.py --repo <EriDiffusion> --model flux.safetensors \
        --report report.json

The model is loaded the way ComfyUI's UNETLoader loads it: inside torch.inference_mode() (so its weights are
inference tensors), through comfy.sd.load_diffusion_model. A LoRA with random non-zero weights is attached to
both backends (the same tensors: exported by one, imported by the other, in ComfyUI's keys), one forward and
backward of sum(prediction * w) runs on each, and the report holds the relative differences:
`pred_rel_err` and, over every LoRA parameter, the worst `grad_rel_err`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from comfy_boot import boot
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", default=os.getcwd())
    ap.add_argument("--repo", required=True, help="the EriDiffusion repository (its `trainer` package)")
    ap.add_argument("--model", required=True, help="Flux single file, original (BFL) layout")
    ap.add_argument("--report", required=True)
    a = ap.parse_args()
    boot(a.comfyui, a.repo)  # before any comfy import

    import torch

    import comfy.sd
    from trainer.models.comfy import ComfyModel
    from trainer.models.flux import FluxModel, load_flux_transformer
    from trainer.networks.network import Network

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    with torch.inference_mode():  # as every node runs
        patcher = comfy.sd.load_diffusion_model(a.model, model_options={"dtype": torch.float32})
    comfy_model = ComfyModel(patcher)
    comfy_model.ensure_loaded()

    transformer = load_flux_transformer(Path(a.model), torch.float32, "flux").requires_grad_(False)
    # the transformer alone: targets() and predict() need nothing else
    flux = FluxModel(transformer, None, None, None, None, None, 8, torch.device("cpu"), torch.float32)

    g = torch.Generator().manual_seed(0)
    ctx, pooled = transformer.config.joint_attention_dim, transformer.config.pooled_projection_dim
    latents = torch.randn(1, 16, 8, 8, generator=g)
    txt, vec = torch.randn(1, 8, ctx, generator=g), torch.randn(1, pooled, generator=g)
    sigmas, w = torch.tensor([0.6]), torch.randn(1, 16, 8, 8, generator=g)

    net_comfy = Network(comfy_model.targets(), rank=4, alpha=4.0, type_name="lora")
    with torch.no_grad():
        for p in net_comfy.parameters():
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
    net_flux = Network(flux.targets(), rank=4, alpha=4.0, type_name="lora")
    net_flux.import_(net_comfy.export(), "comfy backend")

    out = {}
    for name, model, net, cond in (
        ("comfy", comfy_model, net_comfy, {"cross_attn": txt, "pooled_output": vec}),
        ("flux", flux, net_flux, {"t5": txt, "pooled": vec}),
    ):
        net.attach()
        try:
            pred = model.predict(latents, sigmas, cond, guidance=1.0).float()
            (pred * w).sum().backward()
        finally:
            net.detach()
        out[name] = (pred.detach(), {k: p.grad.clone() for k, p in net.named_parameters()})

    (pc, gc), (pf, gf) = out["comfy"], out["flux"]

    def rel(a_, b_):
        return ((a_ - b_).abs().max() / b_.abs().max().clamp_min(1e-12)).item()

    report = {
        "targets_comfy": sorted(t.key for t in comfy_model.targets()),
        "targets_flux": sorted(t.key for t in flux.targets()),
        "pred_rel_err": rel(pc, pf),
        "grad_keys_equal": sorted(gc) == sorted(gf),
        "grad_rel_err": max(rel(gc[k], gf[k]) for k in gf if k in gc),
        "grad_norm": float(sum(v.norm() ** 2 for v in gf.values()) ** 0.5),
        "base_requires_grad": any(p.requires_grad for p in comfy_model.denoiser.parameters()),
        "base_inference_tensors": any(p.is_inference() for p in comfy_model.denoiser.parameters()),
    }
    with open(a.report, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
