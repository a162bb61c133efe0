"""Chroma network files written by the trainer (LoRA, LoHa, LoKr low and full rank, DoRA) load in real ComfyUI,
fully, and compute what the trainer computed; ComfyUI also loads the trainer's Chroma checkpoint layout.

Needs a ComfyUI install (COMFYUI_PATH, and COMFYUI_PYTHON unless `<COMFYUI_PATH>/../comfy-venv/bin/python`
exists); skipped otherwise. Same harness as test_comfyui_flux_lora.py (comfy_check_lora.py runs inside ComfyUI's
python: one model load, each file applied to a clone in turn).

The model is the smallest Chroma ComfyUI runs: ComfyUI fixes the width (3072 = 24 heads of 128) and the
approximator (5 layers of 5120); one double and one single block (~0.6B parameters), fp32 on CPU. Its depth
differs from Chroma's (19 / 38), which exercises the final layer's modulation index (342, 343 in ComfyUI and the
original; the trainer matches it, see chroma_layout.match_original_modulation_index).

Text: ComfyUI gets the kept tokens only (no mask); the trainer gets them padded with junk tokens and Chroma's
mask, so the check also covers the masking (masked tokens must change nothing).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from integration.test_comfyui_flux_lora import CASES, HERE, TOL, ComfyRun, _comfy, _randomize, _rel_err


def _make_checkpoint(path: Path, cfg: dict) -> None:
    """A random Chroma in the original layout, biases and norm scales random too (so a misplaced one shows)."""
    from trainer.fileio import save_safetensors_atomic
    from trainer.demo.chroma import chroma_original_state_dict

    sd = chroma_original_state_dict(cfg, 4, torch.float32)
    g = torch.Generator().manual_seed(5)
    for k in sorted(sd):
        t = sd[k]
        if t.dim() != 1:
            continue
        noise = torch.randn(t.shape, generator=g)
        sd[k] = (1.0 + 0.1 * noise) if k.endswith(".scale") else 0.02 * noise
    save_safetensors_atomic(sd, path)


@pytest.fixture(scope="module")
def comfy_run(tmp_path_factory) -> ComfyRun:
    comfy, python = _comfy()

    from safetensors.torch import load_file

    from trainer.fileio import save_safetensors_atomic
    from trainer.models.chroma import ChromaModel, load_chroma_transformer
    from trainer.demo.chroma import chroma_diffusers_config
    from trainer.networks.network import Network

    tmp_path = tmp_path_factory.mktemp("comfy_chroma")
    t0 = time.monotonic()
    torch.manual_seed(0)
    cfg = chroma_diffusers_config(hidden=3072, head_dim=128, double=1, single=1, context_dim=64,
                                  approximator_hidden=5120, approximator_layers=5)
    ckpt = tmp_path / "chroma.safetensors"
    _make_checkpoint(ckpt, cfg)
    transformer = load_chroma_transformer(ckpt, torch.float32).eval().requires_grad_(False)
    model = ChromaModel(transformer, None, None, None, 12, torch.device("cpu"), torch.float32)
    targets = model.targets()

    g = torch.Generator().manual_seed(7)
    kept, padded = 5, 12
    t5 = torch.randn(1, padded, 64, generator=g)
    inputs = {
        "latents": torch.randn(1, 16, 8, 8, generator=g),
        "t5": t5[:, :kept].contiguous(),
        "pooled": torch.zeros(1, 1),  # Chroma has no pooled input; ComfyUI ignores it
        "sigma": torch.tensor([0.6]),
        "guidance": torch.tensor([0.0]),  # what ComfyUI's Chroma passes by default
    }
    cond = {"t5": t5, "t5_mask": torch.arange(padded)[None] < kept}

    def predict() -> torch.Tensor:
        with torch.no_grad():
            return model.predict(inputs["latents"], inputs["sigma"], cond).float()

    ours = {"base": predict()}
    exported, effect, files = {}, {}, {}
    for i, (case, (kwargs, _)) in enumerate(CASES.items()):
        net = Network(targets, rank=4, alpha=8.0, **kwargs)
        _randomize(net, targets, torch.Generator().manual_seed(6 + i))
        tensors = net.export()
        files[case] = tmp_path / f"{case}.safetensors"
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
        del net, tensors
    inputs_file = tmp_path / "inputs.safetensors"
    save_safetensors_atomic(inputs, inputs_file)
    target_keys = [t.key for t in targets]
    del transformer, model, targets
    t_ours = time.monotonic() - t0

    out_file, report_file = tmp_path / "comfy_out.safetensors", tmp_path / "comfy_report.json"
    cmd = [str(python), str(HERE / "comfy_check_lora.py"), "--comfyui", str(comfy), "--model", str(ckpt),
           "--inputs", str(inputs_file), "--out", str(out_file), "--report", str(report_file)]
    for case, f in files.items():
        cmd += ["--lora", f"{case}={f}"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    env.setdefault("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296")
    proc = subprocess.run(cmd, cwd=str(comfy), env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"ComfyUI side failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    t_comfy = time.monotonic() - t0 - t_ours

    report = json.loads(report_file.read_text())
    print(f"\nComfyUI {report['comfyui_version']}: {report['model_class']} ({report['weight_dtype']}); "
          f"trainer side {t_ours:.1f}s, ComfyUI side {t_comfy:.1f}s")
    return ComfyRun(report=report, theirs=load_file(str(out_file)), ours=ours, exported=exported,
                    effect=effect, targets=target_keys)


def test_base(comfy_run):
    """ComfyUI detects and loads the checkpoint as Chroma, and the trainer's model (diffusers, from the original
    single file, masked padded text) computes what ComfyUI computes on the kept text."""
    r = comfy_run
    assert r.report["model_class"] == "Chroma", r.report
    base_err = _rel_err(r.theirs["base"], r.ours["base"])
    print(f"base rel err {base_err:.2e}")
    assert base_err < TOL, f"base Chroma differs between trainer and ComfyUI (rel err {base_err:.2e})"
    restored = _rel_err(r.theirs["base_after"], r.theirs["base"])
    assert restored < 1e-6, f"ComfyUI's model not restored after the networks (rel change {restored:.2e})"


@pytest.mark.parametrize("case", list(CASES))
def test_network_type(comfy_run, case):
    """Every tensor taken ("lora key not loaded" never logged), one patch per target, same output."""
    r = comfy_run
    _, suffixes = CASES[case]
    n = len(r.targets)
    assert n == 10  # 8 linears of the double block, linear1 and linear2 of the single block
    assert r.exported[case] == {s: n for s in suffixes}, f"{case}: unexpected file layout {r.exported[case]}"
    effect = r.effect[case]
    assert effect > 50 * TOL, f"{case}: test network too weak to tell applied from not applied ({effect:.2e})"
    rep = r.report["loras"][case]
    assert rep["not_loaded"] == [], f"{case}: ComfyUI did not load:\n" + "\n".join(rep["not_loaded"][:20])
    assert rep["lora_tensors"] == len(suffixes) * n
    assert rep["patched_keys"] == sorted(f"{k}.weight" for k in r.targets)
    err = _rel_err(r.theirs[case], r.ours[case])
    print(f"{case}: rel err {err:.2e}, effect {effect:.3f}")
    assert err < TOL, f"ComfyUI's {case}-patched Chroma differs from the trainer's (rel err {err:.2e})"
