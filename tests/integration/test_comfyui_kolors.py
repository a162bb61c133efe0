"""Kolors against real ComfyUI with ComfyUI-Kolors-MZ, the custom node Kolors users run (ComfyUI core has no Kolors):
its detection routes Kolors' real key set to its model, its UNet loader loads the trainer's tiny diffusers-layout
UNet with the trainer's output, every network type loads onto its MODEL with zero unloaded keys and computes what the
trainer computed, and its ChatGLM3 code and tokenizer encode prompts as the trainer does.

Needs COMFYUI_PATH (a ComfyUI whose custom_nodes holds ComfyUI-Kolors-MZ) and COMFYUI_PYTHON (comfy_env.py); skipped
otherwise. One ComfyUI process (comfy_check_kolors.py) does everything; see its docstring for what is ComfyUI's and
the node's code and what is given the tiny size.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from integration.comfy_env import comfy_install
from integration.test_comfyui_flux_lora import CASES, TOL, _rel_err, _unit_delta_rms

HERE = Path(__file__).resolve().parent
NODE = "ComfyUI-Kolors-MZ"
# every network type: the Flux cases (LoRA, LoHa, LoKr low and full rank, DoRA) and LoCon (the resnet convs too)
KOLORS_CASES = {**{k: v[0] for k, v in CASES.items()}, "locon": dict(type_name="locon")}
PROMPTS = ["a red circle on a blue background", "sks, 一只红色的猫坐在蓝色的沙发上，高清摄影", ""]

REAL_KOLORS = dict(
    in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=2048,
    attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=5632,
    encoder_hid_dim=4096, encoder_hid_dim_type="text_proj",
)
# the node's KolorsUNetModel projects 4096 -> 2048 whatever the size: the tiny UNet keeps those two widths
TINY = dict(widths=(32, 64, 128), layers=2, depths=(0, 1, 2), context=2048, text_width=4096)


def _install() -> tuple[Path, Path]:
    comfy, python = comfy_install("ComfyUI Kolors test")
    if not (comfy / "custom_nodes" / NODE / "hook_comfyui_kolors_v2.py").is_file():
        pytest.skip(f"the Kolors test needs {NODE} in {comfy}/custom_nodes (ComfyUI core has no Kolors)")
    return comfy, python


def _real_size() -> dict:
    from diffusers import UNet2DConditionModel

    from trainer.models.kolors import KolorsModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**REAL_KOLORS)
    model = object.__new__(KolorsModel)
    model.denoiser = unet
    return {"diffusers_shapes": {k: list(v.shape) for k, v in unet.state_dict().items()},
            "targets": {t.key: list(t.members[0].module.weight.shape) for t in model.targets()}}


def _comfy_unet_config(widths, layers, depths) -> dict:
    """The node's Kolors config dict (hook_comfyui_kolors_v2) at the tiny widths: ComfyUI's LDM names for the same
    UNet (per-resnet transformer depths, output blocks listed from the shallowest level as ComfyUI pops them)."""
    return {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "num_classes": "sequential", "adm_in_channels": TINY["text_width"] + 6 * 256,
            "in_channels": 4, "model_channels": widths[0], "num_res_blocks": [layers] * len(widths),
            "transformer_depth": [d for d in depths for _ in range(layers)],
            "channel_mult": [w // widths[0] for w in widths], "transformer_depth_middle": depths[-1],
            "use_linear_in_transformer": True, "context_dim": TINY["context"], "num_head_channels": 64,
            "transformer_depth_output": [d for d in depths for _ in range(layers + 1)],
            "use_temporal_attention": False, "use_temporal_resblock": False}


def _randomize(net, targets, g: torch.Generator) -> None:
    """As the Flux test's: every adapter's update about a fifth of its base weight (LoCon's linear part is LoRA)."""
    param = {"lora": "lora_up", "locon": "lora_up", "dora": "lora_up", "loha": "hada_w1_a", "lokr": "lokr_w1"}
    with torch.no_grad():
        for t in targets:
            if t.key not in net.targets:
                continue
            ad = net.adapter(t.key)
            for name, p in ad.named_parameters():
                if name != "dora_scale":
                    p.copy_(torch.randn(p.shape, generator=g))
            getattr(ad, param[net.type_name]).mul_(0.2 / t.in_features**0.5 / _unit_delta_rms(ad))
            if net.type_name == "dora":
                ad.dora_scale.mul_(1.0 + 0.1 * torch.randn(ad.dora_scale.shape, generator=g))


@pytest.fixture(scope="module")
def kolors_run(tmp_path_factory):
    comfy, python = _install()
    from safetensors.torch import load_file

    from trainer.demo import tiny
    from trainer.demo.kolors import chatglm_config, chatglm_state, kolors_unet_config
    from trainer.fileio import save_safetensors_atomic
    from trainer.models.chatglm import find_chatglm_tokenizer, load_chatglm, load_chatglm_tokenizer
    from trainer.models.kolors import KolorsModel
    from trainer.models.sdxl import load_sdxl_unet
    from trainer.networks.network import Network

    tmp = tmp_path_factory.mktemp("comfy_kolors")
    torch.set_num_threads(1)
    (tmp / "real.json").write_text(json.dumps(_real_size()))

    # the tiny UNet in diffusers' layout (what the node's UNet loader reads), loaded by the trainer's loader
    from diffusers import UNet2DConditionModel

    cfg = kolors_unet_config(TINY["widths"], TINY["layers"], TINY["depths"], TINY["context"], TINY["text_width"])
    unet_file = tmp / "kolors_tiny_unet.safetensors"
    save_safetensors_atomic(tiny.random_weights(tiny.module_shapes(UNet2DConditionModel, cfg), 31, torch.float32,
                                                bias_std=0.1, norm_std=0.1), unet_file)
    (tmp / "unet_config.json").write_text(json.dumps(_comfy_unet_config(TINY["widths"], TINY["layers"], TINY["depths"])))
    unet = load_sdxl_unet(unet_file, torch.float32, "kolors", family="kolors").eval().requires_grad_(False)
    vae_file = tmp / "vae.safetensors"
    tiny.make_vae_file(vae_file, [32, 32], latent=4)
    from trainer.models.vae import load_vae

    vae = load_vae(vae_file, torch.float32, 0.13025, None, 4)

    # a small ChatGLM over ChatGLM3's real vocabulary; the tokenizer the trainer finds is the one the node ships
    glm_cfg = chatglm_config(65024, hidden=256, layers=2, ffn=192, groups=1)
    glm_file = tmp / "chatglm3_tiny.safetensors"
    save_safetensors_atomic(chatglm_state(glm_cfg, 41, torch.float32), glm_file)
    (tmp / "glm.json").write_text(json.dumps(glm_cfg))
    (tmp / "prompts.json").write_text(json.dumps(PROMPTS, ensure_ascii=False))
    spiece = find_chatglm_tokenizer(None, None, [glm_file])
    model = KolorsModel(unet, vae, load_chatglm(glm_file, torch.float32), load_chatglm_tokenizer(spiece),
                        torch.device("cpu"), torch.float32)
    ours = {f"text_{i}": model.encode_text([p]) for i, p in enumerate(PROMPTS)}
    ids = {i: model.tokenizer([p], padding="max_length", max_length=256, truncation=True, return_tensors="pt")["input_ids"]
           for i, p in enumerate(PROMPTS)}

    g = torch.Generator().manual_seed(7)
    # a sigma of Kolors' table (timestep 640): ComfyUI maps sigma to the nearest timestep, the trainer interpolates
    sigma = model.sigma_table[640].reshape(1)
    inputs = {"latents": torch.randn(1, 4, 16, 16, generator=g) * (1 + sigma**2).sqrt(), "sigma": sigma,
              "context": torch.randn(1, 64, TINY["text_width"], generator=g),
              "pooled": torch.randn(1, TINY["text_width"], generator=g),
              "size": torch.tensor([16 * model.vae_scale, 16 * model.vae_scale])}  # the size ids the trainer feeds
    cond = {"crossattn": inputs["context"], "pooled": inputs["pooled"]}

    def predict() -> torch.Tensor:
        with torch.no_grad():
            return model.predict(inputs["latents"], sigma, cond).float()

    targets = model.targets()
    ours["base"], files, effect, n_targets = predict(), {}, {}, {}
    for i, (case, kwargs) in enumerate(KOLORS_CASES.items()):
        net = Network(targets, rank=4, alpha=8.0, **kwargs)
        _randomize(net, targets, torch.Generator().manual_seed(3 + i))
        files[case] = tmp / f"{case}.safetensors"
        save_safetensors_atomic(net.export(), files[case])
        n_targets[case] = sorted(f"{k}.weight" for k in net.targets)
        net.attach()
        try:
            ours[case] = predict()
        finally:
            net.detach()
        effect[case] = _rel_err(ours[case], ours["base"])
    save_safetensors_atomic(inputs, tmp / "inputs.safetensors")

    out, report = tmp / "out.safetensors", tmp / "report.json"
    cmd = [str(python), str(HERE / "comfy_check_kolors.py"), "--comfyui", str(comfy), "--real-shapes",
           str(tmp / "real.json"), "--unet", str(unet_file), "--unet-config", str(tmp / "unet_config.json"),
           "--inputs", str(tmp / "inputs.safetensors"), "--chatglm", str(glm_file), "--chatglm-config",
           str(tmp / "glm.json"), "--prompts", str(tmp / "prompts.json"), "--out", str(out), "--report", str(report)]
    for case, f in files.items():
        cmd += ["--lora", f"{case}={f}"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(cmd, cwd=str(comfy), env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"ComfyUI side failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return dict(report=json.loads(report.read_text()), theirs=load_file(str(out)), ours=ours, effect=effect,
                n_targets=n_targets, ids=ids, spiece=spiece, comfy=comfy, real=json.loads((tmp / "real.json").read_text()))


def test_real_key_set_is_routed_to_the_nodes_kolors(kolors_run):
    """Kolors' real diffusers-layout UNet (the file MZ users keep): the node's detection gives its KolorsSupported,
    ComfyUI's key table converts every tensor onto the node's model, and every trainer target (linear and conv) is a
    LoRA key ComfyUI maps onto a weight of the same shape."""
    r, real = kolors_run["report"], kolors_run["real"]
    assert NODE in str(kolors_run["spiece"])  # the trainer found the node's tokenizer in this ComfyUI
    assert r["node_loaded"] and "MZ_KolorsUNETLoaderV2" in r["node_classes"]
    assert r["real_model_config"] == "KolorsSupported" and r["real_model_class"] == "KolorsUNetModel"
    assert r["real_unconverted"] == [] and r["real_weight_mismatch"] == [] and r["real_weights_not_in_file"] == []
    assert r["real_targets"] == len(real["targets"]) > 700
    assert r["real_unmapped"] == [] and r["real_shape_mismatch"] == []
    assert {len(s) for s in real["targets"].values()} == {2, 4}


def test_nodes_loader_gives_the_same_base_output(kolors_run):
    r, theirs, ours = kolors_run["report"], kolors_run["theirs"], kolors_run["ours"]
    assert r["load_problems"] == [], r["load_problems"]
    assert r["model_class"] == "SDXL" and r["unet_class"] == "KolorsUNetModel" and r["model_type"] == "EPS"
    assert r["sampling"]["timesteps"] == 1100 and r["timestep"] == pytest.approx([640.0])
    err = _rel_err(theirs["base"], ours["base"])
    print(f"Kolors base rel err {err:.2e}")
    assert err < TOL and _rel_err(theirs["base_after"], theirs["base"]) < 1e-6


@pytest.mark.parametrize("case", list(KOLORS_CASES))
def test_network_type_loads_fully_and_matches(kolors_run, case):
    rep = kolors_run["report"]["loras"][case]
    assert rep["not_loaded"] == [], "\n".join(rep["not_loaded"][:20])
    assert rep["patched_keys"] == kolors_run["n_targets"][case]
    err = _rel_err(kolors_run["theirs"][case], kolors_run["ours"][case])
    print(f"{case}: rel err {err:.2e}, effect {kolors_run['effect'][case]:.3f}")
    assert err < TOL and kolors_run["effect"][case] > 100 * err


@pytest.mark.parametrize("i", range(len(PROMPTS)))
def test_prompt_encoding_equals_the_nodes(kolors_run, i):
    """The node's ChatGLM3 code (THUDM's) and its tokenizer (ChatGLM3's vocabulary, Chinese included) through its
    chatglm3_text_encode: the same token ids, context and pooled vector as the trainer's (diffusers' ChatGLM)."""
    theirs, ours = kolors_run["theirs"], kolors_run["ours"][f"text_{i}"]
    assert torch.equal(theirs[f"text_ids_{i}"], kolors_run["ids"][i])
    ctx, pooled = _rel_err(ours["crossattn"], theirs[f"text_context_{i}"]), _rel_err(ours["pooled"], theirs[f"text_pooled_{i}"])
    print(f"prompt {i}: context rel err {ctx:.2e}, pooled {pooled:.2e}")
    assert ctx < 1e-4 and pooled < 1e-4
