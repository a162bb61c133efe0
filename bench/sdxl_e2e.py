"""End-to-end benchmark through `python -m trainer`: a full-size random SDXL checkpoint on disk, a job at 1024² and
the trainer's own metrics.jsonl. Reports median s/step after warm-up, peak GiB and MFU per variant.

The checkpoint is one file in the layout users keep in ComfyUI's models/checkpoints (UNet under
model.diffusion_model., CLIP-L, OpenCLIP-G, VAE): the UNet at SDXL base's size (2.57B parameters: widths 320 / 640 /
1280, transformer depths 0 / 2 / 10), CLIP-L (768) and CLIP-G (1280, projection 1280) at their real widths but one
layer each, a small VAE with SDXL's 4 latent channels, a word-level tokenizer. The UNet's weights are drawn in bf16
on the card (e2e_run.random_state). 4 images at 1024², LoRA rank 16, AdamW, batch 1.
FLOPs per step: torch's FlopCounterMode over the same step on the meta device (e2e_run.step_flops; bench/sdxl_step.py
counts the same step on the card: 20.87 TFLOP checkpointed, 14.74 without, at 1024²).

    python3 bench/sdxl_e2e.py --work /tmp/sdxl_e2e --steps 30 [--variants ckpt none ckpt_graph none_graph]
    python3 bench/sdxl_e2e.py --tiny          # CPU smoke test: tiny files, 3 steps (cuda_graphs variants skipped)
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import e2e_run
from sdxl_step import REAL, TINY

VARIANTS = {
    "ckpt": {},  # gradient checkpointing of every block (the job's default)
    "none": {"gradient_checkpointing": False},
    # train.cuda_graphs: each step's forward and backward replayed from a CUDA graph per bucket shape
    "ckpt_graph": {"cuda_graphs": True},
    "none_graph": {"gradient_checkpointing": False, "cuda_graphs": True},
    "auto": {"gradient_checkpointing": "auto"},
    "compile": {"compile": True},
    "compile_none": {"compile": True, "gradient_checkpointing": False},
    "compile_graph": {"compile": True, "cuda_graphs": True},
    "compile_none_graph": {"compile": True, "gradient_checkpointing": False, "cuda_graphs": True},
}
DEFAULT = ["ckpt", "none", "ckpt_graph", "none_graph", "compile", "compile_none"]
# CLIP-L and CLIP-G widths (they sum to the UNet's context) and CLIP-G's projection (the pooled width)
TEXT = {"real": (768, 1280), "tiny": (32, 64)}


def unet_cfg(tiny: bool) -> dict:
    from trainer.demo.sdxl import sdxl_unet_config

    return sdxl_unet_config(**(TINY if tiny else REAL))


def pooled_width(cfg: dict) -> int:
    """CLIP-G's projection: the UNet's pooled input less the size ids."""
    from trainer.models.sdxl_layout import NUM_TIME_IDS, TIME_ID_CHANNELS

    return cfg["projection_class_embeddings_input_dim"] - NUM_TIME_IDS * TIME_ID_CHANNELS


def build_files(folder: Path, tiny: bool, res: int) -> dict:
    """The checkpoint, tokenizer and dataset (once per folder); returns the `model:` config."""
    from diffusers import UNet2DConditionModel

    from trainer.demo import make_dataset, tiny as demo_tiny
    from trainer.fileio import save_safetensors_atomic
    from trainer.models.sdxl_layout import CLIP_G_PREFIX, CLIP_L_PREFIX, VAE_PREFIX, diffusers_to_ldm, \
        transformers_to_open_clip

    folder.mkdir(parents=True, exist_ok=True)
    path, tok_dir = folder / "sdxl-random.safetensors", folder / "tokenizer"
    model = {"arch": "sdxl", "name_or_path": str(path), "tokenizer_paths": [str(tok_dir)]}
    if path.exists() and tok_dir.exists() and (folder / "data").exists():
        return model
    t0 = time.time()
    dtype = torch.float32 if tiny else torch.bfloat16
    tok = demo_tiny.build_tokenizer(tok_dir, "clip")
    cfg = unet_cfg(tiny)
    with torch.device("meta"):
        config = UNet2DConditionModel(**cfg).config
    unet = e2e_run.random_state(demo_tiny.module_shapes(UNet2DConditionModel, cfg), dtype, seed=11)
    sd = {f"model.diffusion_model.{k}": v for k, v in diffusers_to_ldm(unet, config).items()}
    l_width, g_width = TEXT["tiny" if tiny else "real"]
    clip_l = demo_tiny.clip_state(len(tok), l_width, 1, 12, tok.bos_token_id, tok.eos_token_id)
    clip_g = demo_tiny.clip_state(len(tok), g_width, 1, 13, tok.bos_token_id, tok.eos_token_id,
                                  projection=pooled_width(cfg), act="gelu")
    sd.update({f"{CLIP_L_PREFIX}{k}": v.to(dtype) for k, v in clip_l.items()})
    sd.update({f"{CLIP_G_PREFIX}{k}": v.to(dtype) for k, v in transformers_to_open_clip(clip_g).items()})
    vae = demo_tiny.random_weights(demo_tiny.ldm_vae_shapes([32, 32, 32, 32], 1, 4), 14, dtype)
    sd.update({f"{VAE_PREFIX}{k}": v for k, v in vae.items()})
    save_safetensors_atomic(sd, path)
    make_dataset(folder / "data", n=4, size=(res, res) if tiny else (1024, 1024))
    params = sum(v.numel() for v in unet.values()) / 1e9
    print(f"# files written in {time.time() - t0:.0f}s (UNet {params:.2f}B parameters drawn on"
          f" {e2e_run.build_device().type})", flush=True)
    return model


def count_flops(tiny: bool, res: int, ckpt: float) -> float:
    """FLOPs of one LoRA step at res² (77 text tokens), counted on the meta device."""
    from diffusers import UNet2DConditionModel

    from trainer.models.sdxl import SDXLModel

    cfg = unet_cfg(tiny)
    unet = e2e_run.meta_module(UNet2DConditionModel, cfg, torch.bfloat16)
    model = SDXLModel(unet, e2e_run.VAE_8X, None, None, None, None, torch.device("meta"), torch.bfloat16)
    cond = {"crossattn": torch.zeros(1, 77, cfg["cross_attention_dim"]), "pooled": torch.zeros(1, pooled_width(cfg))}
    return e2e_run.step_flops(model, (1, 4, res // 8, res // 8), cond, ckpt)


def main() -> None:
    e2e_run.bench_main("sdxl", VARIANTS, lambda folder, a: build_files(folder, a.tiny, a.res),
                       lambda a, ckpt: count_flops(a.tiny, a.res, ckpt), lambda a, v: f"sdxl_e2e_{v}_{a.res}", DEFAULT)


if __name__ == "__main__":
    main()
