"""Runs INSIDE ComfyUI's python: train a LoRA on the MODEL that ComfyUI's own loaders loaded (the path the
EriComfyModel -> EriTrain -> EriSaveLoRA nodes take, through the same trainer.session calls), save it as the
Save node does, load it back with ComfyUI's LoRA loader (what LoraLoaderModelOnly calls) and compare ComfyUI's
patched model with the trainer's model at the end of training.

    cd <ComfyUI> && <comfy python> comfy_check_train.py --repo <EriDiffusion> --family sdxl|wan|flux|omnigen2 \
        --cache <fixture cache> --work <scratch folder> --report report.json

The report holds: the class ComfyUI detected, the losses, the LoRA keys ComfyUI did not load, the number of
weights it patched against the number of trained layers, and `rel_err` = max |patched - trained| / max
|trained| over the model's output on a fixed noisy latent, plus `lora_effect` (how far the LoRA moved that
output from the base model's), so a LoRA that did nothing cannot pass; `caption_effect`, how far another caption
moves the trained model's output (the conditioning reached the model); the trained layers by stack.

OmniGen2: ComfyUI fixes its config at full size (4B), so its MODEL is ComfyUI's own Omnigen2 model built small from
`supported_models.Omnigen2` with a small unet_config, as load_diffusion_model builds a detected one (get_model,
load_model_weights, ModelPatcher); its CLIP is a small Qwen2.5 through ComfyUI's CLIP loader (type omnigen2, the
small Qwen25_3BConfig through model_options["qwen25_3b_model_config"]). It trains with batch size 2 on captions of
different token lengths: ComfyUI's conds of the two (c_crossattn, num_tokens) do not concatenate, so the trainer runs
them one at a time (`train_forward_batches`: the batch size of every denoiser call while training).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from comfy_boot import boot
from pathlib import Path


CAPTIONS = ["a photo of a red cat", "a sketch of a blue house"]
# OmniGen2: captions of different token lengths (its per-sample conditioning path)
OMNIGEN2_CAPTIONS = ["a photo of a red cat", "a small sketch of a big blue house with a dark tree on the bright sky"]


def _write_dataset(folder: Path, n: int = 2, size: int = 64, captions: list[str] = CAPTIONS) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        yy, xx = np.mgrid[0:size, 0:size]
        img = np.stack([(xx * (i + 1)) % 256, (yy * 3) % 256, rng.integers(0, 256, (size, size))], -1)
        Image.fromarray(img.astype(np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(captions[i % len(captions)])
    return folder


def _load(family: str, files: dict):
    """MODEL, CLIP and VAE as UNETLoader / CLIPLoader (DualCLIPLoader) / VAELoader load them."""
    import torch

    import comfy.sd
    import comfy.utils

    if family == "omnigen2":
        return _load_omnigen2(files)
    clip_type = {"sdxl": comfy.sd.CLIPType.STABLE_DIFFUSION, "wan": comfy.sd.CLIPType.WAN,
                 "flux": comfy.sd.CLIPType.STABLE_DIFFUSION}[family]
    clips = {"sdxl": ["clip_l", "clip_g"], "wan": ["umt5"], "flux": ["clip"]}[family]
    with torch.inference_mode():  # as every node runs
        model = comfy.sd.load_diffusion_model(files["unet"], model_options={"dtype": torch.float32})
        clip = comfy.sd.load_clip([files[c] for c in clips], clip_type=clip_type)
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(files["vae"]))
    return model, clip, vae


def _load_omnigen2(files: dict):
    """ComfyUI's own Omnigen2 model built small (load_diffusion_model's steps on supported_models.Omnigen2 with the
    small unet_config), the small Qwen2.5 through ComfyUI's CLIP loader (type omnigen2), the VAE as VAELoader."""
    import torch

    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    with torch.inference_mode():  # as every node runs
        unet_config = {"image_model": "omnigen2", **json.loads(Path(files["unet_config"]).read_text())}
        model_config = comfy.supported_models.Omnigen2(unet_config)
        model_config.set_inference_dtype(torch.float32, None)
        sd = comfy.utils.load_torch_file(files["unet"])
        prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
        sd = comfy.utils.state_dict_prefix_replace(sd, {prefix: ""}, filter_keys=True) or sd
        model = model_config.get_model(sd, "")
        model.load_model_weights(sd, "")
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                                   offload_device=mm.unet_offload_device())
        small = json.loads(Path(files["qwen_config"]).read_text())
        clip = comfy.sd.load_clip([files["clip"]], clip_type=comfy.sd.CLIPType.OMNIGEN2,
                                  model_options={"qwen25_3b_model_config": small})
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(files["vae"]))
    return patcher, clip, vae


# the families whose files ComfyUI's own detection loads (comfy_fixtures.py): fixture, latent of the test, clip
# frames (video), captions, train: keys
FIXTURE_FAMILIES = {
    "sdxl": ("sdxl_files", (1, 4, 8, 8), None, CAPTIONS, {}),
    "wan": ("wan_files", (1, 16, 2, 8, 8), 5, CAPTIONS, {}),
    "flux": ("flux_files", (1, 16, 8, 8), None, CAPTIONS, {}),
    # two captions of different token lengths in one batch (its per-sample conditioning path)
    "omnigen2": ("omnigen2_files", (1, 16, 8, 8), None, OMNIGEN2_CAPTIONS, {"batch_size": 2}),
}


def family_inputs(family: str, cache: Path, comfyui: str):
    """(SmallFamily, EXPECT): a fixture family's files through ComfyUI's loaders, or comfy_small_<family>.py's
    ComfyUI model built small."""
    import importlib

    import comfy_fixtures
    from comfy_small import SmallFamily

    if family in FIXTURE_FAMILIES:
        fixture, latent, frames, captions, train = FIXTURE_FAMILIES[family]
        maker = getattr(comfy_fixtures, fixture)
        files = maker(cache, comfyui) if family == "omnigen2" else maker(cache)
        patcher, clip, vae = _load(family, files)
        return SmallFamily(patcher, clip, vae, latent, frames, captions, train), {}
    module = importlib.import_module(f"comfy_small_{family}")
    return module.build(cache, comfyui), module.EXPECT


