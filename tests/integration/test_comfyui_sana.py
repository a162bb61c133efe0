"""Sana against real ComfyUI with ComfyUI_ExtraModels, the custom node Sana users run (ComfyUI core has no Sana): its
loader (Sana.loader.load_sana, SanaMS) loads the trainer's original-layout file with nothing missing, computes the
trainer's velocity, and every network type the trainer saves (LoRA, LoCon with the feed-forward's 1x1 convs, LoHa,
LoKr, DoRA) loads through ComfyUI's LoRA loader onto SanaMS's module names with zero unloaded keys and computes what
the trainer computed with the network attached.

Needs COMFYUI_PATH (a ComfyUI whose custom_nodes holds ComfyUI_ExtraModels) and COMFYUI_PYTHON (comfy_env.py);
skipped otherwise. One ComfyUI process per model (comfy_check_sana.py); a Sana 1.5-style model (q/k norms) and a
Sana 1.0-style one (none).

SanaMS reads the caption length from the context's non-zero rows (y_lens) and, in a batch, uses the second item's
length for all: compared at batch 1, with the padded rows zeroed as the node's SanaTextEncode does (emb * mask).
It truncates the timestep to an integer (timestep.long()): sigma 0.625 gives exactly 625 on both sides.

ExtraModels' Sana 1.5 (cross_norm: its SanaMS1.5 presets) builds the cross-attention q/k RMSNorms and loads their
weights, but its MultiHeadCrossAttention.forward never applies them ("not used for now"; only the Sprint presets'
"vanilla" cross-attention does). NVlabs' Sana and diffusers apply them, and so does the trainer: with q/k norms the
node's output is the trainer's with the cross-attention norms left out, not the trainer's. Asserted as such (the
network comparisons run against the trainer with those norms left out, so that the LoRA mapping is still checked to
1e-4), and that the difference is real.
"""

from __future__ import annotations

import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from integration.comfy_env import comfy_install
from integration.test_comfyui_flux_lora import CASES, _rel_err
from integration.test_comfyui_kolors import _randomize

HERE = Path(__file__).resolve().parent
NODE = "ComfyUI_ExtraModels"
TOL = 1e-4
TOKENS = 7  # the caption's tokens of the 300
# every network type; LoCon, LoHa and LoKr also adapt the feed-forward's 1x1 convs (a conv rank); DoRA is linear only
# (the trainer refuses DoRA on convs)
SANA_CASES = {
    "lora": dict(type_name="lora"),
    "locon": dict(type_name="locon"),
    "loha": dict(type_name="loha", conv_rank=4, conv_alpha=8.0),
    "lokr": dict(CASES["lokr"][0], conv_rank=4, conv_alpha=8.0),
    "lokr_full": dict(CASES["lokr_full"][0]),
    "dora": dict(type_name="dora"),
}


def _install() -> tuple[Path, Path]:
    comfy, python = comfy_install("ComfyUI Sana test")
    if not (comfy / "custom_nodes" / NODE / "Sana" / "loader.py").is_file():
        pytest.skip(f"the Sana test needs {NODE} (with its Sana/loader.py) in {comfy}/custom_nodes"
                    " (ComfyUI core has no Sana)")
    return comfy, python


@contextmanager
def _without_cross_norms(transformer, drop: bool):
    """The trainer's model as ExtraModels runs it: the cross-attention q/k norms not applied (diffusers' processor
    skips a norm that is None)."""
    saved = [(b.attn2, b.attn2.norm_q, b.attn2.norm_k) for b in transformer.transformer_blocks]
    if drop:
        for attn, _, _ in saved:
            attn.norm_q = attn.norm_k = None
    try:
        yield
    finally:
        for attn, q, k in saved:
            attn.norm_q, attn.norm_k = q, k


def _unet_config(cfg: dict) -> dict:
    """The node's unet_config (Sana/conf.py's shape) for the diffusers config `cfg`."""
    qk = cfg["qk_norm"] is not None
    return {"in_channels": cfg["in_channels"], "depth": cfg["num_layers"], "hidden_size": cfg["cross_attention_dim"],
            "patch_size": cfg["patch_size"], "num_heads": cfg["num_cross_attention_heads"],
            "linear_head_dim": cfg["attention_head_dim"], "model_max_length": 300, "y_norm": True, "qk_norm": qk,
            "cross_norm": qk, "attn_type": "linear", "ffn_type": "glumbconv", "mlp_ratio": cfg["mlp_ratio"],
            "mlp_acts": ["silu", "silu", None], "use_pe": False, "pred_sigma": False, "learn_sigma": False,
            "fp32_attention": True, "caption_channels": cfg["caption_channels"]}


