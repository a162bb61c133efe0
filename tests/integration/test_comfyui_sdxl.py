"""SDXL against real ComfyUI: the trainer's LDM layout and LoRA keys as ComfyUI detects and loads them.

Needs a ComfyUI install: set COMFYUI_PATH (its folder) and, unless `<COMFYUI_PATH>/../comfy-venv/bin/python`
exists, COMFYUI_PYTHON. Skipped otherwise. One ComfyUI process (comfy_check_sdxl.py) does everything:
  - at SDXL's real size, on the meta device (names and shapes only): ComfyUI detects the trainer's LDM layout
    as SDXL, and its LoRA key map takes every one of the trainer's target keys (linear and conv) onto a
    weight of the same shape, so LoraLoader loads a trainer file with no "lora key not loaded";
  - on a tiny SDXL-structured checkpoint (ComfyUI detects SDXL only at full size, so the tiny one is put
    into ComfyUI's SDXL class with ComfyUI's own detected config): the base model's eps, and the eps with a
    LoRA / LoCon file applied through comfy.sd.load_lora_for_models, equal the trainer's; a v-prediction
    file is recognized as such and agrees too;
  - text encoders (train.train_text_encoder): at real CLIP-L / CLIP-G size (meta device) ComfyUI's CLIP key map
    takes every `lora_te1_` / `lora_te2_` target onto a weight of the same shape; on a tiny checkpoint (ComfyUI's
    own CLIP classes, with the tiny widths given as its per-encoder config overrides) a file with UNet and
    text-encoder parts loads through load_lora_for_models with no key left out, and ComfyUI's CLIP output
    (prompt embedding and pooled) and UNet output with it equal the trainer's.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from integration.comfy_env import comfy_install
import torch

HERE = Path(__file__).resolve().parent
TOL = 1e-4  # max |a - b| / max |b|, fp32


def _comfy() -> tuple[Path, Path]:
    return comfy_install("ComfyUI SDXL test")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


REAL_SDXL = dict(
    in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=2048,
    attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


def _real_size_names() -> dict:
    from diffusers import UNet2DConditionModel

    from trainer.models.sdxl import SDXLModel
    from trainer.models.sdxl_layout import diffusers_to_ldm

    with torch.device("meta"):
        unet = UNet2DConditionModel(**REAL_SDXL)
    model = object.__new__(SDXLModel)
    model.denoiser = unet
    ldm = diffusers_to_ldm(unet.state_dict(), unet.config)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # CLIP-L (ViT-L/14 text) and OpenCLIP bigG text towers at their real sizes
    with torch.device("meta"):
        model.clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                    num_attention_heads=12, projection_dim=768))
        model.clip_g = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            projection_dim=1280, hidden_act="gelu"))
    return {
        "ldm_shapes": {k: list(v.shape) for k, v in ldm.items()},
        "targets": {t.key: list(t.members[0].module.weight.shape) for t in model.targets()},
        "te_targets": {t.key: list(t.members[0].module.weight.shape) for t in model.text_encoder_targets()},
    }


@pytest.fixture(scope="module")
def comfy_run(tmp_path_factory):
    comfy, python = _comfy()
    from safetensors.torch import load_file

    from sdxl_helpers import TINY_SDXL, load, write_tiny_sdxl
    from trainer.demo.sdxl import write_sdxl_files
    from trainer.fileio import save_safetensors_atomic
    from trainer.networks.network import Network

    tmp = tmp_path_factory.mktemp("comfy_sdxl")
    torch.set_num_threads(1)
    real = _real_size_names()
    (tmp / "real.json").write_text(json.dumps(real))
    eps_cfg = write_tiny_sdxl(tmp / "eps")
    v_cfg = write_tiny_sdxl(tmp / "v", v_pred=True, seed=12)
    model, vmodel = load(eps_cfg), load(v_cfg)

    g = torch.Generator().manual_seed(7)
    # a sigma of the DDPM table (timestep 562): ComfyUI maps sigma to the nearest discrete timestep where the
    # trainer (like diffusers' schedulers) interpolates; at the table's sigmas, where both train and sample, they agree
    sigma = model.sigma_table[562].reshape(1)
    inputs = {"latents": torch.randn(1, 4, 16, 16, generator=g) * (1 + sigma**2).sqrt(), "sigma": sigma,
              "crossattn": torch.randn(1, 77, 96, generator=g), "pooled": torch.randn(1, 32, generator=g),
              "size": torch.tensor([32, 32])}
    cond = {"crossattn": inputs["crossattn"], "pooled": inputs["pooled"]}

    def eps(m) -> torch.Tensor:
        with torch.no_grad():
            out = m.predict(inputs["latents"], sigma, cond).float()
        to_d = getattr(m.objective, "derivative", None)
        return to_d(inputs["latents"], out, sigma[0]) if to_d else out

    ours = {"base": eps(model), "vpred_base": eps(vmodel)}
    files, n_targets = {}, {}
    for i, kind in enumerate(("lora", "locon")):
        net = Network(model.targets(), kind, rank=4, alpha=8.0, conv_rank=4 if kind == "locon" else None)
        gen = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        files[kind] = tmp / f"{kind}.safetensors"
        save_safetensors_atomic(net.export(), files[kind])
        n_targets[kind] = len(net.targets)
        net.attach()
        ours[kind] = eps(model)
        net.detach()
    # text encoders: ComfyUI builds SDXL's CLIP-G with 2 layers fewer than it has (penultimate layer), so 3
    # and a square CLIP-G projection (ComfyUI's CLIPTextModel builds text_projection hidden x hidden)
    te_cfg = write_sdxl_files(tmp / "te", clip_layers=3, **dict(TINY_SDXL, pooled=TINY_SDXL["clip_g_width"]))
    te_model = load(te_cfg)
    prompt = "sks, a red circle on a blue background"
    ids_l = te_model.tok_l([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids_g = te_model.tok_g([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    inputs.update(te_ids_l=ids_l, te_ids_g=ids_g, te_pooled=torch.randn(1, TINY_SDXL["clip_g_width"], generator=g))

    def clip_overrides(enc) -> dict:
        c = enc.config
        return {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
                "num_attention_heads": c.num_attention_heads, "vocab_size": c.vocab_size, "projection_dim": c.projection_dim,
                "eos_token_id": te_model.tok_l.eos_token_id}

    specials = {"clip_l": {"start": te_model.tok_l.bos_token_id, "end": te_model.tok_l.eos_token_id, "pad": te_model.tok_l.pad_token_id},
                "clip_g": {"start": te_model.tok_g.bos_token_id, "end": te_model.tok_g.eos_token_id, "pad": te_model.tok_g.pad_token_id}}
    (tmp / "te.json").write_text(json.dumps({"clip_l": clip_overrides(te_model.clip_l), "clip_g": clip_overrides(te_model.clip_g),
                                             "special_tokens": specials}))
    ours["te_base_cond"] = te_model.encode_text([prompt])["crossattn"]
    ours["te_base_pooled"] = te_model.encode_text([prompt])["pooled"]
    net = Network(te_model.targets() + te_model.text_encoder_targets(), "lora", rank=4, alpha=8.0)
    gen = torch.Generator().manual_seed(21)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    te_lora = tmp / "te_lora.safetensors"
    save_safetensors_atomic(net.export(), te_lora)
    n_targets["te"] = len(net.targets)
    n_targets["te_clip"] = sum(1 for t in net.targets.values() if t.component == "text_encoder")
    net.attach()
    te_cond = te_model.encode_text([prompt])
    ours["te_lora_cond"], ours["te_lora_pooled"] = te_cond["crossattn"], te_cond["pooled"]
    with torch.no_grad():
        ours["te_lora_eps"] = te_model.predict(inputs["latents"], sigma, {"crossattn": inputs["crossattn"],
                                                                          "pooled": inputs["te_pooled"]}).float()
    net.detach()
    save_safetensors_atomic(inputs, tmp / "inputs.safetensors")

    out, report = tmp / "out.safetensors", tmp / "report.json"
    cmd = [str(python), str(HERE / "comfy_check_sdxl.py"), "--comfyui", str(comfy), "--real-shapes",
           str(tmp / "real.json"), "--model", eps_cfg["name_or_path"], "--vpred-model", v_cfg["name_or_path"],
           "--inputs", str(tmp / "inputs.safetensors"), "--out", str(out), "--report", str(report)]
    for kind, f in files.items():
        cmd += ["--lora", f"{kind}={f}"]
    cmd += ["--te-model", te_cfg["name_or_path"], "--te-lora", str(te_lora), "--te-config", str(tmp / "te.json")]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(cmd, cwd=str(comfy), env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"ComfyUI side failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(report.read_text()), load_file(str(out)), ours, n_targets, real


def test_real_size_detection_and_lora_keys(comfy_run):
    report, _, _, _, real = comfy_run
    assert report["real_model_config"] == "SDXL"
    assert report["real_targets"] == len(real["targets"])
    assert report["real_unmapped"] == [] and report["real_shape_mismatch"] == []
    kinds = {len(s) for s in real["targets"].values()}
    assert kinds == {2, 4}  # linear and conv targets both checked


def test_tiny_base_and_vpred(comfy_run):
    report, theirs, ours, _, _ = comfy_run
    assert report["model_class"] == "SDXL" and report["model_type"] == "EPS"
    assert report["vpred_model_type"] == "V_PREDICTION"
    assert _rel_err(theirs["base"], ours["base"]) < TOL
    assert _rel_err(theirs["vpred_base"], ours["vpred_base"]) < TOL
    assert _rel_err(theirs["base_after"], theirs["base"]) < 1e-6


@pytest.mark.parametrize("kind", ["lora", "locon"])
def test_tiny_network_in_comfyui(comfy_run, kind):
    report, theirs, ours, n_targets, _ = comfy_run
    r = report["loras"][kind]
    assert r["not_loaded"] == []
    assert len(r["patched_keys"]) == n_targets[kind]
    assert _rel_err(ours[kind], ours["base"]) > 100 * TOL  # the network really changes the output
    assert _rel_err(theirs[kind], ours[kind]) < TOL


def test_real_size_text_encoder_keys(comfy_run):
    """Every lora_te1_ (CLIP-L, 12 layers) and lora_te2_ (CLIP-G, 32 layers) key lands on a ComfyUI CLIP weight
    of the same shape."""
    report, _, _, _, real = comfy_run
    assert len(real["te_targets"]) == (12 + 32) * 6
    assert report["te_real_targets"] == len(real["te_targets"])
    assert report["te_real_unmapped"] == [] and report["te_real_shape_mismatch"] == []
    assert report["te_real_targets_by_encoder"] == ["clip_g", "clip_l"]


def test_tiny_text_encoder_network_in_comfyui(comfy_run):
    report, theirs, ours, n_targets, _ = comfy_run
    r = report["te_lora"]
    assert r["not_loaded"] == []
    assert len(r["clip_patched_keys"]) == n_targets["te_clip"]
    assert len(r["model_patched_keys"]) == n_targets["te"] - n_targets["te_clip"]
    assert _rel_err(theirs["te_base_cond"], ours["te_base_cond"]) < TOL
    assert _rel_err(theirs["te_base_pooled"], ours["te_base_pooled"]) < TOL
    for part in ("cond", "pooled"):
        assert _rel_err(ours[f"te_lora_{part}"], ours[f"te_base_{part}"]) > 100 * TOL  # the network changes it
        assert _rel_err(theirs[f"te_lora_{part}"], ours[f"te_lora_{part}"]) < TOL
    assert _rel_err(theirs["te_lora_eps"], ours["te_lora_eps"]) < TOL
