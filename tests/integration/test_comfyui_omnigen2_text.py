"""OmniGen2's prompt encoding against real ComfyUI: the trainer's OmniGen2Model.encode_text (load_qwen25 on a
ComfyUI-style `model.`-prefixed Qwen2.5 file, qwen25_tokenizer on ComfyUI's own qwen25_tokenizer folder, TEMPLATE,
no special tokens, right padding to max_tokens) gives, for each caption of a batch, the token ids ComfyUI's
Omnigen2Tokenizer gives and, at the positions its mask marks valid, the hidden states ComfyUI's OmniGen2 text
encoder (CLIPLoader type omnigen2 + CLIPTextEncode: comfy.sd.CLIP, layer "last", after the final norm) gives.

The Qwen file is small and random (trainer.demo.omnigen2.make_qwen_file, 2 heads of 128 and 2 KV heads so
ComfyUI's detection reads it as Qwen2.5-VL-3B, its vocab that of ComfyUI's real tokenizer, norm weights randomized so
the final norm's weight shows), fp32 on the CPU; ComfyUI builds it at the small size through its own
model_options["qwen25_3b_model_config"] override (comfy_check_omnigen2_text.py). Needs COMFYUI_PATH (comfy_env.py).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from integration.comfy_env import comfy_install

HERE = Path(__file__).resolve().parent
TOL = 1e-4  # max |a - b| / max |b|, fp32
HIDDEN, LAYERS, HEADS, KV_HEADS, FF = 64, 2, 2, 2, 128
# different lengths, punctuation, a newline, non-ASCII; no ( ) [ ] or "embedding:" (ComfyUI's prompt-weight syntax)
CAPTIONS = [
    "a cat",
    "A photo of a red fox standing in deep snow at dusk, soft light, 35mm film grain, shallow depth of field.",
    "Replace the background with a café in Paris;\nkeep the woman's pose — and her blue scarf!",
]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> dict:
    comfy, python = comfy_install("ComfyUI OmniGen2 text test")
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from trainer.demo.omnigen2 import make_qwen_file
    from trainer.models.omnigen2 import TEMPLATE, OmniGen2Model
    from trainer.models.qwen25 import load_qwen25, qwen25_tokenizer

    tmp = tmp_path_factory.mktemp("comfy_omnigen2_text")
    torch.set_num_threads(4)
    tok_dir = comfy / "comfy" / "text_encoders" / "qwen25_tokenizer"
    vocab = len(AutoTokenizer.from_pretrained(str(tok_dir)))
    qwen_file = tmp / "qwen_2.5_vl_small.safetensors"
    make_qwen_file(qwen_file, vocab, HIDDEN, layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS)
    sd = load_file(str(qwen_file))
    g = torch.Generator().manual_seed(3)
    for k in sd:
        if k.endswith("norm.weight"):
            sd[k] = 1 + 0.5 * torch.randn(sd[k].shape, generator=g)
    save_file(sd, str(qwen_file))
    cfg = {"vocab_size": vocab, "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_hidden_layers": LAYERS,
           "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS}
    cfg_file, cap_file = tmp / "config.json", tmp / "captions.json"
    cfg_file.write_text(json.dumps(cfg))
    cap_file.write_text(json.dumps(CAPTIONS))

    # the trainer's side: what load_omnigen2 builds for the text (tokenizer from model.tokenizer_paths[0])
    qwen = load_qwen25(qwen_file, torch.float32)
    tokenizer = qwen25_tokenizer(tok_dir, [], [])
    model = OmniGen2Model(None, None, qwen, tokenizer, torch.device("cpu"), torch.float32, max_tokens=96)
    pre_norm = []  # the last layer's output before the final norm: the check must tell them apart
    hook = qwen.norm.register_forward_hook(lambda mod, args, out: pre_norm.append(args[0].detach().clone()))
    cond = model.encode_text(CAPTIONS)  # one batch, right-padded to max_tokens
    hook.remove()
    ids = [tokenizer(TEMPLATE.format(c), add_special_tokens=False).input_ids for c in CAPTIONS]
    batch_ids = tokenizer([TEMPLATE.format(c) for c in CAPTIONS], padding="max_length", max_length=96,
                          truncation=True, add_special_tokens=False).input_ids

    out, report = tmp / "result.safetensors", tmp / "result.json"
    cmd = [str(python), str(HERE / "comfy_check_omnigen2_text.py"), "--comfyui", str(comfy), "--qwen", str(qwen_file),
           "--config", str(cfg_file), "--captions", str(cap_file), "--out", str(out), "--report", str(report)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    proc = subprocess.run(cmd, cwd=str(comfy), env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, \
        f"ComfyUI side failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return dict(report=json.loads(report.read_text()), theirs=load_file(str(out)), cond=cond, pre_norm=pre_norm[0], ids=ids,
                batch_ids=batch_ids, cfg=cfg, qwen=qwen)


def test_comfyui_builds_the_small_qwen25_3b_from_the_file(text_run):
    r, cfg = text_run["report"], text_run["cfg"]
    assert r["te_model"].endswith("QWEN25_3B") and r["clip_class"] == "Omnigen2TEModel_"
    assert r["tokenizer_class"] == "Omnigen2Tokenizer" and r["layer"] == "last"
    assert {k: r["config"][k] for k in cfg} == cfg
    assert r["config"]["head_dim"] == 128 and r["config"]["final_norm"] is True
    assert r["config"]["rope_theta"] == text_run["qwen"].config.rope_parameters["rope_theta"]
    assert r["config"]["rms_norm_eps"] == text_run["qwen"].config.rms_norm_eps
    assert r["dtype"] == "torch.float32"
    assert r["missing"] == [] and r["unexpected"] == [], (r["missing"], r["unexpected"], r["load_log"])


def test_token_ids_equal_comfyuis(text_run):
    r = text_run["report"]
    for i, caption in enumerate(CAPTIONS):
        theirs = r["tokens"][i]
        assert len(theirs) == 1, f"ComfyUI split caption {i} into {len(theirs)} sections"
        assert r["weights_all_one"][i]
        assert text_run["ids"][i] == theirs[0], caption
        n = len(theirs[0])
        assert text_run["batch_ids"][i][:n] == theirs[0]  # the batch's padded ids begin with them


def test_mask_lengths_equal_comfyuis_token_counts(text_run):
    r, mask, theirs = text_run["report"], text_run["cond"]["mask"], text_run["theirs"]
    lengths = [len(r["tokens"][i][0]) for i in range(len(CAPTIONS))]
    assert len(set(lengths)) == len(CAPTIONS)  # the batch really pads
    for i, n in enumerate(lengths):
        assert int(mask[i].sum()) == n and bool(mask[i, :n].all())  # right padding, n valid
        assert theirs[f"cond.{i}"].shape[1] == n  # ComfyUI never pads a single prompt
        if f"mask.{i}" in theirs:
            assert theirs[f"mask.{i}"].shape[-1] == n and bool((theirs[f"mask.{i}"] == 1).all())


def test_valid_hidden_states_equal_comfyuis(text_run):
    ctx, mask, theirs = text_run["cond"]["context"], text_run["cond"]["mask"], text_run["theirs"]
    for i in range(len(CAPTIONS)):
        ours = ctx[i][mask[i].bool()].unsqueeze(0)
        ref = theirs[f"cond.{i}"]
        assert ours.shape == ref.shape, (i, ours.shape, ref.shape)
        err = _rel_err(ours, ref)
        assert err < TOL, f"caption {i}: rel max err {err:.3g}"


def test_the_check_tells_the_final_norm_apart(text_run):
    """ComfyUI's layer "last" is Llama2_'s output after its final RMSNorm; the state before it differs."""
    pre, mask, theirs = text_run["pre_norm"], text_run["cond"]["mask"], text_run["theirs"]
    assert _rel_err(pre[0][mask[0].bool()].unsqueeze(0), theirs["cond.0"]) > 0.1
