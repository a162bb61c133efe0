"""Benchmark: LoRA training steps of the full-size Kolors UNet through the trainer's own code path, and ChatGLM3-6B's
encoding of a caption batch (the stage before it, when the encoder has the card alone).

Random weights (built on the GPU in the training dtype, nothing read from disk), wrapped in
`trainer.models.kolors.KolorsModel`: SDXL's UNet (2.57B) plus Kolors' 4096 -> 2048 text projection, 5632 added inputs,
256 ChatGLM tokens of context, Kolors' 1100-step schedule. LoRA rank 16 on every transformer linear the trainer targets
(LoCon adds the resnet convs), gradient checkpointing of every resnet and transformer block (or none), cuDNN SDPA off
(DESIGN.md), AdamW on the network, batch 1. The step mirrors trainer/train/loop.py (eps loss, backward, optimizer
step); MFU = FLOP / s / the card's measured bf16 rate (--peak-tflops). `--chatglm` also times ChatGLM3-6B (28 layers,
4096 wide) encoding 8 captions of 256 tokens and reports its peak.

    python3 bench/kolors_step.py --res 1024 --ckpt 1 0 --type lora locon --chatglm   # GPU
    python3 bench/kolors_step.py --tiny                                                # CPU smoke test

Prints one JSON line per case: {"res", "type", "ckpt", "s_per_step", "peak_gib", "tflop_per_step", "mfu", "device"},
and with --chatglm {"stage": "chatglm3", "s_per_batch", "peak_gib", ...}.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sdxl_step import time_unet
from trainer.demo.kolors import chatglm_config, kolors_unet_config
from trainer.models.kolors import KolorsModel, kolors_sigmas


GIB = 1024**3
REAL = dict(widths=(320, 640, 1280), layers=2, depths=(0, 2, 10), context=2048, text_width=4096)
TINY = dict(widths=(32, 64, 128), layers=2, depths=(0, 1, 2), context=64, text_width=256)
REAL_GLM = dict(vocab=65024, hidden=4096, layers=28, ffn=13696, groups=2)
TINY_GLM = dict(vocab=128, hidden=256, layers=2, ffn=192, groups=1)
TOKENS = 256


def _randomize(module: torch.nn.Module, device: torch.device) -> None:
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02, generator=g)
            else:
                p.fill_(1.0)
    module.requires_grad_(False)


def build(cfg_kw: dict, device: torch.device, dtype: torch.dtype) -> KolorsModel:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**kolors_unet_config(**cfg_kw))
    unet = unet.to_empty(device=device).to(dtype)
    _randomize(unet, device)
    model = object.__new__(KolorsModel)  # the UNet alone: predict() and targets() need nothing else
    model.denoiser, model.device, model.dtype, model.vae_scale = unet, device, dtype, 8
    model.sigma_table = kolors_sigmas()
    model._log_sigmas = model.sigma_table.double().log()
    return model


def run(cfg_kw: dict, res: int, net_type: str, ckpt: float, steps: int, device, dtype, peak_tflops: float,
        compile_: bool = False) -> dict:
    model = build(cfg_kw, device, dtype)
    g = torch.Generator().manual_seed(2)
    cond = {"crossattn": torch.randn(1, TOKENS, cfg_kw["text_width"], generator=g),
            "pooled": torch.randn(1, cfg_kw["text_width"], generator=g)}
    return time_unet(model, cond, res, net_type, ckpt, steps, device, peak_tflops, compile_)


def run_chatglm(glm: dict, batch: int, device, dtype) -> dict:
    """ChatGLM3 as the trainer encodes captions (KolorsModel.encode_text's call: left-padded ids, mask, position ids,
    all hidden states), on random ids."""
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = chatglm_config(glm["vocab"], glm["hidden"], glm["layers"], glm["ffn"], glm["groups"])
    with torch.device("meta"):
        enc = ChatGLMModel(ChatGLMConfig(**cfg), empty_init=False)
    enc.output_layer = None  # as the trainer loads it
    enc = enc.to_empty(device=device).to(dtype)
    _randomize(enc, device)
    from diffusers.pipelines.kolors.text_encoder import RotaryEmbedding

    enc.rotary_pos_emb = RotaryEmbedding(cfg["kv_channels"] // 2, original_impl=True).to(device, dtype)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, glm["vocab"], (batch, TOKENS), generator=g).to(device)
    mask = torch.ones(batch, TOKENS, dtype=torch.long, device=device)
    mask[:, : TOKENS // 2] = 0  # half the tokens are left padding, as short captions have
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        with torch.no_grad():
            enc(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"stage": "chatglm3", "batch": batch, "tokens": TOKENS, "s_per_batch": round(sorted(times[1:])[1], 3),
            "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if device.type == "cuda" else None,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", nargs="+", type=int, default=[1024])
    ap.add_argument("--type", nargs="+", default=["lora"])
    ap.add_argument("--ckpt", nargs="+", type=float, default=[1.0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=808.0)
    ap.add_argument("--compile", action="store_true", help="regional torch.compile of the blocks (train.compile)")
    ap.add_argument("--chatglm", action="store_true", help="also time ChatGLM3-6B encoding 8 captions")
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    cfg, glm = REAL, REAL_GLM
    if a.tiny:
        cfg, glm, a.res, a.steps, a.chatglm = TINY, TINY_GLM, [64], 2, True
    device = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
    if a.chatglm:  # first, as in a run: the encoder has the card alone, then leaves
        print(json.dumps(run_chatglm(glm, 8, device, dtype)), flush=True)
    for r in a.res:
        for t in a.type:
            for c in a.ckpt:
                print(json.dumps(run(cfg, r, t, c, a.steps, device, dtype, a.peak_tflops, a.compile)), flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
