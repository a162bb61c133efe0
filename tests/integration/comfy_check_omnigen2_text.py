"""Runs INSIDE ComfyUI's own python: a small Qwen2.5 file (keys `model.layers.N...`, as ComfyUI's
qwen_2.5_vl_fp16.safetensors) through ComfyUI's own OmniGen2 text encoder, as its CLIPLoader (type omnigen2) and
CLIPTextEncode nodes run it: comfy.sd.load_text_encoder_state_dicts(clip_type=OMNIGEN2) detects the file
(QWEN25_3B: k_proj bias 256 wide) and builds comfy.sd.CLIP with Omnigen2Tokenizer (its llama_template, its own
qwen25_tokenizer folder) and Omnigen2Model (Qwen25_3B, layer "last", pad 151643, attention masks); each caption is
tokenized with clip.tokenize and encoded with clip.encode_from_tokens_scheduled, in fp32 on the CPU.

    cd <ComfyUI> && <comfy python> comfy_check_omnigen2_text.py --qwen qwen.safetensors --config cfg.json \
        --captions captions.json --out result.safetensors --report result.json

ComfyUI's Qwen25_3BConfig is full size (2048 wide, 36 layers); the small sizes in cfg.json reach it through
ComfyUI's own override, model_options["{model_name}_model_config"] (sd1_clip.SDClipModel; SD1ClipModel names
the Omnigen2 encoder "qwen25_3b", so the key is "qwen25_3b_model_config"). head_dim stays Qwen25_3BConfig's 128
(a class attribute, not a field).

Outputs per caption i: `cond.i` (1, n, d) what CLIPTextEncode puts in the conditioning, `mask.i` ComfyUI's attention
mask when it returns one. Report: `tokens` (ids per caption, weights dropped), `weights_all_one`, `te_model` (what
detection chose), `config` (the Qwen25_3BConfig built), `layer`, `missing` / `unexpected` (the module's keys against
the file's, `visual.*` aside), `load_log` (what ComfyUI logged as missing or unexpected).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", default=os.getcwd())
    ap.add_argument("--qwen", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--captions", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--report", required=True)
    a = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from comfy_boot import boot

    capture = boot(a.comfyui)
    import torch
    from safetensors.torch import save_file

    import comfy.sd
    import comfy.utils

    torch.manual_seed(0)
    small = json.loads(open(a.config, encoding="utf-8").read())
    captions = json.loads(open(a.captions, encoding="utf-8").read())
    sd = comfy.utils.load_torch_file(a.qwen, safe_load=True)
    te_model = comfy.sd.detect_te_model(sd)
    mark = len(capture.messages)
    clip = comfy.sd.load_text_encoder_state_dicts(
        [sd], None, clip_type=comfy.sd.CLIPType.OMNIGEN2,
        model_options={"dtype": torch.float32, "qwen25_3b_model_config": small})
    load_log = capture.messages[mark:]
    inner = clip.cond_stage_model.qwen25_3b
    cfg = inner.transformer.model.config
    # every weight the module has came from the file (load_sd's missing keys are only logged)
    m_keys = set(inner.transformer.state_dict().keys())
    f_keys = {k for k in sd if not k.startswith("visual.")}
    report = {"te_model": str(te_model), "clip_class": type(clip.cond_stage_model).__name__,
              "tokenizer_class": type(clip.tokenizer).__name__,
              "config": {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                          "num_hidden_layers", "num_attention_heads",
                                                          "num_key_value_heads", "head_dim", "rope_theta",
                                                          "rms_norm_eps", "final_norm")},
              "layer": inner.layer, "dtype": str(next(inner.transformer.parameters()).dtype),
              "missing": sorted(m_keys - f_keys)[:20], "unexpected": sorted(f_keys - m_keys)[:20],
              "load_log": [m for m in load_log if "missing" in m.lower() or "unexpected" in m.lower()
                           or "left over" in m.lower()][:20],
              "tokens": [], "weights_all_one": [], "cond_keys": []}
    out = {}
    for i, caption in enumerate(captions):
        tokens = clip.tokenize(caption)
        pairs = tokens["qwen25_3b"]
        report["tokens"].append([[int(t) for t, _ in batch] for batch in pairs])
        report["weights_all_one"].append(all(w == 1.0 for batch in pairs for _, w in batch))
        cond, extra = clip.encode_from_tokens_scheduled(tokens)[0]
        out[f"cond.{i}"] = cond.float().contiguous()
        if extra.get("attention_mask") is not None:
            out[f"mask.{i}"] = extra["attention_mask"].float().contiguous()
        report["cond_keys"].append(sorted(extra.keys()))
    save_file(out, a.out)
    with open(a.report, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
