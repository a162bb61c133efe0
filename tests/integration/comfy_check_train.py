"""Runs INSIDE ComfyUI's python: train a LoRA on the MODEL that ComfyUI's own loaders loaded (the path the
EriComfyModel -> EriTrain -> EriSaveLoRA nodes take, through the same trainer.session calls), save it as the
Save node does, load it back with ComfyUI's LoRA loader (what LoraLoaderModelOnly calls) and compare ComfyUI's
patched model with the trainer's model at the end of training.

    cd <ComfyUI> && <comfy python> comfy_check_train.py --repo <EriDiffusion> --family sdxl|wan|flux \
        --cache <fixture cache> --work <scratch folder> --report report.json

The report holds: the class ComfyUI detected, the losses, the LoRA keys ComfyUI did not load, the number of
weights it patched against the number of trained layers, and `rel_err` = max |patched - trained| / max
|trained| over the model's output on a fixed noisy latent, plus `lora_effect` (how far the LoRA moved that
output from the base model's), so a LoRA that did nothing cannot pass.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from comfy_boot import boot
from pathlib import Path


def _write_dataset(folder: Path, n: int = 2, size: int = 64) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        yy, xx = np.mgrid[0:size, 0:size]
        img = np.stack([(xx * (i + 1)) % 256, (yy * 3) % 256, rng.integers(0, 256, (size, size))], -1)
        Image.fromarray(img.astype(np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(["a photo of a red cat", "a sketch of a blue house"][i % 2])
    return folder


def _load(family: str, files: dict):
    """MODEL, CLIP and VAE as UNETLoader / CLIPLoader (DualCLIPLoader) / VAELoader load them."""
    import torch

    import comfy.sd
    import comfy.utils

    clip_type = {"sdxl": comfy.sd.CLIPType.STABLE_DIFFUSION, "wan": comfy.sd.CLIPType.WAN,
                 "flux": comfy.sd.CLIPType.STABLE_DIFFUSION}[family]
    clips = {"sdxl": ["clip_l", "clip_g"], "wan": ["umt5"], "flux": ["clip"]}[family]
    with torch.inference_mode():  # as every node runs
        model = comfy.sd.load_diffusion_model(files["unet"], model_options={"dtype": torch.float32})
        clip = comfy.sd.load_clip([files[c] for c in clips], clip_type=clip_type)
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(files["vae"]))
    return model, clip, vae


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", default=os.getcwd())
    ap.add_argument("--repo", required=True)
    ap.add_argument("--family", required=True, choices=["sdxl", "wan", "flux"])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--report", required=True)
    a = ap.parse_args()
    collect = boot(a.comfyui, a.repo)  # before any comfy import

    import torch

    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    import comfy_fixtures
    from trainer.fileio import save_safetensors_atomic
    from trainer.models.comfy import ComfyModel
    from trainer.session import TrainingSession, job_from_parts

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    cache, work = Path(a.cache), Path(a.work)
    files = {"sdxl": comfy_fixtures.sdxl_files, "wan": comfy_fixtures.wan_files,
             "flux": comfy_fixtures.flux_files}[a.family](cache)
    patcher, clip, vae = _load(a.family, files)

    if a.family == "wan":  # a video family trains on clips: 5 frames of moving shapes (2 latent frames)
        from trainer.demo.videos import make_video_dataset

        data = make_video_dataset(work / "dataset", n=2, size=(64, 64), frames=12, fps=16)
        dataset = {"folder_path": str(data), "caption_ext": "txt", "resolution": [64], "trigger_word": "sks",
                   "num_frames": 5}
    else:
        data = _write_dataset(work / "dataset")
        dataset = {"folder_path": str(data), "caption_ext": "txt", "resolution": [64], "trigger_word": "sks"}
    network = {"type": "lora", "linear": 4, "linear_alpha": 4.0}
    settings = {"name": f"eri_{a.family}", "train": {"lr": 2e-3, "optimizer": "adamw", "batch_size": 1,
                                                      "dtype": "fp32", "timestep_type": "sigmoid", "seed": 7,
                                                      "cache_text_embeddings": True},
                "save": {"save_every": 1000, "dtype": "float32"}}
    job = job_from_parts({"comfy": (patcher, clip, vae)}, [dataset], network, settings, a.steps, str(work / "runs"))

    with torch.inference_mode(False), torch.enable_grad():  # as EriTrain runs
        model = ComfyModel(patcher, clip, vae)
        model.ensure_loaded()
        session = TrainingSession(job, model=model, report=lambda s: print(s, file=sys.stderr))
        session.advance(a.steps)
    losses = [loss for _, loss in session.losses]
    latent_shapes = sorted({tuple(v.shape) for v in session.trainer.latents.mem.values()})
    sample_shape = None
    if a.family == "wan":  # a video preview through ComfyUI's VAE: the frames of a clip
        with torch.inference_mode(False):
            sample_shape = list(session.sample("sks, a red circle", 64, 64, 2, 1.0, seed=1, frames=5).shape)

    # the trainer's model at the end of training, on a fixed noisy latent and prompt
    lat_shape = {"sdxl": (1, 4, 8, 8), "wan": (1, 16, 2, 8, 8), "flux": (1, 16, 8, 8)}[a.family]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(lat_shape, generator=g)
    sigma = model.sampling.sigmas[len(model.sampling.sigmas) // 2].reshape(1).float().cpu().clone()  # not an inference tensor
    cond = model.encode_text(["sks, a photo of a red cat"])
    net = session.trainer.network

    def out(m: ComfyModel) -> torch.Tensor:
        with torch.no_grad():
            return m.predict(x, sigma, cond, guidance=3.5).float().cpu()

    net.attach()
    net.eval()
    try:
        trained = out(model)
    finally:
        net.detach()
    base = out(model)

    # gradient checkpointing on ComfyUI's blocks gives the same LoRA gradients as none
    w = torch.randn(lat_shape, generator=g)

    def lora_grads(fraction: float) -> dict[str, torch.Tensor]:
        model.set_gradient_checkpointing(fraction)
        net.zero_grad(set_to_none=True)
        net.attach()
        try:
            with torch.inference_mode(False), torch.enable_grad():
                (model.predict(x, sigma, cond, guidance=3.5).float() * w.to(model.device)).sum().backward()
        finally:
            net.detach()
            model.set_gradient_checkpointing(0.0)
        grads = {k: p.grad.detach().clone() for k, p in net.named_parameters() if p.grad is not None}
        net.zero_grad(set_to_none=True)
        return grads

    # a layer inside the first block with one runs once per step without checkpointing, twice with (the recompute)
    first_linear = next(m for b in model.repeated_blocks() for m in b.modules() if isinstance(m, torch.nn.Linear))
    calls: list[int] = []
    hook = first_linear.register_forward_hook(lambda *_: calls.append(1))
    plain = lora_grads(0.0)
    calls_plain = len(calls)
    ckpt = lora_grads(1.0)
    calls_ckpt = len(calls) - calls_plain
    hook.remove()
    again = lora_grads(0.0)
    n_blocks = len(model.repeated_blocks())

    # saved as EriSaveLoRA saves, loaded as LoraLoaderModelOnly loads
    tensors, metadata = session.export("float32")
    path = work / "loras" / f"eri_{a.family}.safetensors"
    save_safetensors_atomic(tensors, path, metadata)
    before = len(collect.messages)
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    with torch.inference_mode():
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)
    not_loaded = [m for m in collect.messages[before:] if "lora key not loaded" in m]
    with torch.inference_mode(False):
        comfy_patched = ComfyModel(patched, None, vae)
        comfy_patched.ensure_loaded()
        result = out(comfy_patched)

    def rel(p: torch.Tensor, q: torch.Tensor) -> float:
        return ((p.double() - q.double()).abs().max() / q.double().abs().max().clamp_min(1e-30)).item()

    report = {
        "detected": type(patcher.model.model_config).__name__,
        "model_class": type(patcher.model).__name__,
        "losses": losses,
        "latent_shapes": [list(x) for x in latent_shapes],
        "sample_shape": sample_shape,
        "n_targets": len(net.targets),
        "n_lora_tensors": len(tensors),
        "n_patched": len(patched.patches),
        "not_loaded": not_loaded,
        "rel_err": rel(result, trained),
        "lora_effect": rel(trained, base),
        "finite": bool(torch.isfinite(trained).all()),
        "ckpt_blocks": n_blocks,
        "ckpt_grads_complete": sorted(ckpt) == sorted(plain) and len(plain) == 2 * len(net.targets),
        "ckpt_grad_rel_err": max(rel(ckpt[k], plain[k]) for k in plain if k in ckpt),
        "plain_repeat_rel_err": max(rel(again[k], plain[k]) for k in plain),
        "block_calls_plain_ckpt": [calls_plain, calls_ckpt],
        "grad_norm": float(sum(v.double().norm() ** 2 for v in plain.values()) ** 0.5),
        "device": str(mm.get_torch_device()),
    }
    Path(a.report).write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(json.dumps({k: v for k, v in report.items() if k != "not_loaded"}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
