"""OmniGen2 against real ComfyUI, as a user runs it: the trainer's OmniGen2 file (trainer.demo.omnigen2, small,
random, fp32) in ComfyUI's own OmniGen2 model gives the trainer's prediction, text only and with a reference latent
(ComfyUI's ReferenceLatent conditioning, through its process_latent_in); every network type the trainer saves loads
through ComfyUI's LoRA loader with zero unloaded keys and computes what the trainer computed; ComfyUI's KSampler
(euler, simple, 4 steps; cfg 1, and cfg 4 with a negative caption and a reference) samples the latent
trainer.sampling.denoise samples from the same noise; and ComfyUI's detection routes the full-size key set to
OmniGen2, whose LoRA key map takes every full-size target key (the refiners' too).

ComfyUI fixes OmniGen2's config at full size (4B), which a CPU test cannot run: the model is built at the small size
from ComfyUI's own `supported_models.Omnigen2` entry (comfy_check_omnigen2.py), the way load_diffusion_model builds
a detected one, so ComfyUI's model_sampling (sigma -> timestep, shift 2.6), conditioning and LoRA key map are what is
compared. Captions are unpadded with an all-ones mask: what ComfyUI's text encoder gives (it never pads).
Needs COMFYUI_PATH (comfy_env.py); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from integration.comfy_env import comfy_install
from integration.test_comfyui_flux_lora import CASES, _randomize, _rel_err
from integration.test_comfyui_hidream import _write_header_only

HERE = Path(__file__).resolve().parent
TOL = 1e-4  # predictions, max |a - b| / max |b|, fp32
SAMPLE_TOL = 1e-3
STEPS = 4  # as comfy_check_omnigen2.STEPS
# every network type the trainer saves; LoCon is LoRA on OmniGen2 (no convs)
RUNS = {"locon": dict(type_name="locon"), **{case: kwargs for case, (kwargs, _) in CASES.items()}}
# ComfyUI's OmniGen2 constructor arguments (what model_detection sets at full size)
COMFY_KEYS = ("patch_size", "in_channels", "out_channels", "hidden_size", "num_layers", "num_refiner_layers",
              "num_attention_heads", "num_kv_heads", "multiple_of", "ffn_dim_multiplier", "norm_eps", "axes_dim_rope",
              "axes_lens", "text_feat_dim", "timestep_scale")


@pytest.fixture(scope="module")
def og_run(tmp_path_factory) -> dict:
    comfy, python = comfy_install("ComfyUI OmniGen2 test")
    from safetensors.torch import load_file

    from trainer.demo.omnigen2 import make_omnigen2_file, omnigen2_config
    from trainer.fileio import save_safetensors_atomic
    from trainer.models.flux import FLUX_VAE_SCALE, FLUX_VAE_SHIFT
    from trainer.models.omnigen2 import OmniGen2Model, load_omnigen2_transformer, omnigen2_targets
    from trainer.models.omnigen2_transformer import OmniGen2Transformer
    from trainer.networks.network import Network
    from trainer.sampling import denoise

    tmp = tmp_path_factory.mktemp("comfy_omnigen2")
    torch.set_num_threads(4)
    path = tmp / "omnigen2_demo.safetensors"
    make_omnigen2_file(path, omnigen2_config())
    transformer = load_omnigen2_transformer(path, torch.float32)
    model = OmniGen2Model(transformer, None, None, None, torch.device("cpu"), torch.float32)

    g = torch.Generator().manual_seed(5)
    d = transformer.config.text_feat_dim
    # a non-square latent, a reference of another size, wider than tall
    x, ref = torch.randn(1, 16, 8, 6, generator=g), torch.randn(1, 16, 6, 10, generator=g)
    ctx, neg_ctx = torch.randn(1, 7, d, generator=g), torch.randn(1, 5, d, generator=g)
    noise = torch.randn(1, 16, 8, 6, generator=g)
    sigma = torch.tensor([0.6])
    cond = {"context": ctx, "mask": torch.ones(1, 7)}
    cond_ref = {**cond, "control": ref}
    neg = {"context": neg_ctx, "mask": torch.ones(1, 5)}

    def predict() -> dict:
        with torch.no_grad():
            return {"": model.predict(x, sigma, cond).float(), ".ref": model.predict(x, sigma, cond_ref).float()}

    def flat(name: str, d: dict) -> dict:
        return {f"{name}{k}": v for k, v in d.items()}

    ours, files, effect, targets = flat("base", predict()), {}, {}, {}
    all_targets = model.targets()
    for i, (case, kwargs) in enumerate(RUNS.items()):
        net = Network(all_targets, rank=4, alpha=8.0, **kwargs)
        _randomize(net, all_targets, torch.Generator().manual_seed(3 + i))
        files[case] = tmp / f"{case}.safetensors"
        save_safetensors_atomic(net.export(), files[case])
        net.attach()
        try:
            ours.update(flat(case, predict()))
        finally:
            net.detach()
        effect[case] = min(_rel_err(ours[case], ours["base"]), _rel_err(ours[f"{case}.ref"], ours["base.ref"]))
        targets[case] = [t.key for t in all_targets]
    with torch.no_grad():
        ours["sample.cfg1"] = denoise(model, noise, cond, neg, STEPS, 1.0)
        ours["sample.cfg4"] = denoise(model, noise, cond_ref, neg, STEPS, 4.0)
        ours["sample.cfg4_plain"] = denoise(model, noise, cond, neg, STEPS, 4.0)  # the reference must matter
    ours["sigmas"] = model.sample_sigmas(STEPS, tuple(noise.shape))

    # ComfyUI gets the reference as VAEEncode returns it (before process_latent_in), the same latent to its model
    ref_comfy = ref / FLUX_VAE_SCALE + FLUX_VAE_SHIFT
    inputs = {"x": x, "sigma": sigma, "context": ctx, "neg_context": neg_ctx, "ref": ref_comfy, "noise": noise}
    save_safetensors_atomic(inputs, tmp / "inputs.safetensors")
    small = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in transformer.config.items()
             if k in COMFY_KEYS}
    (tmp / "unet_config.json").write_text(json.dumps(small))

    # the full-size key set, as a header without weights (ComfyUI's file has no prefix), and its LoRA target keys
    with torch.device("meta"):
        full = OmniGen2Transformer()
    _write_header_only(tmp / "omnigen2_full_header.safetensors",
                       {k: tuple(v.shape) for k, v in full.state_dict().items()})
    full_keys = [t.key for t in omnigen2_targets(full)]
    (tmp / "keys.json").write_text(json.dumps(full_keys))

    out, report = tmp / "out.safetensors", tmp / "report.json"
    cmd = [str(python), str(HERE / "comfy_check_omnigen2.py"), "--comfyui", str(comfy), "--model", str(path),
           "--unet-config", str(tmp / "unet_config.json"), "--inputs", str(tmp / "inputs.safetensors"), "--out",
           str(out), "--report", str(report), "--detect", str(tmp / "omnigen2_full_header.safetensors"), "--keys",
           str(tmp / "keys.json")]
    for case, f in files.items():
        cmd += ["--lora", f"{case}={f}"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    proc = subprocess.run(cmd, cwd=str(comfy), env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"ComfyUI side failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return dict(report=json.loads(report.read_text()), theirs=load_file(str(out)), ours=ours, effect=effect,
                targets=targets, full_keys=full_keys, ref=ref, all_targets=[t.key for t in all_targets])


def test_comfyuis_omnigen2_model_gives_the_same_prediction(og_run):
    r, theirs, ours = og_run["report"], og_run["theirs"], og_run["ours"]
    assert r["model_class"] == "Omnigen2" and r["config_class"] == "Omnigen2" and r["model_type"] == "FLOW"
    assert r["load_messages"] == [], r["load_messages"]  # every weight of the file in its place, none left over
    assert r["timesteps"] == pytest.approx([0.6]) and r["latent_format"] == "Flux"
    assert (r["shift"], r["multiplier"]) == (pytest.approx(2.6), 1.0)
    # ComfyUI's process_latent_in turns the handed-over reference into the trainer's normalized one
    assert _rel_err(theirs["ref_in"], og_run["ref"]) < 1e-6
    for k in ("base", "base.ref"):
        err = _rel_err(theirs[k], ours[k])
        print(f"OmniGen2 {k} rel err {err:.2e}")
        assert err < TOL, k
    assert _rel_err(ours["base.ref"], ours["base"]) > 0.05  # the reference changes the prediction
    assert _rel_err(theirs["base_after"], theirs["base"]) < 1e-6
    assert _rel_err(theirs["base_after.ref"], theirs["base.ref"]) < 1e-6


def test_targets_cover_every_stack(og_run):
    keys = og_run["all_targets"]
    for stack in ("layers", "noise_refiner", "context_refiner", "ref_image_refiner"):
        assert any(k.startswith(f"diffusion_model.{stack}.0.") for k in keys), stack


@pytest.mark.parametrize("case", list(RUNS))
def test_network_type_loads_fully_and_matches(og_run, case):
    rep = og_run["report"]["loras"][case]
    assert rep["not_loaded"] == [], "\n".join(rep["not_loaded"][:20])
    assert rep["patched_keys"] == sorted(f"{k}.weight" for k in og_run["targets"][case])
    for k in (case, f"{case}.ref"):
        err = _rel_err(og_run["theirs"][k], og_run["ours"][k])
        print(f"{k}: rel err {err:.2e}, effect {og_run['effect'][case]:.3f}")
        assert err < TOL and og_run["effect"][case] > 100 * err, k


def test_comfyuis_ksampler_samples_the_same_latent(og_run):
    r, theirs, ours = og_run["report"], og_run["theirs"], og_run["ours"]
    assert r["sampling_sigmas"] == pytest.approx(ours["sigmas"].tolist(), abs=1e-6)
    for k in ("sample.cfg1", "sample.cfg4"):
        err = _rel_err(theirs[k], ours[k])
        print(f"{k}: rel err {err:.2e}")
        assert err < SAMPLE_TOL, k
    # cfg and the reference both matter: the cfg 4 run is not the cfg 1 run, nor the cfg 4 run without a reference
    assert _rel_err(ours["sample.cfg4"], ours["sample.cfg1"]) > 0.05
    assert _rel_err(ours["sample.cfg4"], ours["sample.cfg4_plain"]) > 0.05


def test_full_size_key_set_is_detected_as_omnigen2(og_run):
    """The 4B key set (a header, no weights) is OmniGen2 to ComfyUI's detection; ComfyUI's own model at the config it
    detects has exactly these keys and shapes, and its LoRA key map takes every full-size target key."""
    det = og_run["report"]["detection"]
    assert det["class"] == "Omnigen2", det
    uc = det["unet_config"]
    assert (uc["hidden_size"], uc["num_layers"], uc["num_refiner_layers"], uc["num_attention_heads"]) == (2520, 32, 2, 21)
    assert det["keys_only_in_file"] == [] and det["keys_only_in_comfy"] == [] and det["shape_mismatches"] == []
    keys = og_run["full_keys"]
    assert any(".ref_image_refiner." in k for k in keys) and any(".context_refiner." in k for k in keys)
    assert det["lora_keys"] == len(keys) > 250 and det["lora_keys_unmapped"] == []
