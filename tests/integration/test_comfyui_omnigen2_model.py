"""OmniGen2's transformer against real ComfyUI: the trainer's model file (random fp32 weights, a small config) is
loaded into ComfyUI's own OmniGen2 model class and both compute the same velocity, through ComfyUI's own
conditioning (model_base.Omnigen2.extra_conds) and sampling (sigma -> timestep, denoised -> velocity) steps.

Cases: no padding; a padded text mask (ComfyUI is given the caption without its padding, which is what ComfyUI
itself sees: it never pads OmniGen2 captions); one reference latent of another size than the image; an odd latent
size (padded to the patch size and cropped back); a batch of two sigmas with two references. ComfyUI's text encoder
always returns a mask, so ComfyUI is given an all-ones mask where the trainer is given none.
Needs COMFYUI_PATH (comfy_env.py); skipped otherwise.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from integration.comfy_env import comfy_install

HERE = Path(__file__).resolve().parent
TOL = 1e-4
CONFIG = dict(patch_size=2, in_channels=16, hidden_size=96, num_layers=2, num_refiner_layers=2,
              num_attention_heads=4, num_kv_heads=2, multiple_of=32, axes_dim_rope=[8, 8, 8],
              axes_lens=[64, 64, 64], text_feat_dim=32, timestep_scale=1000.0, norm_eps=1e-5)
# ComfyUI's constructor names for the same config (it hardcodes rope theta 10000 and the eps of q/k and final norm)
COMFY_CONFIG = {k: v for k, v in CONFIG.items()} | dict(out_channels=None, ffn_dim_multiplier=None)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _cases() -> dict[str, dict]:
    """Per case: what the trainer's forward gets, and what ComfyUI gets."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    cases = {}
    x, ctx = rnd(1, 16, 8, 6), rnd(1, 7, 32)
    cases["plain"] = dict(ours=dict(x=x, sigma=torch.tensor([0.7]), context=ctx),
                          comfy=dict(x=x, sigma=torch.tensor([0.7]), context=ctx, mask=torch.ones(1, 7)))
    x, ctx = rnd(1, 16, 6, 6), rnd(1, 9, 32)
    mask = torch.tensor([[1.0] * 5 + [0.0] * 4])
    cases["padded"] = dict(ours=dict(x=x, sigma=torch.tensor([0.3]), context=ctx, mask=mask),
                           comfy=dict(x=x, sigma=torch.tensor([0.3]), context=ctx[:, :5], mask=torch.ones(1, 5)))
    # wider than tall: the image's rope shift past a reference is its larger side (5 columns, not 2 rows)
    x, ctx, ref = rnd(1, 16, 6, 8), rnd(1, 6, 32), rnd(1, 16, 4, 10)
    cases["ref"] = dict(ours=dict(x=x, sigma=torch.tensor([0.5]), context=ctx, refs=[ref]),
                        comfy=dict(x=x, sigma=torch.tensor([0.5]), context=ctx, mask=torch.ones(1, 6), refs=[ref]))
    x, ctx = rnd(1, 16, 7, 5), rnd(1, 6, 32)
    cases["odd"] = dict(ours=dict(x=x, sigma=torch.tensor([0.9]), context=ctx),
                        comfy=dict(x=x, sigma=torch.tensor([0.9]), context=ctx, mask=torch.ones(1, 6)))
    # a batch (two sigmas) of one caption with two references, an odd-sized one shared and one per sample
    x, ctx, refs = rnd(2, 16, 6, 4), rnd(1, 5, 32).expand(2, -1, -1), [rnd(1, 16, 5, 3), rnd(2, 16, 6, 6)]
    cases["batch"] = dict(ours=dict(x=x, sigma=torch.tensor([0.4, 0.8]), context=ctx, refs=refs),
                          comfy=dict(x=x, sigma=torch.tensor([0.4, 0.8]), context=ctx, mask=torch.ones(2, 5),
                                     refs=refs))
    return cases