@pytest.fixture(scope="module", params=[True, False], ids=["qk_norm", "no_qk_norm"])
def sana_run(request, tmp_path_factory):
    comfy, python = _install()
    from safetensors.torch import load_file

    from trainer.demo.sana import sana_diffusers_config, write_sana_transformer
    from trainer.fileio import save_safetensors_atomic
    from trainer.models.sana import SanaModel, load_sana_transformer
    from trainer.networks.network import Network

    qk = request.param
    tmp = tmp_path_factory.mktemp("comfy_sana")
    torch.set_num_threads(1)
    cfg = sana_diffusers_config(hidden=64, layers=2, cross_heads=2, caption=64, qk_norm=qk)
    model_file = tmp / "sana_tiny.safetensors"
    write_sana_transformer(model_file, cfg)
    (tmp / "unet_config.json").write_text(json.dumps(_unet_config(cfg)))
    transformer = load_sana_transformer(model_file, torch.float32).requires_grad_(False)
    model = SanaModel(transformer, None, None, None, torch.device("cpu"), torch.float32)

    g = torch.Generator().manual_seed(11)
    mask = torch.zeros(1, 300)
    mask[:, :TOKENS] = 1
    sigma = torch.tensor([0.625])
    inputs = {"latents": torch.randn(1, 32, 6, 4, generator=g), "sigma": sigma,
              # the padded rows zeroed, as the node's text encoder gives them (SanaMS counts the non-zero rows)
              "context": torch.randn(1, 300, 64, generator=g) * mask[..., None]}
    cond = {"context": inputs["context"], "mask": mask}

    def predict(as_node: bool = False) -> torch.Tensor:
        with torch.no_grad(), _without_cross_norms(transformer, as_node and qk):
            return model.predict(inputs["latents"], sigma, cond).float()

    targets = model.targets()
    # `ours`: the trainer's (NVlabs', diffusers') Sana; `as_node`: without the cross-attention q/k norms, as the node
    # runs it (the same as `ours` without q/k norms)
    ours, as_node, files, effect, patched = {"base": predict()}, {"base": predict(True)}, {}, {}, {}
    for i, (case, kwargs) in enumerate(SANA_CASES.items()):
        net = Network(targets, rank=4, alpha=8.0, **kwargs)
        _randomize(net, targets, torch.Generator().manual_seed(3 + i))
        files[case] = tmp / f"{case}.safetensors"
        save_safetensors_atomic(net.export(), files[case])
        patched[case] = sorted(f"{k}.weight" for k in net.targets)
        net.attach()
        try:
            ours[case], as_node[case] = predict(), predict(True)
        finally:
            net.detach()
        effect[case] = _rel_err(as_node[case], as_node["base"])
    save_safetensors_atomic(inputs, tmp / "inputs.safetensors")

    out, report = tmp / "out.safetensors", tmp / "report.json"
    cmd = [str(python), str(HERE / "comfy_check_sana.py"), "--comfyui", str(comfy), "--model", str(model_file),
           "--unet-config", str(tmp / "unet_config.json"), "--inputs", str(tmp / "inputs.safetensors"),
           "--out", str(out), "--report", str(report)]
    for case, f in files.items():
        cmd += ["--lora", f"{case}={f}"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(cmd, cwd=str(comfy), env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"ComfyUI side failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return dict(report=json.loads(report.read_text()), theirs=load_file(str(out)), ours=ours, as_node=as_node,
                effect=effect, patched=patched, qk_norm=qk)


def test_nodes_loader_takes_the_whole_file(sana_run):
    r = sana_run["report"]
    assert r["node_loaded"] and "SanaCheckpointLoader" in r["node_classes"]
    assert r["model_class"] == "EXM_Sana_Model" and r["unet_class"] == "SanaMS" and r["model_type"] == "FLOW"
    assert r["sampling"] == {"bases": ["ModelSamplingDiscreteFlow", "CONST"], "shift": 3.0, "multiplier": 1000.0}
    assert r["weight_dtype"] == "torch.float32"
    (load,) = r["load"]
    assert load["unexpected"] == [], load
    # the node deletes `pos_embed` from every file before loading (loader.py), so its own buffer is never loaded:
    # zeros, read only with use_pe (2K / 4K); the caption-dropout table y_embedding is loaded
    assert load["missing"] == ["pos_embed"], load


def test_nodes_model_gives_the_trainers_velocity(sana_run):
    r, theirs, ours = sana_run["report"], sana_run["theirs"], sana_run["ours"]
    assert r["timestep"] == [625.0]
    err = _rel_err(theirs["base"], sana_run["as_node"]["base"])
    print(f"Sana base rel err {err:.2e}")
    assert err < TOL and _rel_err(theirs["base_after"], theirs["base"]) < 1e-6
    faithful = _rel_err(theirs["base"], ours["base"])
    if sana_run["qk_norm"]:
        # the node leaves out the cross-attention q/k norms (module docstring): its Sana 1.5 is not NVlabs'
        print(f"node vs trainer with its cross-attention norms: rel diff {faithful:.2e}")
        assert faithful > 100 * err
    else:
        assert faithful == err


@pytest.mark.parametrize("case", list(SANA_CASES))
def test_network_type_loads_fully_and_matches(sana_run, case):
    rep = sana_run["report"]["loras"][case]
    assert rep["not_loaded"] == [], "\n".join(rep["not_loaded"][:20])
    assert rep["patched_keys"] == sana_run["patched"][case]
    if SANA_CASES[case].get("type_name") == "locon" or "conv_rank" in SANA_CASES[case]:
        assert any(".mlp.inverted_conv.conv." in k for k in rep["patched_keys"])
    err = _rel_err(sana_run["theirs"][case], sana_run["as_node"][case])
    print(f"{case}: rel err {err:.2e}, effect {sana_run['effect'][case]:.3f}")
    assert err < TOL and sana_run["effect"][case] > 100 * err
