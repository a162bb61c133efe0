"""LTX-Video against real ComfyUI: the trainer's Lightricks-style checkpoint (the model and the VAE in one file, their
configs in its metadata; 0.9.5-style causal positions) is detected as LTXV by Load Checkpoint and run by ComfyUI
with the trainer's outputs, for text-to-video and for an image-to-video input (per-token timesteps from the noise
mask); every network type loads with zero unloaded keys and computes what the trainer computed; ComfyUI's
LTXVScheduler, LTXVImgToVideo and its VAE (encode, decoder) give what the trainer gives.

One ComfyUI process (comfy_check_ltxv.py) loads the checkpoint with comfy.sd.load_checkpoint_guess_config and runs
BaseModel.apply_model, so ComfyUI's model_sampling and process_timestep are part of what is compared. Needs
COMFYUI_PATH (comfy_env.py); skipped otherwise.
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
T5_DIM = 64


@pytest.fixture(scope="module")
def ltxv_run(tmp_path_factory) -> dict:
    comfy, python = comfy_install("ComfyUI LTX-Video test")
    from trainer.config import ModelConfig
    from trainer.demo.ltxv import TINY_VAE, write_ltxv_files
    from trainer.fileio import save_safetensors_atomic
    from trainer.models.ltxv import load_ltxv, ltxv_sigmas
    from trainer.networks.network import Network

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("comfy_ltxv")
    # the VAE config names no padding (neither do ComfyUI's guessed ones): ComfyUI's decoder then pads by reflection
    vae_config = {k: v for k, v in TINY_VAE.items() if k != "spatial_padding_mode"}
    cfg = write_ltxv_files(tmp / "models", inner=64, heads=2, layers=2, t5_dim=T5_DIM, causal=True,
                           vae_config=vae_config)
    model = load_ltxv(ModelConfig(**cfg), torch.device("cpu"), torch.float32)
    targets = model.targets()
    g = torch.Generator().manual_seed(11)
    mask = torch.zeros(1, 16, dtype=torch.long)
    mask[:, :9] = 1  # a prompt of 9 tokens padded to 16: the mask matters
    inputs = {"latents": torch.randn(1, 128, 3, 2, 3, generator=g), "context": torch.randn(1, 16, T5_DIM, generator=g),
              "attention_mask": mask, "sigma": torch.tensor([0.6])}
    start = torch.rand(1, 64, 96, 3, generator=g)
    start[:, 20:40, 30:60] = torch.tensor([0.9, 0.1, 0.1])
    first = model.encode_conditions(torch.zeros(3, 17, 64, 96), start[0].permute(2, 0, 1) * 2 - 1)
    i2v = inputs["latents"].clone()
    i2v[:, :, :1] = first["first_frame"]
    denoise_mask = torch.ones(1, 1, 3, 1, 1)
    denoise_mask[:, :, 0] = 0.0  # LTXVImgToVideo's noise mask at strength 1
    clip = torch.rand(9, 64, 96, 3, generator=g)
    inputs.update(i2v_latents=i2v, denoise_mask=denoise_mask, start_image=start.contiguous(), clip=clip,
                  decode_latents=torch.randn(1, 128, 2, 2, 3, generator=g))
    cond = {"context": inputs["context"], "attention_mask": mask.float()}

    def predict(latents, extra=None) -> torch.Tensor:
        with torch.no_grad():
            return model.predict(latents, inputs["sigma"], {**cond, **(extra or {})}).float()

    ours = {"base": predict(inputs["latents"]),
            "i2v": predict(i2v, {k: v[None] for k, v in first.items()}),
            "sigmas": ltxv_sigmas(6, 3 * 2 * 3), "first_frame": first["first_frame"],
            "encoded": model.encode_pixels(clip.permute(3, 0, 1, 2)[None] * 2 - 1)}
    with torch.no_grad():
        lat = inputs["decode_latents"]
        mean, std = model.vae.latents_mean.view(1, -1, 1, 1, 1), model.vae.latents_std.view(1, -1, 1, 1, 1)
        ours["decoded"] = model.vae.decode(lat * std + mean, temb=torch.tensor([0.05]), return_dict=False)[0]
    ours["decoder_padding"] = model.vae.decoder.conv_in.conv.padding_mode
    files, effect = {}, {}
    for i, (case, (kwargs, _)) in enumerate(CASES.items()):
        net = Network(targets, rank=4, alpha=8.0, **kwargs)
        _randomize(net, targets, torch.Generator().manual_seed(3 + i))
        files[case] = tmp / f"{case}.safetensors"
        save_safetensors_atomic(net.export(), files[case])
        net.attach()
        try:
            ours[case] = predict(inputs["latents"])
        finally:
            net.detach()
        effect[case] = _rel_err(ours[case], ours["base"])

    save_safetensors_atomic(inputs, tmp / "inputs.safetensors")
    out, report = tmp / "out.safetensors", tmp / "report.json"
    cmd = [str(python), str(HERE / "comfy_check_ltxv.py"), "--comfyui", str(comfy), "--ckpt", cfg["name_or_path"],
           "--inputs", str(tmp / "inputs.safetensors"), "--out", str(out), "--report", str(report)]
    for case, f in files.items():
        cmd += ["--lora", f"{case}={f}"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    proc = subprocess.run(cmd, cwd=str(comfy), env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"ComfyUI side failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    from safetensors.torch import load_file

    return dict(report=json.loads(report.read_text()), theirs=load_file(str(out)), ours=ours, effect=effect,
                targets=[t.key for t in targets])


def test_detected_as_ltxv_with_the_same_output(ltxv_run):
    r = ltxv_run["report"]
    assert r["model_class"] == "LTXV" and r["model_type"] == "FLUX" and r["latent_format"] == "LTXV"
    assert r["causal"] and r["heads"] == 2 and r["vae_class"] == "VideoVAE" and r["vae_timestep"]
    assert r["timesteps"] == pytest.approx([0.6]) and r["load_warnings"] == []
    err = _rel_err(ltxv_run["theirs"]["base"], ltxv_run["ours"]["base"])
    print(f"LTXV base rel err {err:.2e}")
    assert err < TOL and _rel_err(ltxv_run["theirs"]["base_after"], ltxv_run["theirs"]["base"]) < 1e-6


def test_image_to_video_input_gives_the_same_output(ltxv_run):
    """The start frame given, its tokens at timestep 0: ComfyUI's process_timestep from the noise mask."""
    err = _rel_err(ltxv_run["theirs"]["i2v"], ltxv_run["ours"]["i2v"])
    moved = _rel_err(ltxv_run["ours"]["i2v"][:, :, 1:], ltxv_run["ours"]["base"][:, :, 1:])
    print(f"LTXV I2V rel err {err:.2e} (the start frame moves the rest by {moved:.2e})")
    assert err < TOL and moved > 100 * err


