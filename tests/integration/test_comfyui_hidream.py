"""HiDream-I1 against real ComfyUI: the trainer's HiDream file runs in ComfyUI's own HiDream model class with the
trainer's outputs, every network type loads through ComfyUI's LoRA loader with zero unloaded keys and computes what
the trainer computed, and ComfyUI's detection routes the full-size key set to HiDream.

ComfyUI fixes HiDream's config at full size (17B), which a CPU test cannot run: the model class is built at a small
size from ComfyUI's own `supported_models.HiDream` entry (comfy_check_hidream.py), the way load_diffusion_model
builds a detected one, so ComfyUI's model_sampling (sigma -> timestep), its conditioning inputs and its LoRA key map
are what is compared. The latent is not square (6 x 4): ComfyUI does not pad tokens, and neither does the trainer.
Detection: a header-only file with the full-size key set (no weights), whose tensors ComfyUI sees on the meta device.
Needs COMFYUI_PATH (comfy_env.py); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from integration.comfy_env import comfy_install
from integration.test_comfyui_flux_lora import CASES, TOL, _randomize, _rel_err

HERE = Path(__file__).resolve().parent
REAL = dict(patch_size=2, in_channels=16, out_channels=16, num_layers=16, num_single_layers=32, attention_head_dim=128,
            num_attention_heads=20, caption_channels=[4096, 4096], text_emb_dim=2048, num_routed_experts=4,
            num_activated_experts=2, axes_dims_rope=(64, 32, 32), max_resolution=(128, 128),
            llama_layers=list(range(32)) + [31] * 16)
# every network type on the default targets, and LoRA with the routed experts opted in
RUNS = {**{case: (kwargs, False) for case, (kwargs, _) in CASES.items()}, "lora_experts": (dict(type_name="lora"), True)}


def _write_header_only(path: Path, shapes: dict[str, tuple[int, ...]], prefix: str = "") -> None:
    """A safetensors header naming bf16 tensors of these shapes, without their data (what detection reads)."""
    header, offset = {}, 0
    for k, shape in sorted(shapes.items()):
        n = 2
        for d in shape:
            n *= d
        header[f"{prefix}{k}"] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


@pytest.fixture(scope="module")
def hidream_run(tmp_path_factory) -> dict:
    comfy, python = comfy_install("ComfyUI HiDream test")
    from diffusers import HiDreamImageTransformer2DModel
    from safetensors.torch import load_file

    from trainer.config import ModelConfig
    from trainer.demo.hidream import write_hidream_files
    from trainer.fileio import save_safetensors_atomic
    from trainer.models.hidream import load_hidream
    from trainer.models.hidream_layout import block_linears
    from trainer.networks.network import Network, select_targets

    tmp = tmp_path_factory.mktemp("comfy_hidream")
    torch.set_num_threads(1)
    cfg = write_hidream_files(tmp / "models")
    model = load_hidream(ModelConfig(**{k: v for k, v in cfg.items() if k != "arch"}), torch.device("cpu"),
                         torch.float32)
    g = torch.Generator().manual_seed(11)
    inputs = {"latents": torch.randn(1, 16, 6, 4, generator=g), "t5": torch.randn(1, 8, 32, generator=g),
              "llama": torch.randn(1, 2, 8, 64, generator=g), "pooled": torch.randn(1, 80, generator=g),
              "sigma": torch.tensor([0.6])}
    cond = {k: inputs[k] for k in ("t5", "llama", "pooled")}

    def predict() -> torch.Tensor:
        with torch.no_grad():
            return model.predict(inputs["latents"], inputs["sigma"], cond).float()

    ours, files, effect, targets = {"base": predict()}, {}, {}, {}
    all_targets = model.targets()
    for i, (case, (kwargs, experts)) in enumerate(RUNS.items()):
        chosen = select_targets(all_targets, ["stream_blocks"] if experts else [], [])
        net = Network(chosen, rank=4, alpha=8.0, **kwargs)
        _randomize(net, chosen, torch.Generator().manual_seed(3 + i))
        files[case] = tmp / f"{case}.safetensors"
        save_safetensors_atomic(net.export(), files[case])
        net.attach()
        try:
            ours[case] = predict()
        finally:
            net.detach()
        effect[case], targets[case] = _rel_err(ours[case], ours["base"]), [t.key for t in chosen]

    # the full-size key set, as a header without weights, and the full-size LoRA target keys
    with torch.device("meta"):
        full = HiDreamImageTransformer2DModel(**REAL)
    _write_header_only(tmp / "hidream_i1_full_header.safetensors",
                       {k: tuple(v.shape) for k, v in full.state_dict().items()}, "model.diffusion_model.")
    full_keys = [f"diffusion_model.{name}" for name, _ in block_linears(REAL)]
    (tmp / "keys.json").write_text(json.dumps(full_keys))
    small = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in model.denoiser.config.items()
             if k in REAL}
    (tmp / "unet_config.json").write_text(json.dumps(small))

    save_safetensors_atomic(inputs, tmp / "inputs.safetensors")
    out, report = tmp / "out.safetensors", tmp / "report.json"
    cmd = [str(python), str(HERE / "comfy_check_hidream.py"), "--comfyui", str(comfy), "--model", cfg["name_or_path"],
           "--unet-config", str(tmp / "unet_config.json"), "--inputs", str(tmp / "inputs.safetensors"), "--out",
           str(out), "--report", str(report), "--detect", str(tmp / "hidream_i1_full_header.safetensors"), "--keys",
           str(tmp / "keys.json")]
    for case, f in files.items():
        cmd += ["--lora", f"{case}={f}"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    proc = subprocess.run(cmd, cwd=str(comfy), env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"ComfyUI side failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return dict(report=json.loads(report.read_text()), theirs=load_file(str(out)), ours=ours, effect=effect,
                targets=targets, full_keys=full_keys)


def test_comfyuis_hidream_model_gives_the_same_output(hidream_run):
    r = hidream_run["report"]
    assert r["model_class"] == "HiDream" and r["config_class"] == "HiDream" and r["model_type"] == "FLOW"
    assert r["load_messages"] == [], r["load_messages"]  # every weight of the file in its place, none left over
    assert r["timesteps"] == pytest.approx([600.0]) and r["latent_format"] == "Flux"
    err = _rel_err(hidream_run["theirs"]["base"], hidream_run["ours"]["base"])
    print(f"HiDream base rel err {err:.2e}")
    assert err < TOL and _rel_err(hidream_run["theirs"]["base_after"], hidream_run["theirs"]["base"]) < 1e-6


@pytest.mark.parametrize("case", list(RUNS))
def test_network_type_loads_fully_and_matches(hidream_run, case):
    rep = hidream_run["report"]["loras"][case]
    assert rep["not_loaded"] == [], "\n".join(rep["not_loaded"][:20])
    assert rep["patched_keys"] == sorted(f"{k}.weight" for k in hidream_run["targets"][case])
    err = _rel_err(hidream_run["theirs"][case], hidream_run["ours"][case])
    print(f"{case}: rel err {err:.2e}, effect {hidream_run['effect'][case]:.3f}")
    assert err < TOL and hidream_run["effect"][case] > 100 * err


def test_full_size_key_set_is_detected_as_hidream(hidream_run):
    """The 17B key set (a header, no weights) is HiDream to ComfyUI's detection; ComfyUI's own model at the config it
    detects has exactly these keys and shapes, and its LoRA key map takes every full-size target key."""
    det = hidream_run["report"]["detection"]
    assert det["class"] == "HiDream" and det["prefix"] == "model.diffusion_model."
    uc = det["unet_config"]
    assert (uc["num_layers"], uc["num_single_layers"], uc["num_attention_heads"], uc["num_routed_experts"]) == (16, 32, 20, 4)
    assert uc["llama_layers"] == REAL["llama_layers"]
    assert det["keys_only_in_file"] == [] and det["keys_only_in_comfy"] == [] and det["shape_mismatches"] == []
    assert det["lora_keys"] == len(hidream_run["full_keys"]) > 1000 and det["lora_keys_unmapped"] == []
