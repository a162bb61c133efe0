"""SD3 against real ComfyUI: the trainer's original-layout SD 3.5 file is detected and run by ComfyUI as SD3, and
network files the trainer writes (LoRA, LoHa, LoKr low and full rank, DoRA) load fully and compute what the
trainer computed.

Needs a ComfyUI install (COMFYUI_PATH, and COMFYUI_PYTHON unless `<COMFYUI_PATH>/../comfy-venv/bin/python` exists);
skipped otherwise. One ComfyUI process (comfy_check_sd3.py) loads the model once with comfy.sd.load_diffusion_model
and applies each file in turn through comfy.sd.load_lora_for_models, running BaseModel.apply_model, so ComfyUI's
own model_sampling (shift, sigma -> timestep) is part of what is compared.

The model is the smallest SD 3.5 ComfyUI detects as SD3: ComfyUI reads the depth (= blocks = heads of 64) from the
width, so 2 blocks of width 128; 16 latent channels, qk-norm (3.5), dual attention in block 0 (Medium's
`x_block.attn2`), and block 1's pre-only context stream (qkv and a 2-vector modulation only). Random biases, norm
scales and position table, so a misplaced one shows; a non-square latent, so a wrong position crop shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from integration.comfy_env import comfy_install
from integration.test_comfyui_flux_lora import CASES, TOL, ComfyRun, _randomize, _rel_err

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def comfy_run(tmp_path_factory) -> ComfyRun:
    comfy, python = comfy_install("ComfyUI SD3 test")

    from safetensors.torch import load_file

    from trainer.fileio import save_safetensors_atomic
    from trainer.models.sd3 import SD3Model, load_sd3_transformer
    from trainer.demo.sd3 import comfyui_sized_config, sd3_original_state_dict
    from trainer.networks.network import Network

    tmp = tmp_path_factory.mktemp("comfy_sd3")
    t0 = time.monotonic()
    torch.set_num_threads(1)
    cfg = comfyui_sized_config()
    ckpt = tmp / "sd3.safetensors"
    save_safetensors_atomic(sd3_original_state_dict(cfg, 31, torch.float32), ckpt)  # bare, prefix-less
    transformer = load_sd3_transformer(ckpt, torch.float32).eval().requires_grad_(False)
    model = SD3Model(transformer, None, None, None, None, None, None, None, 16, torch.device("cpu"), torch.float32)
    targets = model.targets()

    g = torch.Generator().manual_seed(7)
    inputs = {"latents": torch.randn(1, 16, 8, 12, generator=g), "context": torch.randn(1, 20, 64, generator=g),
              "pooled": torch.randn(1, 64, generator=g), "sigma": torch.tensor([0.6])}
    cond = {"context": inputs["context"], "pooled": inputs["pooled"]}

    def predict() -> torch.Tensor:
        with torch.no_grad():
            return model.predict(inputs["latents"], inputs["sigma"], cond).float()

    ours = {"base": predict()}
    exported, effect, files = {}, {}, {}
    for i, (case, (kwargs, _)) in enumerate(CASES.items()):
        net = Network(targets, rank=4, alpha=8.0, **kwargs)
        _randomize(net, targets, torch.Generator().manual_seed(6 + i))
        tensors = net.export()
        files[case] = tmp / f"{case}.safetensors"
        save_safetensors_atomic(tensors, files[case])
        suffixes: dict[str, int] = {}
        for k in tensors:
            key = next(t.key for t in targets if k.startswith(t.key + "."))
            suffixes[k[len(key) + 1:]] = suffixes.get(k[len(key) + 1:], 0) + 1
        exported[case] = suffixes
        net.attach()
        try:
            ours[case] = predict()
        finally:
            net.detach()
        effect[case] = _rel_err(ours[case], ours["base"])
    save_safetensors_atomic(inputs, tmp / "inputs.safetensors")
    target_keys = [t.key for t in targets]
    t_ours = time.monotonic() - t0

    out, report = tmp / "out.safetensors", tmp / "report.json"
    cmd = [str(python), str(HERE / "comfy_check_sd3.py"), "--comfyui", str(comfy), "--model", str(ckpt),
           "--inputs", str(tmp / "inputs.safetensors"), "--out", str(out), "--report", str(report)]
    for case, f in files.items():
        cmd += ["--lora", f"{case}={f}"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(cmd, cwd=str(comfy), env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"ComfyUI side failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    rep = json.loads(report.read_text())
    print(f"\nComfyUI {rep['comfyui_version']}: {rep['model_class']}; trainer side {t_ours:.1f}s, "
          f"ComfyUI side {time.monotonic() - t0 - t_ours:.1f}s")
    return ComfyRun(report=rep, theirs=load_file(str(out)), ours=ours, exported=exported, effect=effect,
                    targets=target_keys)


def test_detected_as_sd3_with_its_sampling(comfy_run):
    """ComfyUI detects the file as SD3 (flow, shift 3, timestep = 1000 sigma, SD3 latent format) with the config the
    trainer derived, and its output equals the trainer's (a layout, crop or timestep bug shows here)."""
    from trainer.models.sd3 import SD3_VAE_SCALE, SD3_VAE_SHIFT, SHIFT

    r = comfy_run.report
    assert (r["model_class"], r["model_type"]) == ("SD3", "FLOW")
    assert {"ModelSamplingDiscreteFlow", "CONST"} <= set(r["sampling_bases"]), r["sampling_bases"]
    assert r["shift"] == SHIFT and r["timesteps"] == pytest.approx([600.0])
    assert (r["latent_scale"], r["latent_shift"]) == (SD3_VAE_SCALE, SD3_VAE_SHIFT)
    uc = r["unet_config"]
    assert (uc["depth"], uc["qk_norm"], uc["x_block_self_attn_layers"], uc["pos_embed_max_size"]) == (2, "rms", [0], 32)
    err = _rel_err(comfy_run.theirs["base"], comfy_run.ours["base"])
    print(f"base rel err {err:.2e}")
    assert err < TOL
    assert _rel_err(comfy_run.theirs["base_after"], comfy_run.theirs["base"]) < 1e-6


@pytest.mark.parametrize("case", list(CASES))
def test_network_type(comfy_run, case):
    """Every tensor taken (no "lora key not loaded"), one patch per target, the same output as the trainer's."""
    r = comfy_run
    _, suffixes = CASES[case]
    n = len(r.targets)
    assert n == 10 + 7 + 2  # block 0: x and context streams + attn2; block 1: x stream, context qkv + modulation
    assert r.exported[case] == {s: n for s in suffixes}, f"{case}: unexpected file layout {r.exported[case]}"
    assert r.effect[case] > 50 * TOL, f"{case}: network too weak to tell applied from not ({r.effect[case]:.2e})"
    rep = r.report["loras"][case]
    assert rep["not_loaded"] == [], f"{case}: ComfyUI did not load:\n" + "\n".join(rep["not_loaded"][:20])
    assert rep["lora_tensors"] == len(suffixes) * n
    assert rep["patched_keys"] == sorted(f"{k}.weight" for k in r.targets)
    err = _rel_err(r.theirs[case], r.ours[case])
    print(f"{case}: rel err {err:.2e}, effect {r.effect[case]:.3f}")
    assert err < TOL, f"ComfyUI's {case}-patched SD3 differs from the trainer's (rel err {err:.2e})"
