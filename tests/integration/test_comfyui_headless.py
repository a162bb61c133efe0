"""`model.backend: comfyui` headless: `python -m trainer job.yaml` loads the job's files with ComfyUI's own loaders
(from model.comfyui_path) and trains through the same ComfyUI backend the nodes use, outside the UI.

A Flux file ComfyUI detects as Flux (comfy_fixtures.flux_files: CLIP-L through ComfyUI's CLIP loader, the 16-channel
VAE) trains 3 steps from a YAML run by ComfyUI's python; the saved LoRA carries the comfy backend in its metadata and
loads in ComfyUI (comfy_check_lora.py: ComfyUI's own loader) with no key left unloaded, one patched weight per trained
layer, and moves the model's output. A second job, the same but for a folder that is not a ComfyUI checkout, stops
with one message naming model.comfyui_path. Needs COMFYUI_PATH (see comfy_env.py); skipped without it. ~1 min on 2
cores with the fixtures cached.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import job_dict, make_images
from integration import comfy_fixtures
from integration.comfy_env import comfy_install, fixture_cache

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "COMFYUI_PATH")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _job(tmp_path: Path, comfyui: Path, files: dict, name: str = "headless", **model_keys) -> Path:
    data = make_images(tmp_path / "data", n=2, size=(64, 64))
    model = {"backend": "comfyui", "comfyui_path": str(comfyui), "name_or_path": files["unet"],
             "text_encoder_paths": [files["clip"]], "vae_path": files["vae"], "clip_type": "stable_diffusion",
             **model_keys}
    d = job_dict(model, data, tmp_path / "runs", name=name, steps=3, lr=2e-3)
    proc = d["config"]["process"][0]
    proc["datasets"][0]["resolution"] = [64]
    proc["save"] = {"dtype": "fp32", "save_every": 1000}
    proc["sample"]["sample_every"] = 1000
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d), encoding="utf-8")
    return path


def test_yaml_job_trains_on_comfyui_loaders(tmp_path: Path) -> None:
    comfy, python = comfy_install("headless comfyui-backend test")
    files = comfy_fixtures.flux_files(fixture_cache())
    job = _job(tmp_path, comfy, files)
    proc = subprocess.run([str(python), "-m", "trainer", str(job)], cwd=str(REPO), env=_env(), capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, f"python -m trainer failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    saved = sorted((tmp_path / "runs" / "headless").glob("headless*.safetensors"))
    assert saved, sorted(p.name for p in (tmp_path / "runs" / "headless").iterdir())
    lora = saved[-1]
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()
    assert meta["eridiffusion.backend"] == "comfy" and meta["eridiffusion.arch"] == "flux", meta
    n_layers = len(load_file(str(lora))) // 3  # down, up, alpha per layer

    # ComfyUI's own loader: every key loads, one weight patched per layer, and the LoRA moves the output
    g = torch.Generator().manual_seed(0)
    inputs = {"latents": torch.randn(1, 16, 8, 8, generator=g), "t5": torch.randn(1, 4, comfy_fixtures.FLUX_CTX, generator=g),
              "pooled": torch.randn(1, comfy_fixtures.FLUX_CTX, generator=g), "sigma": torch.tensor([0.6]),
              "guidance": torch.tensor([3.5])}
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    cmd = [str(python), str(HERE / "comfy_check_lora.py"), "--comfyui", str(comfy), "--model", files["unet"],
           "--lora", f"lora={lora}", "--inputs", str(tmp_path / "inputs.safetensors"),
           "--out", str(tmp_path / "out.safetensors"), "--report", str(tmp_path / "report.json")]
    check = subprocess.run(cmd, cwd=str(comfy), env=_env(), capture_output=True, text=True, timeout=600)
    assert check.returncode == 0, f"comfy_check_lora.py failed:\n{check.stderr[-6000:]}"
    report = json.loads((tmp_path / "report.json").read_text())["loras"]["lora"]
    assert not report["not_loaded"], report["not_loaded"][:20]
    assert n_layers > 0 and len(report["patched_keys"]) == n_layers, (n_layers, len(report["patched_keys"]))
    out = load_file(str(tmp_path / "out.safetensors"))
    effect = ((out["lora"] - out["base"]).abs().max() / out["base"].abs().max()).item()
    print(f"headless comfyui backend: {n_layers} layers trained, LoRA effect {effect:.1e}")
    assert effect > 1e-3, effect
    assert torch.equal(out["base_after"], out["base"])  # the comparison is against the unpatched model

    # the same job with a training adapter (model.assistant_lora_path): merged for training by ComfyUI's loader, so
    # the LoRA trained over it differs, but never saved into it (the same keys, none of the adapter's own)
    adapter = _adapter(tmp_path / "adapter.safetensors", {"diffusion_model.img_in": (64, 3072),
                                                          "diffusion_model.double_blocks.0.img_attn.qkv": (3072, 9216)})
    job = _job(tmp_path, comfy, files, name="assisted", assistant_lora_path=str(adapter))
    proc = subprocess.run([str(python), "-m", "trainer", str(job)], cwd=str(REPO), env=_env(), capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, f"python -m trainer failed:\n{proc.stderr[-6000:]}"
    plain, assisted = load_file(str(lora)), load_file(str(tmp_path / "runs" / "assisted" / "assisted.safetensors"))
    assert sorted(assisted) == sorted(plain), sorted(set(assisted) ^ set(plain))[:10]
    moved = max(((assisted[k] - plain[k]).abs().max() / plain[k].abs().max().clamp_min(1e-12)).item()
                for k in plain if "lora_up" in k)
    print(f"training adapter: the LoRA trained over it differs by {moved:.1e} (relative, max over the up weights)")
    assert moved > 1e-2, moved


def _adapter(path: Path, layers: dict[str, tuple[int, int]], rank: int = 4) -> Path:
    """A random LoRA in ComfyUI's keys over `layers` (key -> (in, out))."""
    g = torch.Generator().manual_seed(11)
    sd = {}
    for key, (fan_in, fan_out) in layers.items():
        sd[f"{key}.lora_down.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in ** 0.5
        sd[f"{key}.lora_up.weight"] = torch.randn(fan_out, rank, generator=g) * 0.05
        sd[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(sd, str(path))
    return path


def test_yaml_job_names_a_path_that_is_not_comfyui(tmp_path: Path) -> None:
    comfy, python = comfy_install("headless comfyui-backend test")
    files = comfy_fixtures.flux_files(fixture_cache())
    not_comfy = tmp_path / "not_comfy"
    not_comfy.mkdir()
    job = _job(tmp_path, not_comfy, files)
    proc = subprocess.run([str(python), "-m", "trainer", str(job)], cwd=str(REPO), env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode != 0
    assert "model.comfyui_path" in proc.stderr and "is not a ComfyUI checkout" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]

    # a training adapter for another model (SDXL's keys): one message naming the key, no run started
    other = _adapter(tmp_path / "sdxl_adapter.safetensors", {"lora_unet_input_blocks_4_1_proj_in": (640, 640)})
    job = _job(tmp_path, comfy, files, name="wrong_adapter", assistant_lora_path=str(other))
    proc = subprocess.run([str(python), "-m", "trainer", str(job)], cwd=str(REPO), env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode != 0
    assert "model.assistant_lora_path" in proc.stderr and "cannot place" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not list((tmp_path / "runs" / "wrong_adapter").glob("*.safetensors"))
