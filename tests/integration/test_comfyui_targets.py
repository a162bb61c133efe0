"""The ComfyUI backend's target discovery on ComfyUI's own models of the families the trainer reaches only through
ComfyUI's MODEL (Z-Image, OmniGen2, HiDream, HunyuanVideo, Qwen-Image, LTX-Video, Wan 2.2 5B), built at full size on the meta
device inside ComfyUI's python (comfy_check_targets.py): every stack of blocks is found whatever it is called, the
layers outside them (embedders, final layers) and the peers' exclusions (HiDream's routed experts) are left out.
Needs COMFYUI_PATH (comfy_env.py); skipped otherwise."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from integration.comfy_env import comfy_install

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    comfy, python = comfy_install("ComfyUI target discovery test")
    out = tmp_path_factory.mktemp("targets") / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    proc = subprocess.run([str(python), str(HERE / "comfy_check_targets.py"), "--comfyui", str(comfy), "--trainer",
                           str(REPO), "--report", str(out)], cwd=str(comfy), env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"ComfyUI side failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("family, stacks", [
    ("z_image", ["noise_refiner", "context_refiner", "layers"]),
    ("omnigen2", ["noise_refiner", "ref_image_refiner", "context_refiner", "layers"]),
    ("hidream", ["double_stream_blocks", "single_stream_blocks"]),
    ("hunyuan_video", ["double_blocks", "single_blocks"]),
    ("qwen_image", ["transformer_blocks"]),
    ("ltxv", ["transformer_blocks"]),
    ("wan22_5b", ["blocks"]),
])
def test_every_stack_is_found_and_nothing_else(report, family, stacks):
    r = report[family]
    assert "error" not in r, r.get("error")
    assert r["stacks"] == stacks and r["targets"] > 0
    assert r["blocks"] >= len(stacks)
    prefixes = tuple(f"diffusion_model.{s}." for s in stacks)
    # what is left out lies outside the stacks (embedders, final layers), but for the family's exclusions
    inside = [k for k in r["left_out"] if k.startswith(prefixes)]
    if family == "hidream":
        assert inside and all(".experts." in k for k in inside)
        assert any(k.startswith("diffusion_model.caption_projection.") for k in r["left_out"])
    else:
        assert inside == []
    if family == "hunyuan_video":  # the token refiner is txt_in's, left out as the peers leave it
        assert any(k.startswith("diffusion_model.txt_in.individual_token_refiner.") for k in r["left_out"])


def test_hidream_keeps_its_shared_expert(report):
    """Only the routed experts go: the shared expert's three linears in each of the 48 blocks stay targets."""
    assert report["hidream"]["shared_expert_targets"] == 48 * 3


def test_training_shift_follows_comfyuis_own_sampling(report):
    """Flux.1's resolution formula only for Flux.1 and Chroma (mu 1.15 at 1024²: 4096 tokens); Flux.2 at the mu of
    ComfyUI's Flux2Scheduler (50 steps; 2.023 at 1024², its config's fixed 2.02 there), which follows the resolution;
    LTX-Video, also on ComfyUI's Flux schedule, by its latent's token count; SD3 and Wan the fixed shift."""
    from trainer.models.schedules import linear_mu

    mu = report["shift_mu_1024"]
    assert mu["Flux"] == mu["Chroma"] == pytest.approx(linear_mu(64 * 64))
    assert mu["Flux2"] == pytest.approx(2.0234, abs=1e-4)
    # LTX-Video by its latent's token count, as ModelSamplingLTXV (0.95 at 1024 tokens to 2.05 at 4096, extended)
    assert mu["LTXV"] == pytest.approx(linear_mu(128 * 128, 1024, 4096, 0.95, 2.05))
    assert mu["SD3"] is None and mu["WAN21_T2V"] is None
    flux2 = report["flux2_shift_mu"]
    assert flux2 == pytest.approx(report["flux2_scheduler_mu"]), flux2
    assert flux2["512"] < flux2["1024"] - 0.3 and flux2["2048"] > flux2["1024"] + 1.0, flux2  # the resolution's


def test_models_needing_conditioning_this_path_cannot_build_are_refused(report):
    """Wan Fun Control, Flux Fill and an SDXL inpainting UNet would train on zeros here: each is named with what it
    needs; text-to-video and text-to-image models (Wan 2.1 / 2.2 T2V, Flux, SDXL, LTX-Video, Qwen-Image) are not, nor
    those whose conditioning ComfyUI's own node builds here: Wan 2.1 I2V and Wan 2.2 I2V A14B (WanImageToVideo), VACE
    (WanVaceToVideo)."""
    need = report["missing_conditioning"]
    assert "control video" in need["WAN21_FunControl2V"] and "inpaint" in need["FluxInpaint"]
    assert "9 input channels for a 4-channel latent" in need["SDXL_inpaint"]
    assert all(need[n] is None for n in ("WAN21_T2V", "WAN22_T2V", "Flux", "SDXL", "LTXV", "QwenImage", "WAN21_I2V",
                                         "WAN21_Vace", "WAN21_T2V_i2v"))
    nodes = report["conditioning_node"]
    assert nodes["WAN21_I2V"] == nodes["WAN21_T2V_i2v"] == "WanImageToVideo" and nodes["WAN21_Vace"] == "WanVaceToVideo"
    assert all(nodes[n] is None for n in ("WAN21_T2V", "WAN22_T2V", "Flux", "SDXL", "LTXV", "QwenImage"))
