"""End-to-end benchmark through `python -m trainer`: full-size random SD 3.5 Large files on disk, a job at 1024² and
the trainer's own metrics.jsonl. Reports median s/step after warm-up, peak GiB and MFU per variant.

The files are the ones users keep in ComfyUI's models folders: the MMDiT as a bare diffusion_models file in the
original layout at SD 3.5 Large's size (8.06B parameters: 38 blocks of width 2432, heads of 64, qk-norm), drawn in
bf16 on the card (e2e_run.random_state); CLIP-L (768), CLIP-G (1280) and T5-XXL (4096) text_encoders files at their
real widths but one layer each; a small VAE with SD3's 16 latent channels; word-level tokenizers. 4 images at
1024², LoRA rank 16, AdamW, batch 1, 77 CLIP + 256 T5 text tokens (the trainer's default t5_max_length).
FLOPs per step: torch's FlopCounterMode over the same step on the meta device (e2e_run.step_flops).

    python3 bench/sd3_e2e.py --work /tmp/sd3_e2e --steps 30 [--variants base compile compile_graph fp8_compile]
    python3 bench/sd3_e2e.py --tiny          # CPU smoke test: tiny files, 3 steps (cuda_graphs variants skipped)
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import e2e_run
from sd3_step import VARIANTS as SIZES

VARIANTS = {
    "base": {},  # gradient checkpointing of every block (the job's default)
    "compile": {"compile": True},
    "ckpt0": {"gradient_checkpointing": False},
    "compile_ckpt0": {"compile": True, "gradient_checkpointing": False},
    # train.cuda_graphs: each step's forward and backward replayed from a CUDA graph per bucket shape
    "graph": {"cuda_graphs": True},
    "compile_graph": {"compile": True, "cuda_graphs": True},
    "compile_auto": {"compile": True, "gradient_checkpointing": "auto"},
    # model.quantize: block linears stored in fp8
    "fp8": {"model": {"quantize": True}},
    "fp8_compile": {"compile": True, "model": {"quantize": True}},
}
DEFAULT = ["base", "compile", "compile_graph", "fp8_compile"]
# CLIP-L, CLIP-G widths (= their projections: side by side they fill the pooled input) and T5's token count
TEXT = {"real": (768, 1280, 256), "tiny": (32, 32, 16)}


def mmdit_cfg(tiny: bool) -> dict:
    from trainer.demo.sd3 import comfyui_sized_config, sd3_diffusers_config

    # tiny: the smallest MMDiT ComfyUI (and the trainer's detection) takes as SD3, 2 blocks of width 128
    return comfyui_sized_config() if tiny else sd3_diffusers_config(**SIZES["large"])


def build_files(folder: Path, tiny: bool, res: int) -> dict:
    """The transformer, text encoder, VAE and tokenizer files and the dataset (once per folder); returns the
    `model:` config."""
    from diffusers import SD3Transformer2DModel

    from trainer.demo import make_dataset, tiny as demo_tiny
    from trainer.fileio import save_safetensors_atomic
    from trainer.models.sd3_layout import diffusers_to_original

    folder.mkdir(parents=True, exist_ok=True)
    paths = {n: folder / f"sd35_large_random_{n}.safetensors" for n in ("transformer", "clip_l", "clip_g", "t5", "vae")}
    tok_clip, tok_t5 = folder / "tokenizer", folder / "tokenizer_t5"
    l_width, g_width, t5_tokens = TEXT["tiny" if tiny else "real"]
    model = {"arch": "sd3", "name_or_path": str(paths["transformer"]), "vae_path": str(paths["vae"]),
             "text_encoder_paths": [str(paths[n]) for n in ("clip_l", "clip_g", "t5")],
             "tokenizer_paths": [str(tok_clip), str(tok_t5)], "t5_max_length": t5_tokens}
    if all(p.exists() for p in paths.values()) and (folder / "data").exists():
        return model
    t0 = time.time()
    dtype = torch.float32 if tiny else torch.bfloat16
    ct = demo_tiny.build_tokenizer(tok_clip, "clip")
    tt = demo_tiny.build_tokenizer(tok_t5, "t5")
    cfg = mmdit_cfg(tiny)
    sd = e2e_run.random_state(demo_tiny.module_shapes(SD3Transformer2DModel, cfg), dtype, seed=21)
    params = sum(v.numel() for v in sd.values()) / 1e9
    sd = diffusers_to_original(sd, cfg)
    save_safetensors_atomic(sd, paths["transformer"])
    del sd
    for n, width, seed in (("clip_l", l_width, 22), ("clip_g", g_width, 23)):
        clip = demo_tiny.clip_state(len(ct), width, 1, seed, ct.bos_token_id, ct.eos_token_id, projection=width)
        save_safetensors_atomic({k: v.to(dtype) for k, v in clip.items()}, paths[n])
    d = cfg["joint_attention_dim"]
    t5 = dict(d_model=d, heads=d // 64, d_kv=64, d_ff=10240) if not tiny else dict(d_model=d)
    demo_tiny.make_t5_file(paths["t5"], len(tt), layers=1, seed=24, dtype=dtype, **t5)
    vae = demo_tiny.random_weights(demo_tiny.ldm_vae_shapes([32, 32, 32, 32], 1, cfg["in_channels"]), 25, dtype)
    save_safetensors_atomic(vae, paths["vae"])
    make_dataset(folder / "data", n=4, size=(res, res) if tiny else (1024, 1024))
    print(f"# files written in {time.time() - t0:.0f}s (MMDiT {params:.2f}B parameters drawn on"
          f" {e2e_run.build_device().type})", flush=True)
    return model


def count_flops(tiny: bool, res: int, ckpt: float) -> float:
    """FLOPs of one LoRA step at res² (77 CLIP + the T5 tokens), counted on the meta device."""
    from diffusers import SD3Transformer2DModel

    from trainer.models.sd3 import SD3Model, use_original_modulation_order

    cfg = mmdit_cfg(tiny)
    t5_tokens = TEXT["tiny" if tiny else "real"][2]
    mmdit = use_original_modulation_order(e2e_run.meta_module(SD3Transformer2DModel, cfg, torch.bfloat16))
    model = SD3Model(mmdit, None, None, None, None, None, None, None, t5_tokens, torch.device("meta"), torch.bfloat16)
    cond = {"context": torch.zeros(1, 77 + t5_tokens, cfg["joint_attention_dim"]),
            "pooled": torch.zeros(1, cfg["pooled_projection_dim"])}
    return e2e_run.step_flops(model, (1, cfg["in_channels"], res // 8, res // 8), cond, ckpt)


def main() -> None:
    e2e_run.bench_main("sd3", VARIANTS, lambda folder, a: build_files(folder, a.tiny, a.res),
                       lambda a, ckpt: count_flops(a.tiny, a.res, ckpt), lambda a, v: f"sd35_large_e2e_{v}_{a.res}",
                       DEFAULT)


if __name__ == "__main__":
    main()