@pytest.mark.parametrize("case", list(CASES))
def test_network_type_loads_fully_and_matches(ltxv_run, case):
    rep = ltxv_run["report"]["loras"][case]
    assert rep["not_loaded"] == [], "\n".join(rep["not_loaded"][:20])
    assert rep["patched_keys"] == sorted(f"{k}.weight" for k in ltxv_run["targets"])
    err = _rel_err(ltxv_run["theirs"][case], ltxv_run["ours"][case])
    print(f"{case}: rel err {err:.2e}, effect {ltxv_run['effect'][case]:.3f}")
    assert err < TOL and ltxv_run["effect"][case] > 100 * err


def test_scheduler_and_i2v_condition_equal_comfyuis_nodes(ltxv_run):
    """LTXVScheduler's sigmas; LTXVImgToVideo's latent (the start image's latent as frame 0, zeros after) and its
    noise mask (0 on the start frame: what the trainer's `first_frame_given` marks)."""
    theirs, ours = ltxv_run["theirs"], ltxv_run["ours"]
    torch.testing.assert_close(theirs["sigmas"], ours["sigmas"], rtol=0, atol=1e-6)
    assert theirs["node_samples"].shape == (1, 128, 3, 2, 3)
    err = _rel_err(ours["first_frame"], theirs["node_samples"][:, :, :1])
    assert err < TOL and not theirs["node_samples"][:, :, 1:].any()
    assert torch.equal(theirs["node_noise_mask"].flatten(), torch.tensor([0.0, 1.0, 1.0]))


def test_vae_encodes_and_decodes_as_comfyuis(ltxv_run):
    """Encode (zero padding) and the timestep-conditioned decoder (reflection padding: ComfyUI's default)."""
    theirs, ours = ltxv_run["theirs"], ltxv_run["ours"]
    enc = _rel_err(ours["encoded"], theirs["encoded"])
    dec = _rel_err(ours["decoded"], theirs["decoded"])
    print(f"VAE encode rel err {enc:.2e}, decode rel err {dec:.2e}")
    assert ours["encoded"].shape == theirs["encoded"].shape == (1, 128, 2, 2, 3) and ours["decoder_padding"] == "reflect"
    assert enc < TOL and dec < TOL


DETECT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from comfy.cli_args import args
args.cpu = True
import comfy.model_detection as md
import comfy.utils
sd, metadata = comfy.utils.load_torch_file(sys.argv[2], return_metadata=True)
prefix = md.unet_prefix_from_state_dict(sd)
cfg = md.model_config_from_unet(sd, prefix, metadata=metadata)
print(json.dumps({"class": type(cfg).__name__, "prefix": prefix, "heads": cfg.unet_config.get("num_attention_heads"),
                  "causal": cfg.unet_config.get("causal_temporal_positioning")}))
"""


def test_demo_checkpoint_is_detected_as_ltxv(tmp_path):
    """`python -m trainer demo --arch ltxv`'s checkpoint, as Load Checkpoint detects it (its metadata merged)."""
    comfy, python = comfy_install("LTX-Video demo detection test")
    from trainer.demo import DEMO_WRITERS

    model = DEMO_WRITERS["ltxv"](tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    proc = subprocess.run([str(python), "-c", DETECT, str(comfy), model["name_or_path"]], cwd=str(comfy), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found == {"class": "LTXV", "prefix": "model.diffusion_model.", "heads": 2, "causal": True}
