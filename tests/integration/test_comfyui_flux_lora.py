"""A Flux LoRA written by the trainer loads in real ComfyUI, fully, and computes what the trainer computed.

Needs a ComfyUI install: set COMFYUI_PATH (its folder) and, unless `<COMFYUI_PATH>/../comfy-venv/bin/python`
exists, COMFYUI_PYTHON (a python that can import ComfyUI). Skipped otherwise.

The model is the smallest Flux ComfyUI detects (hidden 3072 = 24 heads of 128, one double and one single
block, ~0.5B parameters), in fp32 on CPU. The check runs in two steps so a failure says where it is:
  1. the base model (no LoRA): trainer (diffusers, loaded from the original single file) vs ComfyUI;
     a mismatch here is a layout / conversion bug, not a LoRA one;
  2. with the LoRA: every tensor is taken by ComfyUI ("lora key not loaded" never logged), one patch per
     trainer target, and ComfyUI's patched output equals the trainer's output with the LoRA attached.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
TOL = 1e-3  # max |a - b| / max |b|, fp32


def _comfy() -> tuple[Path, Path]:
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip("set COMFYUI_PATH to a ComfyUI install to run the ComfyUI LoRA round-trip test")
    comfy = Path(path).expanduser().resolve()
    if not (comfy / "comfy" / "sd.py").is_file():
        pytest.skip(f"COMFYUI_PATH={path} is not a ComfyUI folder (no comfy/sd.py)")
    py = os.environ.get("COMFYUI_PYTHON")
    if py:
        python = Path(py).expanduser()
        if not python.exists():
            pytest.skip(f"COMFYUI_PYTHON={py} does not exist")
    else:
        python = comfy.parent / "comfy-venv" / "bin" / "python"
        if not python.exists():
            pytest.skip(f"set COMFYUI_PYTHON to ComfyUI's python ({python} does not exist)")
    return comfy, python


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _make_checkpoint(path: Path, cfg: dict) -> None:
    """A random Flux in the original layout, written by the trainer's own writer. Its biases are zero and
    its norm scales one, which would hide a bias or scale mapped to the wrong place: give them random
    values too (in the file, so both sides read the same ones)."""
    from safetensors.torch import load_file

    from trainer.fileio import save_safetensors_atomic
    from trainer.models.tiny import make_flux_file

    make_flux_file(path, cfg, seed=4, dtype=torch.float32)
    sd = load_file(str(path))
    g = torch.Generator().manual_seed(5)
    for k in sorted(sd):
        t = sd[k]
        if t.dim() != 1:
            continue
        noise = torch.randn(t.shape, generator=g)
        sd[k] = (1.0 + 0.1 * noise) if k.endswith(".scale") else 0.02 * noise
    save_safetensors_atomic(sd, path)


def _flux_model(transformer):
    """A FluxModel over the transformer alone: targets() and predict() need nothing else."""
    from trainer.models.flux import FluxModel

    m = object.__new__(FluxModel)
    m.arch = "flux"
    m.denoiser = transformer
    m.device = torch.device("cpu")
    m.dtype = torch.float32
    m.guidance_embeds = bool(transformer.config.guidance_embeds)
    m.distilled_guidance = m.guidance_embeds
    m.bypass_guidance = False
    m._bypass_handle = None
    return m


def test_flux_lora_loads_in_comfyui_and_matches(tmp_path):
    comfy, python = _comfy()

    from trainer.fileio import save_safetensors_atomic
    from trainer.models.flux import load_flux_transformer
    from trainer.models.tiny import flux_diffusers_config
    from trainer.networks.network import Network

    t0 = time.monotonic()
    torch.manual_seed(0)
    cfg = flux_diffusers_config(hidden=3072, head_dim=128, double=1, single=1, context_dim=64, pooled_dim=64,
                                guidance=True)
    ckpt = tmp_path / "flux.safetensors"
    _make_checkpoint(ckpt, cfg)
    transformer = load_flux_transformer(ckpt, torch.float32, "flux").eval().requires_grad_(False)
    model = _flux_model(transformer)

    # the trainer's LoRA over every default target, with weights as if trained: random, non-zero, seeded,
    # large enough that the LoRA moves the output far beyond the tolerance
    targets = model.targets()
    net = Network(targets, "lora", rank=4, alpha=8.0)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for t in targets:
            ad = net.adapter(t.key)
            ad.lora_down.copy_(torch.randn(ad.lora_down.shape, generator=g) / t.in_features**0.5)
            ad.lora_up.copy_(torch.randn(ad.lora_up.shape, generator=g) * 0.05)
    lora_file = tmp_path / "lora.safetensors"
    exported = net.export()
    save_safetensors_atomic(exported, lora_file)

    # a fixed small input; ComfyUI's Flux gets sigma in [0, 1] and guidance as is (both sides scale by 1000)
    g = torch.Generator().manual_seed(7)
    inputs = {
        "latents": torch.randn(1, 16, 8, 8, generator=g),
        "t5": torch.randn(1, 8, 64, generator=g),
        "pooled": torch.randn(1, 64, generator=g),
        "sigma": torch.tensor([0.6]),
        "guidance": torch.tensor([3.5]),
    }
    cond = {"t5": inputs["t5"], "pooled": inputs["pooled"]}
    with torch.no_grad():
        ours_base = model.predict(inputs["latents"], inputs["sigma"], cond, guidance=3.5).float()
        net.attach()
        try:
            ours_lora = model.predict(inputs["latents"], inputs["sigma"], cond, guidance=3.5).float()
        finally:
            net.detach()
    inputs_file = tmp_path / "inputs.safetensors"
    save_safetensors_atomic({**inputs, "ours_base": ours_base, "ours_lora": ours_lora}, inputs_file)
    lora_effect = _rel_err(ours_lora, ours_base)
    assert lora_effect > 50 * TOL, f"test LoRA too weak to tell applied from not applied ({lora_effect:.2e})"
    del transformer, model, net
    t_ours = time.monotonic() - t0

    out_file, report_file = tmp_path / "comfy_out.safetensors", tmp_path / "comfy_report.json"
    cmd = [str(python), str(HERE / "comfy_check_lora.py"), "--comfyui", str(comfy), "--model", str(ckpt),
           "--lora", str(lora_file), "--inputs", str(inputs_file), "--out", str(out_file),
           "--report", str(report_file)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    proc = subprocess.run(cmd, cwd=str(comfy), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"ComfyUI side failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    t_comfy = time.monotonic() - t0 - t_ours

    from safetensors.torch import load_file

    report = json.loads(report_file.read_text())
    theirs = load_file(str(out_file))
    print(f"\nComfyUI {report['comfyui_version']}: {report['model_class']} ({report['weight_dtype']}); "
          f"trainer side {t_ours:.1f}s, ComfyUI side {t_comfy:.1f}s; LoRA effect {lora_effect:.3f}")

    assert report["model_class"] == "Flux", report

    # 1. base model: the layout conversion (original file -> diffusers) computes what ComfyUI computes
    base_err = _rel_err(theirs["base"], ours_base)
    print(f"base rel err {base_err:.2e}")
    assert base_err < TOL, f"base Flux differs between trainer and ComfyUI (rel err {base_err:.2e}): layout bug"

    # 2. the LoRA: every key taken, one patch per target, same output
    assert report["not_loaded"] == [], "ComfyUI did not load:\n" + "\n".join(report["not_loaded"][:20])
    assert report["lora_tensors"] == len(exported) == 3 * len(targets)
    expected = sorted(f"{t.key}.weight" for t in targets)
    assert report["patched_keys"] == expected, (
        f"patched {len(report['patched_keys'])} weights, expected {len(expected)}: "
        f"missing {sorted(set(expected) - set(report['patched_keys']))[:5]}, "
        f"extra {sorted(set(report['patched_keys']) - set(expected))[:5]}"
    )
    lora_err = _rel_err(theirs["lora"], ours_lora)
    print(f"LoRA rel err {lora_err:.2e} (vs ComfyUI base: {_rel_err(theirs['lora'], theirs['base']):.3f})")
    assert lora_err < TOL, f"ComfyUI's LoRA-patched Flux differs from the trainer's (rel err {lora_err:.2e})"