@pytest.fixture(scope="module")
def omnigen2_run(tmp_path_factory) -> dict:
    comfy, python = comfy_install("ComfyUI OmniGen2 transformer test")
    from safetensors.torch import load_file, save_file

    from trainer.models.omnigen2_transformer import OmniGen2Transformer

    tmp = tmp_path_factory.mktemp("omnigen2")
    torch.manual_seed(0)
    model = OmniGen2Transformer(**CONFIG).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):  # norm scales: non-trivial, so a wrong norm is seen
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    (tmp / "cfg.json").write_text(json.dumps(COMFY_CONFIG), encoding="utf-8")

    cases = _cases()
    inputs, ours = {}, {}
    for name, case in cases.items():
        c = case["comfy"]
        inputs.update({f"{name}.x": c["x"], f"{name}.sigma": c["sigma"], f"{name}.context": c["context"]})
        if "mask" in c:
            inputs[f"{name}.mask"] = c["mask"]
        for j, r in enumerate(c.get("refs", [])):
            inputs[f"{name}.ref.{j}"] = r
        o = case["ours"]
        with torch.no_grad():
            ours[name] = model(o["x"], o["sigma"], o["context"], attention_mask=o.get("mask"),
                               ref_latents=o.get("refs"))
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(tmp / "inputs.safetensors"))

    cmd = [str(python), str(HERE / "comfy_check_omnigen2_model.py"), "--comfyui", str(comfy),
           "--model", str(tmp / "model.safetensors"), "--unet-config", str(tmp / "cfg.json"),
           "--inputs", str(tmp / "inputs.safetensors"), "--out", str(tmp / "out.safetensors"),
           "--report", str(tmp / "report.json")]
    proc = subprocess.run(cmd, cwd=str(comfy), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp / "report.json").read_text(encoding="utf-8"))
    return dict(ours=ours, theirs=load_file(str(tmp / "out.safetensors")), report=report, model=model)


def test_comfyui_builds_and_loads_the_same_model(omnigen2_run: dict) -> None:
    r = omnigen2_run["report"]
    assert r["diffusion_model_class"] == "OmniGen2Transformer2DModel"
    assert r["model_type"] == "FLOW"
    assert r["linear_class"] == "disable_weight_init.Linear"
    assert r["load_messages"] == []  # no missing or unexpected keys: every name matches


@pytest.mark.parametrize("case", ["plain", "padded", "ref", "odd", "batch"])
def test_comfyui_output_matches(omnigen2_run: dict, case: str) -> None:
    info = omnigen2_run["report"]["cases"][case]
    assert "error" not in info, info.get("traceback")
    # ComfyUI's timestep for the diffusion model is the sigma itself (FLOW, multiplier 1)
    assert info["timesteps"] == pytest.approx(_cases()[case]["comfy"]["sigma"].tolist())
    ours, theirs = omnigen2_run["ours"][case], omnigen2_run["theirs"][case]
    assert ours.shape == theirs.shape
    assert theirs.abs().max() > 1e-3  # a zero output would match anything
    assert _rel_err(ours, theirs) < TOL


def test_lora_keys_land_on_comfyuis_modules(omnigen2_run: dict) -> None:
    # every linear layer of ours, named `diffusion_model.<name>` (or kohya's lora_unet_<name_with_underscores>),
    # is a weight ComfyUI's LoRA loader patches
    key_map = omnigen2_run["report"]["lora_key_map"]
    linears = [n for n, m in omnigen2_run["model"].named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) > 50
    for name in linears:
        assert key_map.get(f"diffusion_model.{name}") == f"diffusion_model.{name}.weight", name
        assert key_map.get("lora_unet_" + name.replace(".", "_")) == f"diffusion_model.{name}.weight", name


def test_full_size_defaults_are_what_comfyui_detects(omnigen2_run: dict) -> None:
    from trainer.models.omnigen2_transformer import OmniGen2Transformer

    full = omnigen2_run["report"]["full_size"]
    assert full["config_class"] == "Omnigen2"
    assert full["unet_config"]["hidden_size"] == 2520 and full["unet_config"]["num_layers"] == 32
    with torch.device("meta"):
        ours = OmniGen2Transformer()
    assert {k: list(v.shape) for k, v in ours.state_dict().items()} == full["shapes"]
    # the constructor arguments ComfyUI's detection sets are ours with the same values
    cfg = dict(ours.config)
    assert set(full["unet_config"]) <= set(cfg)
    for k, v in full["unet_config"].items():
        assert (list(cfg[k]) if isinstance(cfg[k], (list, tuple)) else cfg[k]) == v, k
