"""Wan 2.1 against real ComfyUI: the trainer's Wan files (T2V, I2V, VACE) are detected as their variant and run
by ComfyUI with the trainer's outputs; every network type loads with zero unloaded keys and computes what the
trainer computed; ComfyUI's own WanImageToVideo and WanVaceToVideo nodes build the conditions the trainer builds, and its CLIP
preprocessing is the trainer's.

One ComfyUI process per variant (comfy_check_wan.py) loads the model with comfy.sd.load_diffusion_model and runs
BaseModel.apply_model, so ComfyUI's model_sampling (sigma -> timestep) and its I2V concat are part of what is
compared. Needs COMFYUI_PATH (comfy_env.py); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from integration.comfy_env import comfy_install
from integration.test_comfyui_flux_lora import CASES, TOL, _randomize, _rel_err

HERE = Path(__file__).resolve().parent


def _comfy_side(python, comfy, tmp: Path, model: str, files: dict, inputs: dict, vae: str | None) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    from trainer.fileio import save_safetensors_atomic

    save_safetensors_atomic(inputs, tmp / "inputs.safetensors")
    out, report = tmp / "out.safetensors", tmp / "report.json"
    cmd = [str(python), str(HERE / "comfy_check_wan.py"), "--comfyui", str(comfy), "--model", model,
           "--inputs", str(tmp / "inputs.safetensors"), "--out", str(out), "--report", str(report)]
    if vae:
        cmd += ["--vae", vae]
    for case, f in files.items():
        cmd += ["--lora", f"{case}={f}"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    proc = subprocess.run(cmd, cwd=str(comfy), env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"ComfyUI side failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(report.read_text()), load_file(str(out))


_RUNS: dict[str, dict] = {}  # one ComfyUI run per variant, shared by the fixtures below


@pytest.fixture(scope="module", params=["t2v", "i2v", "vace"])
def wan_run(request, tmp_path_factory):
    return _run_variant(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def i2v_run(tmp_path_factory):
    return _run_variant("i2v", tmp_path_factory)


@pytest.fixture(scope="module")
def vace_run(tmp_path_factory):
    return _run_variant("vace", tmp_path_factory)


def _run_variant(variant: str, tmp_path_factory) -> dict:
    if variant not in _RUNS:
        _RUNS[variant] = _build_and_compare(variant, tmp_path_factory)
    return _RUNS[variant]


def _build_and_compare(variant: str, tmp_path_factory) -> dict:
    comfy, python = comfy_install(f"ComfyUI Wan test ({variant})")
    from trainer.config import ModelConfig
    from trainer.data.dataset import fit_pixels
    from trainer.demo.wan import write_wan_files
    from trainer.fileio import save_safetensors_atomic
    from trainer.models.wan import I2V, T2V, VACE, load_wan
    from trainer.networks.network import Network

    i2v, vace = variant == "i2v", variant == "vace"
    tmp = tmp_path_factory.mktemp(f"comfy_wan_{variant}")
    torch.set_num_threads(1)
    cfg = write_wan_files(tmp / "models", i2v=i2v, vace=vace, name=variant)
    model = load_wan(ModelConfig(**cfg), torch.device("cpu"), torch.float32, I2V if i2v else VACE if vace else T2V)
    targets = model.targets()
    g = torch.Generator().manual_seed(11)
    context = torch.randn(1, 12, 4096, generator=g)
    if i2v:  # I2V reads 512 text tokens (ComfyUI's UMT5 gives 512; diffusers assumes it): zero padding, as UMT5's
        context = torch.nn.functional.pad(context, (0, 0, 0, 500))
    inputs = {"latents": torch.randn(1, 16, 3, 6, 4, generator=g), "context": context, "sigma": torch.tensor([0.6])}
    cond = {"context": inputs["context"]}
    if i2v:
        from PIL import Image

        start = Image.new("RGB", (32, 48), (30, 160, 90))
        start.paste((220, 30, 30), (4, 10, 20, 30))
        pixels = fit_pixels(start, (32, 48), False)
        ic = model.image_condition(pixels, 9)
        inputs.update(image_cond=ic["image_cond"][None], clip_fea=ic["clip_fea"][None],
                      start_image=((pixels + 1) / 2).permute(1, 2, 0)[None].contiguous())
        cond.update(image_cond=inputs["image_cond"], clip_fea=inputs["clip_fea"])
    if vace:  # a control video of a moving square, a mask that generates the right half of frames 3 onward
        import random

        from trainer.demo.videos import moving_shape_frames

        frames = moving_shape_frames((32, 48), 9, "yellow", "black", "square", random.Random(2))
        control = torch.stack([fit_pixels(f, (32, 48), False) for f in frames], dim=1)
        mask = torch.zeros(1, 9, 48, 32)
        mask[:, 3:, :, 16:] = 1.0
        from PIL import Image

        ref = Image.new("RGB", (32, 48), (200, 60, 220))
        ref.paste((20, 200, 240), (6, 8, 26, 30))
        reference = fit_pixels(ref, (32, 48), False)
        inputs.update(vace=model.vace_condition(control, mask, 9)["vace"][None],
                      vace_ref=model.vace_condition(control, mask, 9, reference)["vace"][None],
                      control_video=((control + 1) / 2).permute(1, 2, 3, 0).contiguous(), control_mask=mask[0],
                      reference_image=((reference + 1) / 2).permute(1, 2, 0)[None].contiguous())
        cond["vace"] = inputs["vace"]

    def predict() -> torch.Tensor:
        with torch.no_grad():
            return model.predict(inputs["latents"], inputs["sigma"], cond).float()

    ours, files, effect = {"base": predict()}, {}, {}
    for i, (case, (kwargs, _)) in enumerate(CASES.items()):
        net = Network(targets, rank=4, alpha=8.0, **kwargs)
        _randomize(net, targets, torch.Generator().manual_seed(3 + i))
        files[case] = tmp / f"{case}.safetensors"
        save_safetensors_atomic(net.export(), files[case])
        net.attach()
        try:
            ours[case] = predict()
        finally:
            net.detach()
        effect[case] = _rel_err(ours[case], ours["base"])
    report, theirs = _comfy_side(python, comfy, tmp, cfg["name_or_path"], files, inputs,
                                 cfg["vae_path"] if i2v or vace else None)
    return dict(i2v=i2v, vace=vace, model=model, report=report, theirs=theirs, ours=ours, effect=effect,
                targets=[t.key for t in targets], inputs=inputs)


def test_detected_as_its_variant_with_the_same_output(wan_run):
    r = wan_run["report"]
    want = "WAN21_I2V" if wan_run["i2v"] else "WAN21_Vace" if wan_run["vace"] else "WAN21_T2V"
    assert r["model_class"] == want and r["model_type"] == "FLOW"
    assert r["timesteps"] == pytest.approx([600.0]) and r["latent_format"] == "Wan21"
    err = _rel_err(wan_run["theirs"]["base"], wan_run["ours"]["base"])
    print(f"{r['model_class']}: base rel err {err:.2e}")
    assert err < TOL and _rel_err(wan_run["theirs"]["base_after"], wan_run["theirs"]["base"]) < 1e-6


@pytest.mark.parametrize("case", list(CASES))
def test_network_type_loads_fully_and_matches(wan_run, case):
    rep = wan_run["report"]["loras"][case]
    assert rep["not_loaded"] == [], "\n".join(rep["not_loaded"][:20])
    assert rep["patched_keys"] == sorted(f"{k}.weight" for k in wan_run["targets"])
    err = _rel_err(wan_run["theirs"][case], wan_run["ours"][case])
    print(f"{case}: rel err {err:.2e}, effect {wan_run['effect'][case]:.3f}")
    assert err < TOL and wan_run["effect"][case] > 100 * err


def test_i2v_condition_equals_comfyuis_node(i2v_run):
    """WanImageToVideo (start image, gray frames after it, the mask) and ComfyUI's CLIP preprocessing give what the
    trainer feeds: the 4 mask channels and the 16 image channels of `image_cond`, and CLIP's input pixels."""
    wan_run = i2v_run
    theirs, ours = wan_run["theirs"], wan_run["inputs"]["image_cond"][0]
    mask = theirs["node_mask"][0]
    assert torch.equal(mask.expand(4, *mask.shape[1:]), ours[:4])
    image_err = _rel_err(ours[4:], theirs["node_concat"][0])
    model = wan_run["model"]
    pix = model.clip_pixels(wan_run["inputs"]["start_image"][0].permute(2, 0, 1) * 2 - 1)
    clip_err = _rel_err(pix, theirs["clip_pixels"])
    print(f"I2V image latent rel err {image_err:.2e}, CLIP pixels rel err {clip_err:.2e}")
    assert image_err < TOL and clip_err < 1e-5