def _write_controls(folder: Path, n: int = 2, size: int = 64) -> Path:
    """Reference images of the dataset's stems (img0.png ...): smooth colour fields, each its own."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        img = np.stack([(xx * 4 + 60 * i) % 256, (255 - yy * 4) % 256, np.full((size, size), 200 - 90 * i)], -1)
        Image.fromarray(img.astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


def _reference_pixels(controls: Path, i: int):
    """The i-th control image as the dataset gives it: (3, h, w) in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    a = np.asarray(Image.open(controls / f"img{i}.png").convert("RGB"), dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(a).permute(2, 0, 1)


def _trained_other_base(net, out, refs: list) -> tuple:
    """out(reference) with the trained network on, for the first and the second reference, and without it."""
    net.attach()
    net.eval()
    try:
        trained, trained_other = out(refs[0]), out(refs[1])
    finally:
        net.detach()
    return trained, trained_other, out(refs[0])


def _omnigen2_reference_run(files: dict, work: Path, steps: int, settings: dict, network: dict) -> dict:
    """OmniGen2 trained with a control folder (one reference image per item): ComfyUI's reference_latents. A fresh
    small model; the LoRA saved and loaded back as ComfyUI loads it, and ComfyUI's patched model run on its own
    extra_conds with reference_latents = [VAE.encode(reference)] (what VAEEncode -> ReferenceLatent give) against the
    trained model; another reference image moves the prediction."""
    import torch

    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    from trainer.fileio import save_safetensors_atomic
    from trainer.models.base import sample_of
    from trainer.models.comfy import ComfyModel
    from trainer.session import TrainingSession, job_from_parts

    patcher, clip, vae = _load_omnigen2(files)
    data = _write_dataset(work / "ref_dataset", captions=OMNIGEN2_CAPTIONS)
    controls = _write_controls(work / "ref_control")
    dataset = {"folder_path": str(data), "control_path": str(controls), "caption_ext": "txt", "resolution": [64],
               "trigger_word": "sks"}
    job = job_from_parts({"comfy": (patcher, clip, vae)}, [dataset], network, {**settings, "name": "eri_omnigen2_ref"},
                         steps, str(work / "ref_runs"))
    with torch.inference_mode(False), torch.enable_grad():
        model = ComfyModel(patcher, clip, vae)
        model.ensure_loaded()
        session = TrainingSession(job, model=model, report=lambda s: print(s, file=sys.stderr))
        session.advance(steps)
    cond_keys = sorted({k for c in session.trainer.latents.conds.values() for k in (c or {})})
    net = session.trainer.network

    def pixels(i: int) -> torch.Tensor:  # (3, h, w) in [-1, 1]
        return _reference_pixels(controls, i)

    g = torch.Generator().manual_seed(5)
    x = torch.randn((1, 16, 8, 8), generator=g)
    sigma = model.sampling.sigmas[len(model.sampling.sigmas) // 2].reshape(1).float().cpu().clone()
    text = model.encode_text(["sks, a photo of a red cat"])
    refs = [model.encode_conditions(pixels(i), pixels(i)) for i in (0, 1)]  # as the latent cache encodes them

    def out(c) -> torch.Tensor:
        with torch.no_grad():
            return model.predict(x, sigma, {**text, **{k: v[None] for k, v in c.items()}}).float().cpu()

    trained, trained_other, base = _trained_other_base(net, out, refs)
    no_ref = model.predict(x, sigma, text).float().cpu()

    tensors, metadata = session.export("float32")
    ref_keys = [k for k in net.targets if k.split(".")[1] == "ref_image_refiner"]
    ref_trained = sum(any(t.abs().max() > 0 for kk, t in tensors.items() if kk.startswith(k + ".") and "up" in
                          kk[len(k) + 1:]) for k in ref_keys)
    path = work / "loras" / "eri_omnigen2_ref.safetensors"
    save_safetensors_atomic(tensors, path, metadata)
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    with torch.inference_mode():  # ComfyUI on its own: LoRA loader, VAEEncode, ReferenceLatent, the model's extra_conds
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)
        mm.load_models_gpu([patched], force_full_load=True)
        raw = vae.encode(((pixels(0) + 1) / 2).clamp(0, 1).permute(1, 2, 0)[None])
        dev = mm.get_torch_device()
        t = sample_of(text, 0)
        conds = patched.model.extra_conds(cross_attn=t["cross_attn"][None].to(dev),
                                          attention_mask=t["attention_mask"][None].to(dev),
                                          reference_latents=[raw.to(dev)], device=dev, noise=x.to(dev))
        conds = {k: v.process_cond(batch_size=1, device=dev, area=None).cond for k, v in conds.items()}
        xs, ss = x.to(dev), sigma.to(dev)
        comfy_out = ((xs - patched.model.apply_model(xs, ss, **conds)) / ss).float().cpu()

    def rel(p: torch.Tensor, q: torch.Tensor) -> float:
        return ((p.double() - q.double()).abs().max() / q.double().abs().max().clamp_min(1e-30)).item()

    return {"losses": [loss for _, loss in session.losses], "cond_keys": cond_keys, "comfy_cond_keys": sorted(conds),
            "ref_targets": len(ref_keys), "ref_trained": int(ref_trained), "rel_err": rel(comfy_out, trained),
            "lora_effect": rel(trained, base), "reference_effect": rel(trained_other, trained),
            "no_reference_effect": rel(no_ref, base), "finite": bool(torch.isfinite(trained).all())}


def _start_image_run(fam, work: Path, steps: int, settings: dict, network: dict) -> dict:
    """Image-to-video on a model that takes a start image through ComfyUI's latent node (Wan 2.2 5B:
    Wan22ImageToVideoLatent): trained on clips with their first frame as the start image (do_i2v), on the same
    MODEL; the denoiser's timesteps while training (per latent frame, 0 on the start frame); ComfyUI's patched model
    fed by the node itself (its LATENT's noise_mask as the sampler's denoise_mask, the start frame clean as its
    sampler keeps it) against the trained model; another start image moves the generated frames' prediction."""
    import torch

    from trainer.demo.videos import make_video_dataset
    from trainer.models.comfy import ComfyModel
    from trainer.session import TrainingSession, job_from_parts

    data = make_video_dataset(work / "i2v_dataset", n=2, size=(64, 64), frames=12, fps=16)
    dataset = {"folder_path": str(data), "caption_ext": "txt", "resolution": [64], "trigger_word": "sks",
               "num_frames": fam.video_frames, "do_i2v": True}
    name = settings["name"] + "_i2v"
    job = job_from_parts({"comfy": (fam.patcher, fam.clip, fam.vae)}, [dataset], network, {**settings, "name": name},
                         steps, str(work / "i2v_runs"))
    seen: list[list[float]] = []  # the timesteps the denoiser is given, per call (ComfyUI's patched model's too)
    with torch.inference_mode(False), torch.enable_grad():
        model = ComfyModel(fam.patcher, fam.clip, fam.vae)
        model.ensure_loaded()
        session = TrainingSession(job, model=model, report=lambda s: print(s, file=sys.stderr))
        hook = model.denoiser.register_forward_pre_hook(lambda m, a: seen.append(a[1].detach().float().reshape(-1).tolist()))
        try:
            session.advance(steps)
            train_timesteps = list(seen)
            return _start_image_checks(fam, work, session, model, net_seen=seen, train_timesteps=train_timesteps)
        finally:
            hook.remove()


def _start_image_checks(fam, work: Path, session, model, net_seen: list, train_timesteps: list) -> dict:
    """The trained start-image run's checks (_start_image_run)."""
    import torch

    import comfy.model_management as mm
    import comfy.sampler_helpers
    import comfy.sd
    import comfy.utils
    from comfy_extras.nodes_wan import Wan22ImageToVideoLatent
    from trainer.data.cache import conditions_of_image
    from trainer.fileio import save_safetensors_atomic
    from trainer.models.base import sample_of

    seen = net_seen
    conds = list(session.trainer.latents.conds.values())
    given_frames = sorted({tuple(c["start_given"].float().mean(dim=(0, 2, 3)).tolist()) for c in conds})
    net = session.trainer.network

    controls = _write_controls(work / "start_images")

    def pixels(i: int) -> torch.Tensor:  # (3, h, w) in [-1, 1]
        return _reference_pixels(controls, i)

    g = torch.Generator().manual_seed(9)
    x = torch.randn(fam.latent_shape, generator=g)
    sigma = model.sampling.sigmas[len(model.sampling.sigmas) // 2].reshape(1).float().cpu().clone()
    text = model.encode_text(["sks, a photo of a red cat"])
    starts = [conditions_of_image(model, pixels(i), fam.video_frames) for i in (0, 1)]  # as a preview's are built

    def out(c) -> torch.Tensor:  # the start frames put in clean, as the loop and the sampler put them
        values, given = model.known_latents(c, x)
        with torch.no_grad():
            return model.predict(x * (1 - given) + values * given, sigma, {**text, **c}).float().cpu()

    net.attach()
    net.eval()
    try:
        seen.clear()
        trained, trained_other = out(starts[0]), out(starts[1])
        frame_timesteps = seen[0]
    finally:
        net.detach()
    base = out(starts[0])
    with torch.no_grad():
        no_start = model.predict(x, sigma, text).float().cpu()
    with torch.inference_mode(False):
        preview = session.sample("sks, a red circle", 64, 64, 2, 1.0, seed=1, frames=fam.video_frames,
                                 control=pixels(0))

    tensors, metadata = session.export("float32")
    path = work / "loras" / f"{session.job.name}.safetensors"
    save_safetensors_atomic(tensors, path, metadata)
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)

    image = ((pixels(0) + 1) / 2).clamp(0, 1).permute(1, 2, 0)[None]
    with torch.inference_mode():  # ComfyUI on its own: LoRA loader, the node, its sampler's mask and inputs
        patched, _ = comfy.sd.load_lora_for_models(fam.patcher, None, lora, 1.0, 0)
        mm.load_models_gpu([patched], force_full_load=True)
        res = Wan22ImageToVideoLatent.execute(fam.vae, 64, 64, fam.video_frames, 1, start_image=image)
        latent = res.args[0] if hasattr(res, "args") else res[0]
        dev = mm.get_torch_device()
        mask = comfy.sampler_helpers.prepare_mask(latent["noise_mask"], x.shape, dev)
        clean = patched.model.process_latent_in(latent["samples"].to(dev))
        xs = x.to(dev) * mask + clean * (1 - mask)  # KSamplerX0Inpaint with WAN22.scale_latent_inpaint: clean frames
        t = sample_of(text, 0)
        c = patched.model.extra_conds(cross_attn=t["cross_attn"][None].to(dev), denoise_mask=mask, device=dev, noise=xs)
        c = {k: v.process_cond(batch_size=1, device=dev, area=None).cond for k, v in c.items()}
        ss = sigma.to(dev)
        seen.clear()  # the same module: ComfyUI's patched model shares the diffusion model
        comfy_out = ((xs - patched.model.apply_model(xs, ss, **c)) / ss).float().cpu()

    def rel(p: torch.Tensor, q: torch.Tensor) -> float:
        return ((p.double() - q.double()).abs().max() / q.double().abs().max().clamp_min(1e-30)).item()

    return {"losses": [loss for _, loss in session.losses], "cond_keys": sorted({k for c in conds for k in c}),
            "given_frames": [list(f) for f in given_frames], "train_timesteps": train_timesteps,
            "frame_timesteps": frame_timesteps, "comfy_frame_timesteps": seen[0], "comfy_cond_keys": sorted(c),
            "rel_err": rel(comfy_out, trained), "lora_effect": rel(trained, base),
            "start_effect": rel(trained_other[:, :, 1:], trained[:, :, 1:]), "no_start_effect": rel(no_start, base),
            "sample_shape": list(preview.shape), "finite": bool(torch.isfinite(trained).all())}


def altered_conditions(model, cond: dict, names: list[str], guidance: float) -> dict[str, tuple]:
    """Pairs of (conditioning, guidance): a reference and the same with one condition changed, by the name of the
    effect: `mask_effect`, the caption's attention mask with its padding unmasked; `fps_effect`, the clip
    at half the native frame rate (the caption alone plays at the native one); `pooled_effect`, the pooled vector
    zeroed; `guidance_effect`, a distilled-guidance model at another guidance; `byt5_effect`, a caption with quoted
    text (ComfyUI's byT5 glyph encoding of it) without that encoding."""
    import torch

    out = {}
    for name in names:
        if name == "mask_effect":
            mask = cond["attention_mask"]
            if not bool((mask == 0).any()):
                raise RuntimeError("mask_effect: the caption's attention mask masks nothing")
            out[name] = ((cond, guidance), ({**cond, "attention_mask": torch.ones_like(mask)}, guidance))
        elif name == "fps_effect":
            if not model.conditions_on_fps:
                raise RuntimeError("fps_effect: the model takes no frame rate")
            out[name] = ((cond, guidance), ({**cond, "fps": torch.tensor([model.native_fps / 2])}, guidance))
        elif name == "pooled_effect":
            zeroed = {**cond, "pooled_output": torch.zeros_like(cond["pooled_output"])}
            out[name] = ((cond, guidance), (zeroed, guidance))
        elif name == "guidance_effect":
            if not model.distilled_guidance:
                raise RuntimeError("guidance_effect: the model has no guidance embedding")
            out[name] = ((cond, guidance), (cond, guidance * 2))
        elif name == "byt5_effect":
            quoted = model.encode_text(['sks, a sign that says "red cat"'])
            plain = {k: v for k, v in quoted.items() if not k.startswith("conditioning_byt5small")}
            if len(plain) == len(quoted):
                raise RuntimeError("byt5_effect: no conditioning_byt5small for a caption with quoted text")
            out[name] = ((quoted, guidance), (plain, guidance))
        else:
            raise ValueError(name)
    return out


def _hidream_checks(predict, cond: dict, other: dict, trained, targets: list[str], denoiser, texts: dict) -> dict:
    """HiDream: each of its conditions reaches the model on its own (the Llama layers and the pooled CLIP vector
    taken from another caption, the rest kept, move the trained model's output), the cached conditioning_llama3's
    shape, and its targets: the shared experts in, the routed experts out (while the model still has them)."""
    import torch

    def rel(p, q) -> float:
        return ((p.double() - q.double()).abs().max() / q.double().abs().max().clamp_min(1e-30)).item()

    effects = {}
    for key in ("conditioning_llama3", "pooled_output"):
        assert cond[key].shape == other[key].shape, (key, cond[key].shape, other[key].shape)
        effects[key] = rel(predict({**cond, key: other[key]}), trained)
    return {"condition_effects": effects,
            "llama_shapes": sorted({tuple(c["conditioning_llama3"].shape) for c in texts.values()}),
            "shared_expert_targets": sum(".shared_experts." in k for k in targets),
            "routed_expert_targets": sum(".experts." in k for k in targets),
            "routed_expert_linears_in_model": sum(".experts." in n and isinstance(m, torch.nn.Linear)
                                                  for n, m in denoiser.named_modules())}


def _reference_run(fam, work: Path, steps: int, settings: dict, network: dict, name: str) -> dict:
    """A small family that takes reference images (EXPECT["references"]) trained with a control folder, on a fresh
    build of it: ComfyUI's own path then gives the trained model's output (CLIPTextEncode, VAEEncode and
    ReferenceLatent, as the graph calls them, then the patched model's extra_conds through ComfyUI's sampler helpers,
    encode_model_conds), and another reference image moves the prediction."""
    import torch

    import comfy.model_management as mm
    import comfy.sampler_helpers
    import comfy.samplers
    import comfy.sd
    import comfy.utils
    import nodes
    from comfy_extras.nodes_edit_model import ReferenceLatent
    from trainer.fileio import save_safetensors_atomic
    from trainer.models.comfy import ComfyModel
    from trainer.session import TrainingSession, job_from_parts

    patcher, clip, vae = fam.patcher, fam.clip, fam.vae
    data = _write_dataset(work / "ref_dataset", captions=fam.captions)
    controls = _write_controls(work / "ref_control")
    dataset = {"folder_path": str(data), "control_path": str(controls), "caption_ext": "txt", "resolution": [64],
               "trigger_word": "sks"}
    job = job_from_parts({"comfy": (patcher, clip, vae)}, [dataset], network, {**settings, "name": f"{name}_ref"},
                         steps, str(work / "ref_runs"))
    with torch.inference_mode(False), torch.enable_grad():
        model = ComfyModel(patcher, clip, vae)
        model.ensure_loaded()
        session = TrainingSession(job, model=model, report=lambda s: print(s, file=sys.stderr))
        refs_seen: list[int] = []  # the reference latents each training forward of the denoiser was given
        hook = model.denoiser.register_forward_pre_hook(
            lambda mod, args, kwargs: refs_seen.append(len(kwargs.get("ref_latents") or [])), with_kwargs=True)
        try:
            session.advance(steps)
        finally:
            hook.remove()
    cond_keys = sorted({k for c in session.trainer.latents.conds.values() for k in (c or {})})
    net = session.trainer.network

    def pixels(i: int) -> torch.Tensor:  # (3, h, w) in [-1, 1]
        return _reference_pixels(controls, i)

    g = torch.Generator().manual_seed(5)
    x = torch.randn(fam.latent_shape, generator=g)
    sigma = model.sampling.sigmas[len(model.sampling.sigmas) // 2].reshape(1).float().cpu().clone()
    prompt = "sks, a photo of a red cat"
    text = model.encode_text([prompt])
    refs = [model.encode_conditions(pixels(i), pixels(i)) for i in (0, 1)]  # as the latent cache encodes them

    def out(c) -> torch.Tensor:  # guidance 3.5: what Flux's extra_conds takes where a prompt sets none
        with torch.no_grad():
            return model.predict(x, sigma, {**text, **{k: v[None] for k, v in c.items()}}, guidance=3.5).float().cpu()

    trained, trained_other, base = _trained_other_base(net, out, refs)
    with torch.no_grad():
        no_ref = model.predict(x, sigma, text, guidance=3.5).float().cpu()

    tensors, metadata = session.export("float32")
    path = work / "loras" / f"{name}_ref.safetensors"
    save_safetensors_atomic(tensors, path, metadata)
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    with torch.inference_mode():  # ComfyUI on its own: the LoRA loader, the graph's nodes, the sampler's conds
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)
        mm.load_models_gpu([patched], force_full_load=True)
        positive = nodes.CLIPTextEncode().encode(clip, prompt)[0]
        image = ((pixels(0) + 1) / 2).clamp(0, 1).permute(1, 2, 0)[None]  # ComfyUI's IMAGE
        positive = ReferenceLatent.execute(positive, nodes.VAEEncode().encode(vae, image)[0])[0]
        dev = mm.get_torch_device()
        xs, ss = x.to(dev), sigma.to(dev)
        conds = comfy.samplers.encode_model_conds(patched.model.extra_conds, comfy.sampler_helpers.convert_cond(positive),
                                                  xs, dev, "positive")
        conds = {k: v.process_cond(batch_size=1, device=dev, area=None).cond for k, v in conds[0]["model_conds"].items()}
        comfy_out = ((xs - patched.model.apply_model(xs, ss, **conds)) / ss).float().cpu()

    def rel(p: torch.Tensor, q: torch.Tensor) -> float:
        return ((p.double() - q.double()).abs().max() / q.double().abs().max().clamp_min(1e-30)).item()

    return {"losses": [loss for _, loss in session.losses], "cond_keys": cond_keys, "comfy_cond_keys": sorted(conds),
            "train_refs_per_forward": refs_seen, "rel_err": rel(comfy_out, trained), "lora_effect": rel(trained, base),
            "reference_effect": rel(trained_other, trained), "no_reference_effect": rel(no_ref, base),
            "finite": bool(torch.isfinite(trained).all())}


def _comfy_prediction(patched, conditioning, x, sigma):
    """ComfyUI's patched model on a CONDITIONING as its sampler feeds it: convert_cond, the model's extra_conds
    through encode_model_conds, process_cond, apply_model; as the velocity (x - denoised) / sigma."""
    import torch

    import comfy.model_management as mm
    import comfy.sampler_helpers
    import comfy.samplers

    dev = mm.get_torch_device()
    xs, ss = x.to(dev), sigma.to(dev)
    with torch.inference_mode():
        mm.load_models_gpu([patched], force_full_load=True)
        conds = comfy.sampler_helpers.convert_cond(conditioning)
        conds = comfy.samplers.encode_model_conds(patched.model.extra_conds, conds, xs, dev, "positive")
        model_conds = {k: v.process_cond(batch_size=1, device=dev, area=None).cond
                       for k, v in conds[0]["model_conds"].items()}
        out = ((xs - patched.model.apply_model(xs, ss, **model_conds)) / ss).float().cpu()
    return out, sorted(model_conds)


REFERENCE_CAPTION = "sks, a photo of a red cat"


def _reference_trained(model, net, controls: Path, latent_shape) -> dict:
    """The trained model (before ComfyUI patches the same modules) on a reference image as the latent cache encodes
    it (ComfyModel.encode_conditions) and, where the family's text encoder reads images, the caption encoded with it;
    another reference image, each way in alone, and none."""
    import torch

    vl = getattr(model, "text_takes_images", False)

    def text(i: int | None):
        if vl and i is not None:
            return model.encode_text_with_images([REFERENCE_CAPTION], [_reference_pixels(controls, i)])
        return model.encode_text([REFERENCE_CAPTION])

    g = torch.Generator().manual_seed(5)
    x = torch.randn(latent_shape, generator=g)
    sigma = model.sampling.sigmas[len(model.sampling.sigmas) // 2].reshape(1).float().cpu().clone()
    texts = [text(0), text(1)]
    refs = [{k: v[None] for k, v in model.encode_conditions(*[_reference_pixels(controls, i)] * 2).items()}
            for i in (0, 1)]

    def out(t, r) -> torch.Tensor:
        with torch.no_grad():
            return model.predict(x, sigma, {**t, **r}).float().cpu()

    net.attach()
    net.eval()
    try:
        trained, trained_other = out(texts[0], refs[0]), out(texts[1], refs[1])
        text_only_other, ref_only_other = out(texts[1], refs[0]), out(texts[0], refs[1])
    finally:
        net.detach()
    base, no_ref = out(texts[0], refs[0]), out(text(None), {})
    return {"vl": vl, "x": x, "sigma": sigma, "trained": trained, "base": base, "trained_other": trained_other,
            "text_only_other": text_only_other, "ref_only_other": ref_only_other, "no_ref": no_ref}


def _reference_against_comfy(ours: dict, patched, vae, clip, controls: Path) -> dict:
    """ComfyUI's patched model fed the same reference through its own nodes (the text encoder node:
    TextEncodeQwenImageEditPlus where images go into the text encoder, else CLIPTextEncode; VAEEncode;
    ReferenceLatent) against the trained model; the effects of the reference, of each way in alone, and of none."""
    import torch

    import nodes
    from comfy_extras.nodes_edit_model import ReferenceLatent

    image = ((_reference_pixels(controls, 0) + 1) / 2).clamp(0, 1).permute(1, 2, 0)[None]  # ComfyUI's IMAGE
    with torch.inference_mode():
        if ours["vl"]:
            from comfy_extras.nodes_qwen import TextEncodeQwenImageEditPlus

            conditioning = TextEncodeQwenImageEditPlus.execute(clip, REFERENCE_CAPTION, None, image).result[0]
        else:
            conditioning = nodes.CLIPTextEncode().encode(clip, REFERENCE_CAPTION)[0]
        latent = nodes.VAEEncode().encode(vae, image)[0]
        conditioning = ReferenceLatent.execute(conditioning, latent).result[0]
    comfy_out, comfy_keys = _comfy_prediction(patched, conditioning, ours["x"], ours["sigma"])

    def rel(p: torch.Tensor, q: torch.Tensor) -> float:
        return ((p.double() - q.double()).abs().max() / q.double().abs().max().clamp_min(1e-30)).item()

    trained = ours["trained"]
    return {"images_in_text": ours["vl"], "comfy_cond_keys": comfy_keys, "rel_err": rel(comfy_out, trained),
            "lora_effect": rel(trained, ours["base"]), "reference_effect": rel(ours["trained_other"], trained),
            "text_image_effect": rel(ours["text_only_other"], trained) if ours["vl"] else None,
            "ref_latent_effect": rel(ours["ref_only_other"], trained),
            "no_reference_effect": rel(ours["no_ref"], ours["base"]), "finite": bool(torch.isfinite(trained).all())}


def _text_image_node_check(model, clip, controls: Path) -> dict:
    """model.text_image_node = TextEncodeQwenImageEdit: a caption with its image is encoded as that node encodes it
    (called here as a graph calls it), which differs from the default TextEncodeQwenImageEditPlus's encoding."""
    from comfy_extras.nodes_qwen import TextEncodeQwenImageEdit
    from trainer.models.comfy import _conditioning_entries, comfy_image

    image = _reference_pixels(controls, 0)
    plus = model.encode_text_with_images([REFERENCE_CAPTION], [image])["cross_attn"][0].float()
    model.use_text_image_node("TextEncodeQwenImageEdit")
    try:
        ours = model.encode_text_with_images([REFERENCE_CAPTION], [image])["cross_attn"][0].float()
    finally:
        model.use_text_image_node("TextEncodeQwenImageEditPlus")
    node = TextEncodeQwenImageEdit.execute(clip, REFERENCE_CAPTION, None, comfy_image(image)).result[0]
    theirs = _conditioning_entries(node)["cross_attn"].float()
    n = min(len(plus), len(theirs))
    return {"lengths": [len(ours), len(theirs), len(plus)], "err": float((ours - theirs).abs().max()),
            "differs_from_plus": len(plus) != len(theirs) or float((plus[:n] - theirs[:n]).abs().max()) > 1e-4}


def _shift_report(model) -> dict:
    """The backend's training shift (mu, for `timestep_type: flux_shift`) at a 64 px and a 1024 px latent, and how far
    its shifted sigmas are from ComfyUI's own model_sampling.sigma(t) (what ComfyUI samples the family with)."""
    import torch

    from trainer.models.schedules import time_shift_exponential

    small = tuple(model.latent_shape(64, 64))
    large = tuple(model.latent_shape(1024, 1024))
    mu_small, mu_large = model.train_shift_mu(small), model.train_shift_mu(large)
    t = torch.linspace(0.01, 1.0, 100, dtype=torch.float64)
    ours = time_shift_exponential(mu_large, t)
    comfy_sigma = model.sampling.sigma(t).double()
    return {"mu_64px": mu_small, "mu_1024px": mu_large, "comfy_shift": float(model.sampling.shift),
            "latent_1024px": list(large), "sigma_max_err": float((ours - comfy_sigma).abs().max())}


def _test_clip(variant: int, frames: int, size: int = 64):
    """A control clip (3, f, h, w) in [-1, 1] of the test: smooth colour fields moving frame by frame, its own per
    variant."""
    import torch

    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = [torch.stack([torch.sin(3 * xx + 0.4 * f + 2 * variant), torch.cos(2 * yy - 0.3 * f),
                        torch.sin(xx * yy * 4 + variant)]) for f in range(frames)]
    return torch.stack(out, dim=1) * 0.8


def _test_mask(frames: int, size: int = 64):
    """A control mask (1, f, h, w) in [0, 1]: generate the left half (1), keep the right (0)."""
    import torch

    m = torch.zeros(1, frames, size, size)
    m[..., : size // 2] = 1.0
    return m


def node_test_inputs(node: str, work: Path, variant: int, frames: int) -> dict:
    """The conditioning inputs of the test predictions in the engine's pixels ([-1, 1]): another start image (I2V) or
    control video (VACE) per variant, the same mask and reference image."""
    import torch

    controls = _write_controls(work / "node_test_images")

    def pixels(i: int) -> torch.Tensor:  # (3, h, w) in [-1, 1]
        return _reference_pixels(controls, i)

    if node == "WanImageToVideo":
        return {"control": pixels(variant)}
    return {"control": _test_clip(variant, frames), "mask": _test_mask(frames), "reference": pixels(1)}


def comfy_node_conditioning(node: str, clip, vae, clip_vision, prompt: str, inputs: dict, frames: int) -> tuple:
    """ComfyUI on its own, as a graph wires it: CLIPTextEncode, the inputs as IMAGE / MASK (CLIPVisionEncode of the
    start image for a model that reads it), the node (WanImageToVideo / WanVaceToVideo): (positive, its outputs)."""
    import comfy_extras.nodes_wan as nodes_wan
    import nodes

    def image(px):  # (3, [f,] h, w) in [-1, 1] -> IMAGE (f, h, w, 3) in [0, 1]
        px = px[:, None] if px.dim() == 3 else px
        return ((px.float() + 1) / 2).clamp(0, 1).permute(1, 2, 3, 0).contiguous()

    positive = nodes.CLIPTextEncode().encode(clip, prompt)[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    h, w = inputs["control"].shape[-2:]
    if node == "WanImageToVideo":
        start = image(inputs["control"])
        vision = None if clip_vision is None else nodes.CLIPVisionEncode().encode(clip_vision, start, "center")[0]
        out = nodes_wan.WanImageToVideo.execute(positive, negative, vae, w, h, frames, 1, start_image=start,
                                                clip_vision_output=vision)
    else:
        out = nodes_wan.WanVaceToVideo.execute(positive, negative, vae, w, h, frames, 1, 1.0,
                                               control_video=image(inputs["control"]),
                                               control_masks=inputs["mask"][0], reference_image=image(inputs["reference"]))
    return out.args if hasattr(out, "args") else out


def _node_checks(fam, work: Path, session, model, patched, clip_vision_refusal: str | None) -> dict:
    """A model whose inputs beside the latent a ComfyUI conditioning node builds (Wan 2.1 I2V: WanImageToVideo, VACE:
    WanVaceToVideo), trained with them: what the cache holds; the trained model against ComfyUI's patched model fed
    by ComfyUI's own path (CLIPTextEncode -> the node -> convert_cond / encode_model_conds, as its sampler turns
    conditioning into model inputs); the condition's effect (another start image / control video); a job without
    the conditioning refused; VACE's reference frames before the clip's, trimmed after sampling."""
    import torch

    import comfy.model_management as mm
    import comfy.sampler_helpers
    import comfy.samplers
    from comfy_extras.nodes_wan import TrimVideoLatent
    from trainer.data.cache import conditions_of_image
    from trainer.errors import UserError
    from trainer.models.comfy import LEADING_FRAMES, NODE_PREFIX
    from trainer.session import TrainingSession, job_from_parts

    node, frames = model.conditioning_node.name, fam.video_frames
    conds = list(session.trainer.latents.conds.values())
    net = session.trainer.network
    prompt = "sks, a photo of a red cat"
    inputs = [node_test_inputs(node, work, v, frames) for v in (0, 1)]
    ours = [conditions_of_image(model, i["control"], frames, i.get("reference"), (64, 64), mask=i.get("mask"))
            for i in inputs]  # as a preview's are built (the node, through the backend)
    text = model.encode_text([prompt])
    with torch.inference_mode():  # as every node runs
        graph = [comfy_node_conditioning(node, fam.clip, fam.vae, model.clip_vision, prompt, i, frames) for i in inputs]
    latent = graph[0][2]["samples"]  # the node's LATENT: the noisy latent's shape (VACE: the reference frame first)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(tuple(latent.shape), generator=g)
    sigma = model.sampling.sigmas[len(model.sampling.sigmas) // 2].reshape(1).float().cpu().clone()

    def out(c) -> torch.Tensor:
        with torch.no_grad():
            return model.predict(x, sigma, {**text, **c}).float().cpu()

    model.ensure_loaded()  # the trainer's MODEL (ComfyUI's patched one was loaded last)
    net.attach()
    net.eval()
    try:
        trained, trained_other = out(ours[0]), out(ours[1])
        vision_key = NODE_PREFIX + "clip_vision_output.penultimate_hidden_states"
        vision_only = out({**ours[0], vision_key: ours[1][vision_key]}) if vision_key in ours[0] else None
        bare = out({})  # no conditions: the zeros ComfyUI fills in
    finally:
        net.detach()
    base = out(ours[0])

    with torch.inference_mode():  # ComfyUI on its own: the node's conditioning through its sampler's conversion
        mm.load_models_gpu([patched], force_full_load=True)
        dev = mm.get_torch_device()
        xs, ss = x.to(dev), sigma.to(dev)
        c = comfy.sampler_helpers.convert_cond(graph[0][0])
        c = comfy.samplers.encode_model_conds(patched.model.extra_conds, c, xs, dev, "positive")
        c = {k: v.process_cond(batch_size=1, area=None, device=dev).cond for k, v in c[0]["model_conds"].items()}
        comfy_out = ((xs - patched.model.apply_model(xs, ss, **c)) / ss).float().cpu()
    model.ensure_loaded()

    def rel(p: torch.Tensor, q: torch.Tensor) -> float:
        return ((p.double() - q.double()).abs().max() / q.double().abs().max().clamp_min(1e-30)).item()

    report = {"node": node, "cond_keys": sorted({k for c in conds for k in c}), "comfy_cond_keys": sorted(c),
              "latent_shape": list(latent.shape), "rel_err": rel(comfy_out, trained), "lora_effect": rel(trained, base),
              "condition_effect": rel(trained_other, trained), "no_condition_effect": rel(bare, trained),
              "clip_vision_effect": None if vision_only is None else rel(vision_only, trained),
              "clip_vision_refusal": clip_vision_refusal, "finite": bool(torch.isfinite(trained).all())}
    if len(graph[0]) > 3:  # VACE: trim_latent, the reference's latent frames
        trim = int(graph[0][3])
        report["trim_latent"] = trim
        report["leading_frames"] = [list(c[LEADING_FRAMES].shape) for c in conds if LEADING_FRAMES in c]
        report["trimmed_shape"] = list(TrimVideoLatent.execute({"samples": latent}, trim).args[0]["samples"].shape)
    with torch.inference_mode(False):  # a preview: conditioned, the reference frames trimmed
        i = inputs[0]
        control = i["control"] if i["control"].dim() == 3 else i["control"][:, 0]
        report["sample_shape"] = list(session.sample("sks, a red circle", 64, 64, 2, 1.0, seed=1, frames=frames,
                                                     control=control, reference=i.get("reference")).shape)
    # a job without the conditioning: refused, naming what is missing
    from trainer.demo.videos import make_video_dataset

    data = make_video_dataset(work / "bare_dataset", n=1, size=(64, 64), frames=8, fps=16)
    dataset = {"folder_path": str(data), "caption_ext": "txt", "resolution": [64], "num_frames": frames}
    job = job_from_parts({"comfy": (fam.patcher, fam.clip, fam.vae)}, [dataset], {"type": "lora", "linear": 4},
                         {"name": "bare", "train": {"dtype": "fp32"}}, 1, str(work / "bare_runs"))
    try:
        with torch.inference_mode(False), torch.enable_grad():
            TrainingSession(job, model=model, report=lambda s: None)
        report["refusal"] = None
    except UserError as e:
        report["refusal"] = str(e)
    return report


def _fp8_gradients(fam, model, lora_grads, fp8: dict) -> dict:
    """A model whose weights ComfyUI holds in fp8: the LoRA gradients on them (`fp8`, no checkpointing) against the
    same weights upcast to the compute dtype (exactly their values: the cast path computes what the upcast model
    does) and against the file's own weights (bf16: what fp8 storage costs the gradient's direction); and what
    autograd keeps of the layers' upcast weights in that pass, with the backend keeping them as the layer and with it
    keeping the copies (as without it)."""
    import torch

    import comfy.utils
    import comfy_check_fp8 as f8

    compute = model.base.manual_cast_dtype or torch.float32
    params = f8.fp8_params(model.denoiser)
    with f8.SavedUpcasts(model.denoiser) as kept:
        again = lora_grads(0.0)
    with f8.SavedUpcasts(model.denoiser, keep_layers=False) as copies:
        unfixed = lora_grads(0.0)
    with f8.swapped_weights(model.denoiser, {n: f8.upcast(p, compute) for n, p in params.items()}):
        up = lora_grads(0.0)
    ref_sd = comfy.utils.load_torch_file(fam.reference_file)
    missing = sorted(n for n in params if n not in ref_sd)
    if missing:
        raise RuntimeError(f"the reference file lacks {missing[:5]}")
    with f8.swapped_weights(model.denoiser, {n: ref_sd[n].to(compute) for n in params}):
        ref = lora_grads(0.0)
    cos_up, err_up = f8.cosine(fp8, up)
    cos_ref, err_ref = f8.cosine(fp8, ref)
    weights_fp32 = sum(p.numel() * torch.finfo(compute).bits // 8 for p in params.values() if p.dim() >= 2)
    return {"grad_cos_upcast": cos_up, "grad_rel_err_upcast": err_up, "grad_cos_file": cos_ref,
            "grad_rel_err_file": err_ref, "file_dtypes": sorted({str(ref_sd[n].dtype) for n in params}),
            "saved_upcast_peak": kept.peak, "recasts": kept.recasts, "saved_upcast_peak_copies": copies.peak,
            "recasts_copies": copies.recasts, "upcast_weight_bytes": weights_fp32,
            "recast_grad_rel_err": f8.cosine(again, unfixed)[1], "repeat_grad_rel_err": f8.cosine(again, fp8)[1]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", default=os.getcwd())
    ap.add_argument("--repo", required=True)
    ap.add_argument("--family", required=True, help=f"{', '.join(FIXTURE_FAMILIES)}, or NAME of comfy_small_NAME.py")
    ap.add_argument("--cache", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--report", required=True)
    a = ap.parse_args()
    collect = boot(a.comfyui, a.repo)  # before any comfy import

    import torch

    import comfy.model_management as mm
    import comfy.samplers
    import comfy.sd
    import comfy.utils
    from trainer.fileio import save_safetensors_atomic
    from trainer.models.base import sample_of
    from trainer.models.comfy import ComfyModel, is_linear
    from trainer.session import TrainingSession, job_from_parts

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    cache, work = Path(a.cache), Path(a.work)
    fam, expect = family_inputs(a.family, cache, a.comfyui)
    patcher, clip, vae = fam.patcher, fam.clip, fam.vae

    if fam.video_frames:  # a video family trains on clips of moving shapes
        from trainer.demo.videos import make_video_dataset

        data = make_video_dataset(work / "dataset", n=2, size=(64, 64), frames=12, fps=16)
        if fam.captions != CAPTIONS:  # the family's own captions (HunyuanVideo 1.5: quoted text for its byT5)
            for i, txt in enumerate(sorted(data.glob("*.txt"))):
                txt.write_text(fam.captions[i % len(fam.captions)])
        dataset = {"folder_path": str(data), "caption_ext": "txt", "resolution": [64], "trigger_word": "sks",
                   "num_frames": fam.video_frames}
    else:
        data = _write_dataset(work / "dataset", captions=fam.captions)
        dataset = {"folder_path": str(data), "caption_ext": "txt", "resolution": [64], "trigger_word": "sks"}
    if fam.dataset is not None:  # a conditioned family: its start images, control videos ...
        dataset.update(fam.dataset(work, data))
    if fam.controls:  # reference images, one per item, as ComfyUI's reference_latents
        dataset["control_path"] = str(_write_controls(work / "control"))
    network = {"type": "lora", "linear": 4, "linear_alpha": 4.0}
    settings = {"name": f"eri_{a.family}", "train": {"lr": 2e-3, "optimizer": "adamw", "batch_size": 1,
                                                      "dtype": "fp32", "timestep_type": "sigmoid", "seed": 7,
                                                      "cache_text_embeddings": True, **fam.settings},
                "save": {"save_every": 1000, "dtype": "float32"}}
    job = job_from_parts({"comfy": (patcher, clip, vae), "model_keys": fam.model_keys}, [dataset], network, settings,
                         a.steps, str(work / "runs"))

    clip_vision_refusal = None
    if fam.clip_vision is not None:  # the model reads CLIP vision features: without them it is refused
        try:
            ComfyModel(patcher, clip, vae)
        except Exception as e:
            clip_vision_refusal = str(e)
    with torch.inference_mode(False), torch.enable_grad():  # as EriTrain runs
        model = ComfyModel(patcher, clip, vae, clip_vision=fam.clip_vision)
        model.ensure_loaded()
        session = TrainingSession(job, model=model, report=lambda s: print(s, file=sys.stderr))
        forward_batches: list[int] = []  # the batch size of every denoiser call while training
        timestep_shapes: list[list[int]] = []  # and the shape of the timesteps it was given
        timesteps: list[float] = []  # and their values

        def seen(mod, args) -> None:
            forward_batches.append(int(args[0].shape[0]))
            timestep_shapes.append(list(args[1].shape) if len(args) > 1 else [])
            if len(args) > 1:
                timesteps.extend(args[1].detach().float().reshape(-1).tolist())

        # the keyword inputs beside the latent the denoiser got (clip_fea, vace_context ...), and the channels of the
        # latent it got (a model taking channels beside the latent: c_concat), with how large those were
        train_inputs: list[dict] = []

        def inputs(mod, args, kwargs) -> None:
            extra = args[0][:, model.latent_channels():]
            train_inputs.append({"kwargs": sorted(k for k, v in kwargs.items() if v is not None),
                                 "channels": int(args[0].shape[1]),
                                 "frames": int(args[0].shape[2]) if args[0].dim() == 5 else 1,
                                 "beside_latent_max": float(extra.abs().max()) if extra.numel() else None})

        pre = model.denoiser.register_forward_pre_hook(seen)
        pre_kw = model.denoiser.register_forward_pre_hook(inputs, with_kwargs=True)
        forward_refs: list[list] = []  # the reference latents (shapes) every denoiser call got while training
        forward_context: list[int] = []  # and its text context's length

        def record(mod, args, kw) -> None:
            forward_refs.append([list(r.shape) for r in kw.get("ref_latents") or []])
            forward_context.append(int(kw["context"].shape[1]) if kw.get("context") is not None else 0)

        refs = model.denoiser.register_forward_pre_hook(record, with_kwargs=True)
        fp8_watch = contextlib.ExitStack()
        if expect.get("fp8"):  # ComfyUI holds the weights in fp8: their storage, and what autograd keeps of upcasts
            import comfy_check_fp8

            target_modules = [m.module for t in session.trainer.network.targets.values() for m in t.members]
            storage = fp8_watch.enter_context(comfy_check_fp8.StorageWatch(model.denoiser, target_modules))
            train_saved = fp8_watch.enter_context(comfy_check_fp8.SavedUpcasts(model.denoiser))
        try:
            with fp8_watch:
                session.advance(a.steps)
            storage_report = storage.report() if expect.get("fp8") else None  # before ComfyUI's merge rewrites them
        finally:
            pre.remove()
            pre_kw.remove()
            refs.remove()
    # the cached captions' true token lengths (each caption encoded at its own length)
    text_lengths = sorted(int(c["cross_attn__shape"][0]) if "cross_attn__shape" in c else int(c["cross_attn"].shape[0])
                          for c in session.trainer.texts.mem.values())
    text_keys = sorted({k for c in session.trainer.texts.mem.values() for k in c})
    losses = [loss for _, loss in session.losses]
    latent_shapes = sorted({tuple(v.shape) for v in session.trainer.latents.mem.values()})
    sample_shape = None
    if fam.video_frames and not model.requires_conditions():  # a video preview through ComfyUI's VAE: a clip
        with torch.inference_mode(False):
            sample_shape = list(session.sample("sks, a red circle", 64, 64, 2, 1.0, seed=1,
                                               frames=fam.video_frames).shape)
    if fam.controls:  # a preview with a reference image (and, where the text encoder reads it, the prompts with it)
        from trainer.data.cache import _preview_image

        control = _preview_image(str(Path(dataset["control_path"]) / "img0.png"), (64, 64), "check", "control")
        with torch.inference_mode(False):
            preview = session.sample("sks, a red circle", 64, 64, 2, 4.0, seed=1, control=control)
        sample_shape = list(preview.shape) if bool(torch.isfinite(preview).all()) else None
    if a.family == "omnigen2":  # a preview with CFG: the caption and the (empty) negative at their own lengths
        with torch.inference_mode(False):
            preview = session.sample("sks, a red circle", 64, 64, 2, 4.0, seed=1)
        sample_shape = list(preview.shape) if bool(torch.isfinite(preview).all()) else None

    # the trainer's model at the end of training, on a fixed noisy latent and prompt
    lat_shape = fam.latent_shape
    g = torch.Generator().manual_seed(3)
    x = torch.randn(lat_shape, generator=g)
    sigma = model.sampling.sigmas[len(model.sampling.sigmas) // 2].reshape(1).float().cpu().clone()  # not an inference tensor
    cond = model.encode_text(["sks, a photo of a red cat"])
    long_caption = "sks, a small sketch of a big blue house with a dark tree on the bright sky"
    other = model.encode_text([long_caption])
    net = session.trainer.network

    def out(m: ComfyModel, c=cond, guidance: float = 3.5) -> torch.Tensor:
        with torch.no_grad():
            return m.predict(x, sigma, c, guidance=guidance).float().cpu()

    net.attach()
    net.eval()
    try:
        trained = out(model)
        trained_other = out(model, other)
        # the pooled vector alone (SD3's y) moves the output: it reached the model
        unpooled = (out(model, {**cond, "pooled_output": torch.zeros_like(cond["pooled_output"])})
                    if "pooled_output" in cond else None)
        # both captions in one batch (padded to the longer, each cut back to its own length) = each alone
        with torch.no_grad():
            pair = model.predict(torch.cat([x, x]), sigma.repeat(2),
                                 model.encode_text(["sks, a photo of a red cat", long_caption]), guidance=3.5).float().cpu()
        # the family's conditions beside the caption reach the model (EXPECT's condition_effects)
        altered = {name: (out(model, *ref), out(model, *changed)) for name, (ref, changed) in
                   altered_conditions(model, cond, expect.get("condition_effects", []), 3.5).items()}
        if a.family == "hidream":
            hidream = _hidream_checks(lambda c: out(model, c), cond, other, trained, list(net.targets), model.denoiser,
                                      session.trainer.texts.mem)
    finally:
        net.detach()
    base = out(model)
    if fam.controls:  # the trained model on reference images, before ComfyUI patches the same modules
        reference = _reference_trained(model, net, Path(dataset["control_path"]), fam.latent_shape)
    # the model inputs ComfyUI's extra_conds make of the test caption's conditioning
    model_cond_keys = sorted(model._sample_conds(x.to(model.device), sample_of(cond, 0), 3.5))

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
    first_linear = next(m for b in model.repeated_blocks() for m in b.modules() if is_linear(m))
    calls: list[int] = []
    hook = first_linear.register_forward_hook(lambda *_: calls.append(1))
    # the targets whose layers run in this forward (OmniGen2's ref_image_refiner runs only with reference images)
    ran: set[str] = set()
    run_hooks = [m.module.register_forward_hook(lambda *_, k=key: ran.add(k))
                 for key, t in net.targets.items() for m in t.members]

    def nonzero(grads: dict[str, torch.Tensor]) -> list[str]:
        return sorted(k for k, v in grads.items() if v.abs().max() > 0)

    plain = lora_grads(0.0)
    for h in run_hooks:
        h.remove()
    calls_plain = len(calls)
    ckpt = lora_grads(1.0)
    calls_ckpt = len(calls) - calls_plain
    hook.remove()
    again = lora_grads(0.0)
    n_blocks = len(model.repeated_blocks())
    if expect.get("fp8"):
        fp8_grads = _fp8_gradients(fam, model, lora_grads, plain)

    # saved as EriSaveLoRA saves, loaded as LoraLoaderModelOnly loads
    tensors, metadata = session.export("float32")

    def stack(key: str) -> str:  # diffusion_model.<stack>.<i>...
        return key.split(".")[1]

    stacks: dict[str, dict[str, int]] = {}
    untrained: list[str] = []
    for key in net.targets:
        ups = [t for k, t in tensors.items() if k.startswith(key + ".") and "up" in k[len(key) + 1:]]
        moved = any(t.abs().max() > 0 for t in ups)
        if not moved:
            untrained.append(key)
        s = stacks.setdefault(stack(key), {"targets": 0, "trained": 0, "ran": 0})
        s["targets"] += 1
        s["trained"] += int(moved)
        s["ran"] += int(key in ran)
    path = work / "loras" / f"eri_{a.family}.safetensors"
    save_safetensors_atomic(tensors, path, metadata)
    before = len(collect.messages)
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    with torch.inference_mode():
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)
    not_loaded = [m for m in collect.messages[before:] if "lora key not loaded" in m]
    if expect.get("fp8"):  # ComfyUI's two ways with a LoRA on fp8 weights; rel_err: at cast time, the fp8 kept
        import comfy_check_fp8

        fp8_patch = comfy_check_fp8.comfy_patched_outputs(patched, vae, out)
        result = fp8_patch["cast_time"]
    else:
        with torch.inference_mode(False):
            comfy_patched = ComfyModel(patched, None, vae, clip_vision=fam.clip_vision)
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
        "caption_effect": rel(trained_other, trained),
        "pooled_effect": None if unpooled is None else rel(unpooled, trained),
        "model_cond_keys": model_cond_keys,
        "condition_effects": {name: rel(changed, ref) for name, (ref, changed) in altered.items()},
        "pair_rel_err": max(rel(pair[:1], trained), rel(pair[1:], trained_other)),
        "text_lengths": text_lengths,
        "text_keys": text_keys,
        "train_forward_batches": forward_batches,
        "train_timestep_shapes": timestep_shapes,
        "train_timesteps": timesteps,
        "train_inputs": train_inputs,
        "run_name": session.job.name,
        "timestep_scale": float(model.sampling.timestep(torch.tensor([1.0])).item()),
        # pixels per latent cell, frames per latent frame, latent cells per token side; a 96x80 5-frame clip's latent
        "vae_factors": {"vae_scale": model.vae_scale, "vae_temporal": model.vae_temporal, "patch": model.patch,
                        "pixel_factor": model.pixel_factor},
        "latent_96x80x5": list(model.latent_shape(96, 80, 5)),
        "stacks": stacks,
        "n_targets_ran": len(ran),
        "finite": bool(torch.isfinite(trained).all()),
        "ckpt_blocks": n_blocks,
        "untrained": sorted(untrained),
        # every target that ran has gradients (both LoRA matrices), with and without checkpointing, but those whose
        # output the model discards (expect["untrained"]: none, or zeros where the recompute's backward fills them in)
        "ckpt_grads_complete": nonzero(ckpt) == nonzero(plain)
        and len(nonzero(plain)) == 2 * len(ran - set(expect.get("untrained", ()))),
        "ckpt_grad_rel_err": max(rel(ckpt[k], plain[k]) for k in plain if k in ckpt),
        "plain_repeat_rel_err": max(rel(again[k], plain[k]) for k in plain),
        "block_calls_plain_ckpt": [calls_plain, calls_ckpt],
        "grad_norm": float(sum(v.double().norm() ** 2 for v in plain.values()) ** 0.5),
        # the training shift the backend gives at the test latent (mu: resolution-dependent; shift: the fixed one)
        "train_shift_mu": model.train_shift_mu(tuple(lat_shape)),
        "train_shift": model.train_shift(),
        "device": str(mm.get_torch_device()),
        "expect": expect,
    }
    if fam.controls:  # trained on reference images: ComfyUI's own node path with the same reference
        report["reference"] = _reference_against_comfy(reference, patched, vae, clip, Path(dataset["control_path"]))
        report["reference"]["train_ref_latents"] = forward_refs
        # the cached text lengths: captions alone, and captions read with their item's control image
        lengths = {k: int(c["cross_attn__shape"][0]) for k, c in session.trainer.texts.mem.items()}
        report["reference"]["text_lengths_plain"] = sorted(n for k, n in lengths.items() if "\x00" not in k)
        report["reference"]["text_lengths_with_image"] = sorted(n for k, n in lengths.items() if "\x00" in k)
        report["reference"]["train_context_lengths"] = forward_context
        if model.text_takes_images:  # model.text_image_node: the first Qwen-Image-Edit's node instead of Plus
            report["reference"]["text_image_node"] = _text_image_node_check(model, clip, Path(dataset["control_path"]))
    if expect.get("shift_mu") is not None:  # the training shift against ComfyUI's own sampling of the family
        report["shift"] = _shift_report(model)
    if a.family == "sd35":  # a ModelSamplingSD3 node before the training node: its shift trains and samples
        from comfy_extras.nodes_model_advanced import ModelSamplingSD3

        shifted = ModelSamplingSD3().patch(patcher, 6.0)[0]
        with torch.inference_mode(False):
            node_model = ComfyModel(shifted, clip, vae)
        node_sigmas = comfy.samplers.calculate_sigmas(shifted.get_model_object("model_sampling"), "simple", 8)
        report["node_shift"] = {"train_shift": node_model.train_shift(), "unpatched": model.train_shift(),
                                "sigmas_err": float((node_model.sample_sigmas(8, fam.latent_shape)
                                                     - node_sigmas.float().cpu()).abs().max())}
    if a.family in ("hunyuan_video", "hunyuan_video15"):  # the training shift and guidance: ComfyUI's, guidance 1
        report["train_shift"] = [model.train_shift(), float(model.sampling.shift)]
        report["train_guidance"] = [model.distilled_guidance, model.train_guidance]
        # ComfyUI crops its prompt template away: the context is the caption's tokens, not the whole template's
        tokens = clip.tokenize("sks, a photo of a red cat")
        llm_tokens = tokens["llama" if "llama" in tokens else "qwen25_7b"][0]
        report["template_crop"] = [len(llm_tokens), int(cond["cross_attn"].shape[1])]
    if a.family == "ltxv":  # the training shift is the one ComfyUI's ModelSamplingLTXV gives this latent
        from comfy_extras.nodes_lt import ModelSamplingLTXV

        node = ModelSamplingLTXV.execute(patcher, 2.05, 0.95, latent={"samples": torch.zeros(fam.latent_shape)})
        node_sampling = (node.args[0] if hasattr(node, "args") else node[0]).get_model_object("model_sampling")
        report["shift_mu"] = [model.train_shift_mu(fam.latent_shape), float(node_sampling.shift)]
        report["default_shift"] = float(model.sampling.shift)
        # previews sample as that patched model does with ComfyUI's simple scheduler
        node_sigmas = comfy.samplers.calculate_sigmas(node_sampling, "simple", 8).float().cpu()
        report["sample_sigmas_err"] = float((model.sample_sigmas(8, fam.latent_shape) - node_sigmas).abs().max())
    if a.family == "flux2":  # its shift, as ComfyUI's Flux2Scheduler samples it: training (1024x1024) and previews
        from comfy_extras.nodes_flux import Flux2Scheduler

        report["train_shift_mu_1024"] = model.train_shift_mu((1, 128, 64, 64))
        preview, node = model.sample_sigmas(4, lat_shape), Flux2Scheduler.execute(4, 64, 64)[0].float()
        report["preview_sigmas"] = preview.tolist()
        report["preview_sigmas_err"] = float((preview - node).abs().max())
    if a.family == "omnigen2":  # a second run with reference images (a control folder)
        import comfy_fixtures

        files = comfy_fixtures.omnigen2_files(cache, a.comfyui)
        report["reference"] = _omnigen2_reference_run(files, work, a.steps, settings, network)
    elif expect.get("references"):  # a family built small that takes reference images: a second run with them
        report["reference"] = _reference_run(family_inputs(a.family, cache, a.comfyui)[0], work, a.steps, settings,
                                             network, f"eri_{a.family}")
    if model.start_image_node is not None:  # a second run with start images (image-to-video)
        report["start_image"] = _start_image_run(fam, work, a.steps, settings, network)
    if model.conditioning_node is not None:  # trained with the conditions a ComfyUI node builds
        report["node"] = _node_checks(fam, work, session, model, patched, clip_vision_refusal)
    if a.family == "hidream":
        report["hidream"] = hidream
    if expect.get("fp8"):
        merged = fp8_patch.pop("merged")
        fp8_patch.pop("cast_time")
        report["fp8"] = {**storage_report, **fp8_grads, **fp8_patch, "manual_cast_dtype": str(model.base.manual_cast_dtype),
                         "ops": type(target_modules[0]).__qualname__, "backend_fp8_layers": model.fp8_layers,
                         "train_saved_upcast_peak": train_saved.peak, "train_recasts": train_saved.recasts,
                         "merged_rel_err": rel(merged, trained), "merged_lora_effect": rel(trained, base),
                         "merged_finite": bool(torch.isfinite(merged).all())}
    Path(a.report).write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(json.dumps({k: v for k, v in report.items() if k != "not_loaded"}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
