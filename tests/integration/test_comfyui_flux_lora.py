"""Flux network files written by the trainer (LoRA, LoHa, LoKr low and full rank, DoRA) load in real ComfyUI,
fully, and compute what the trainer computed.

Needs a ComfyUI install: set COMFYUI_PATH (its folder) and, unless `<COMFYUI_PATH>/../comfy-venv/bin/python`
exists, COMFYUI_PYTHON (a python that can import ComfyUI). Skipped otherwise.

The model is the smallest Flux ComfyUI detects (hidden 3072 = 24 heads of 128, one double and one single
block, ~0.5B parameters), in fp32 on CPU. ComfyUI starts and loads it once (that dominates the time): a
module-scoped fixture writes one file per network type plus the trainer's outputs, and one ComfyUI process
applies each file in turn to a clone of the loaded model. The checks are split so a failure says where:
  1. test_base: the base model (no network): trainer (diffusers, loaded from the original single file) vs
     ComfyUI; a mismatch here is a layout / conversion bug, not a network one;
  2. test_network_type[type]: every tensor of that type's file is taken by ComfyUI ("lora key not loaded"
     never logged), one patch per trainer target, and ComfyUI's patched output equals the trainer's output
     with the network attached.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from integration.comfy_env import comfy_install
import torch

HERE = Path(__file__).resolve().parent
TOL = 1e-3  # max |a - b| / max |b|, fp32

# network type -> Network(...) arguments and the tensor suffixes ComfyUI must find under every target key.
# LoKr low rank: factor 16 splits 3072 into 16 x 192 (and 18432 into 16 x 1152), so w2 = w2_a @ w2_b really
# is decomposed at rank 4; full rank: the most balanced split, w2 stored whole, no alpha (scale 1).
CASES = {
    "lora": (dict(type_name="lora"), {"lora_down.weight", "lora_up.weight", "alpha"}),
    "loha": (dict(type_name="loha"), {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}),
    "lokr": (dict(type_name="lokr", factor=16), {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}),
    "lokr_full": (dict(type_name="lokr", full_rank=True), {"lokr_w1", "lokr_w2"}),
    "dora": (dict(type_name="dora"), {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}),
}
# the parameter each type's update dW is linear in, and the rms of dW when every parameter is N(0, 1):
# a product of two N(0, 1) factors summed over rank r has variance r (LoHa: a Hadamard product of two such)
LINEAR_PARAM = {"lora": "lora_up", "locon": "lora_up", "dora": "lora_up", "loha": "hada_w1_a", "lokr": "lokr_w1"}


def _unit_delta_rms(ad) -> float:
    from trainer.networks.loha import LoHaAdapter
    from trainer.networks.lokr import LoKrAdapter
    from trainer.networks.lora import LoRAAdapter  # DoRAAdapter is one

    if isinstance(ad, LoRAAdapter):
        return ad.alpha / ad.rank * ad.rank**0.5
    if isinstance(ad, LoHaAdapter):
        return ad.alpha / ad.rank * ad.rank
    if isinstance(ad, LoKrAdapter):
        return ad.scale * (1.0 if ad.full else ad.rank**0.5)
    raise AssertionError(f"no rms rule for {type(ad).__name__}")


def _comfy() -> tuple[Path, Path]:
    return comfy_install("ComfyUI LoRA round-trip test")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _make_checkpoint(path: Path, cfg: dict) -> None:
    """A random Flux in the original layout (what trainer.models.tiny.make_flux_file writes, built here in
    memory so the 2 GB file is written once), saved by the trainer's own writer. make_flux_file's biases
    are zero and its norm scales one, which would hide a bias or scale mapped to the wrong place: give them
    random values too (in the file, so both sides read the same ones)."""
    from diffusers import FluxTransformer2DModel

    from trainer.fileio import save_safetensors_atomic
    from trainer.models.flux_layout import diffusers_to_original
    from trainer.demo.tiny import random_weights as random_state_dict

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in FluxTransformer2DModel(**cfg).state_dict().items()}
    sd = diffusers_to_original(random_state_dict(shapes, 4, torch.float32), cfg)
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

    return FluxModel(transformer, None, None, None, None, None, 8, torch.device("cpu"), torch.float32)


def _randomize(net, targets, g: torch.Generator) -> None:
    """Weights as if trained: random, non-zero, seeded. Each adapter's update dW gets an rms of about
    0.2 / sqrt(in) (a fifth of the base weight's, 1 / sqrt(in)), so every type moves the output far beyond the tolerance
    (asserted); a DoRA magnitude is also moved off ||W|| by ~10% per channel, to exercise that path. The
    rms comes from the parameters' distribution: materializing every dW here would double the runtime."""
    with torch.no_grad():
        for t in targets:
            ad = net.adapter(t.key)
            for name, p in ad.named_parameters():
                if name != "dora_scale":
                    p.copy_(torch.randn(p.shape, generator=g))
            getattr(ad, LINEAR_PARAM[net.type_name]).mul_(0.2 / t.in_features**0.5 / _unit_delta_rms(ad))
            if net.type_name == "dora":
                ad.dora_scale.mul_(1.0 + 0.1 * torch.randn(ad.dora_scale.shape, generator=g))


@dataclass
class ComfyRun:
    report: dict  # what comfy_check_lora.py reported
    theirs: dict  # ComfyUI's outputs: base, one per case, base_after
    ours: dict  # the trainer's outputs: base, one per case
    exported: dict  # case -> {suffix: count} of the file the trainer wrote
    effect: dict  # case -> rel. change of the trainer's output by that network
    targets: list  # the trainer's target keys (ComfyUI weight names without ".weight")


@pytest.fixture(scope="module")
def comfy_run(tmp_path_factory) -> ComfyRun:
    """Everything, once: the checkpoint, one network file per case and the trainer's outputs, then ONE
    ComfyUI process that loads the model once and applies each file to it in turn."""
    comfy, python = _comfy()

    from safetensors.torch import load_file

    from trainer.fileio import save_safetensors_atomic
    from trainer.models.flux import load_flux_transformer
    from trainer.demo.flux import flux_diffusers_config
    from trainer.networks.network import Network

    tmp_path = tmp_path_factory.mktemp("comfy_flux")
    t0 = time.monotonic()
    torch.manual_seed(0)
    cfg = flux_diffusers_config(hidden=3072, head_dim=128, double=1, single=1, context_dim=64, pooled_dim=64,
                                guidance=True)
    ckpt = tmp_path / "flux.safetensors"
    _make_checkpoint(ckpt, cfg)
    transformer = load_flux_transformer(ckpt, torch.float32, "flux").eval().requires_grad_(False)
    model = _flux_model(transformer)
    targets = model.targets()

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

    def predict() -> torch.Tensor:
        with torch.no_grad():
            return model.predict(inputs["latents"], inputs["sigma"], cond, guidance=3.5).float()

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
    # patching allocates and frees one full-size weight after another: glibc's default (mmap each, unmap on
    # free) makes every one of them page-fault afresh, more than doubling ComfyUI's time on CPU; keep the
    # freed memory in the process instead (ignored where the C library is not glibc)
    env.setdefault("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296")
    proc = subprocess.run(cmd, cwd=str(comfy), env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"ComfyUI side failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    t_comfy = time.monotonic() - t0 - t_ours

    report = json.loads(report_file.read_text())
    print(f"\nComfyUI {report['comfyui_version']}: {report['model_class']} ({report['weight_dtype']}); "
          f"trainer side {t_ours:.1f}s, ComfyUI side {t_comfy:.1f}s (per file: "
          + ", ".join(f"{k} {v['seconds']:.1f}s" for k, v in report["loras"].items()) + ")")
    return ComfyRun(report=report, theirs=load_file(str(out_file)), ours=ours, exported=exported,
                    effect=effect, targets=target_keys)


def test_base(comfy_run):
    """The layout conversion (original file -> diffusers) computes what ComfyUI computes, and ComfyUI's
    model is the base again after every network was applied and unloaded."""
    r = comfy_run
    assert r.report["model_class"] == "Flux", r.report
    base_err = _rel_err(r.theirs["base"], r.ours["base"])
    print(f"base rel err {base_err:.2e}")
    assert base_err < TOL, f"base Flux differs between trainer and ComfyUI (rel err {base_err:.2e}): layout bug"
    restored = _rel_err(r.theirs["base_after"], r.theirs["base"])
    assert restored < 1e-6, f"ComfyUI's model not restored after the networks (rel change {restored:.2e})"


@pytest.mark.parametrize("case", list(CASES))
def test_network_type(comfy_run, case):
    """Every tensor taken, one patch per target, same output as the trainer's with the network attached."""
    r = comfy_run
    _, suffixes = CASES[case]
    n = len(r.targets)
    assert r.exported[case] == {s: n for s in suffixes}, f"{case}: unexpected file layout {r.exported[case]}"
    effect = r.effect[case]
    assert effect > 50 * TOL, f"{case}: test network too weak to tell applied from not applied ({effect:.2e})"

    rep = r.report["loras"][case]
    assert rep["not_loaded"] == [], f"{case}: ComfyUI did not load:\n" + "\n".join(rep["not_loaded"][:20])
    assert rep["lora_tensors"] == len(suffixes) * n
    expected = sorted(f"{k}.weight" for k in r.targets)
    assert rep["patched_keys"] == expected, (
        f"{case}: patched {len(rep['patched_keys'])} weights, expected {len(expected)}: "
        f"missing {sorted(set(expected) - set(rep['patched_keys']))[:5]}, "
        f"extra {sorted(set(rep['patched_keys']) - set(expected))[:5]}"
    )
    err = _rel_err(r.theirs[case], r.ours[case])
    print(f"{case}: rel err {err:.2e}, effect {effect:.3f} (ComfyUI vs its base: "
          f"{_rel_err(r.theirs[case], r.theirs['base']):.3f}), not loaded {len(rep['not_loaded'])}")
    assert err < TOL, f"ComfyUI's {case}-patched Flux differs from the trainer's (rel err {err:.2e})"