def test_vace_condition_equals_comfyuis_node(vace_run):
    """WanVaceToVideo (control video, mask: inactive and reactive latents, the 8x8-folded mask) gives what the trainer
    feeds VACE's blocks."""
    ours, theirs = vace_run["inputs"]["vace"][0], vace_run["theirs"]["node_vace"][0]
    assert ours.shape == theirs.shape == (96, 3, 6, 4)
    assert torch.equal(ours[32:], theirs[32:])
    err = _rel_err(ours[:32], theirs[:32])
    print(f"VACE latents rel err {err:.2e}")
    assert err < TOL


def test_vace_reference_image_equals_comfyuis_node(vace_run):
    """WanVaceToVideo with a reference image: its latent frame (beside zeros, the mask 0 there) comes first, and the
    node asks for one latent frame more, trimmed after sampling: the trainer builds the same."""
    ours, theirs = vace_run["inputs"]["vace_ref"][0], vace_run["theirs"]["node_vace_ref"][0]
    assert ours.shape == theirs.shape == (96, 4, 6, 4)
    assert vace_run["report"]["vace_ref_trim"] == 1 and vace_run["report"]["vace_ref_latent_frames"] == 4
    assert torch.equal(ours[32:], theirs[32:]) and not bool(ours[32:, 0].any())
    assert not bool(ours[16:32, 0].any())  # the zeros beside the reference latent
    err = _rel_err(ours[:32], theirs[:32])
    print(f"VACE reference latents rel err {err:.2e}")
    assert err < TOL
