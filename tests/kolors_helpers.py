"""Test helpers for Kolors: tiny real Kolors-structured files, diffusers' KolorsPipeline over a loaded model."""

from __future__ import annotations

from pathlib import Path

import torch

# SDXL's block structure at tiny widths, with Kolors' text projection (ChatGLM 256 wide: 2 heads of 128 sharing one
# key/value group, as ChatGLM3-6B's 32 heads share 2)
TINY_KOLORS = dict(widths=(32, 64, 128), layers=2, depths=(0, 1, 2), context=64, text_width=256, text_layers=2,
                   ffn=192, groups=1, vae_widths=(32, 32))


def write_tiny_kolors(folder: Path, layout: str = "diffusers", seed: int = 21) -> dict:
    from trainer.demo.kolors import write_kolors_files

    return write_kolors_files(folder, layout=layout, seed=seed, **TINY_KOLORS)


def load(cfg: dict, dtype: torch.dtype = torch.float32):
    from trainer.config import ModelConfig
    from trainer.models.kolors import load_kolors

    return load_kolors(ModelConfig(**{k: v for k, v in cfg.items() if k != "arch"}), "cpu", dtype)


def euler_scheduler():
    """EulerDiscreteScheduler as Kolors ships it (its scheduler_config.json: 1100 steps, betas 0.00085..0.014)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1100, beta_start=0.00085, beta_end=0.014, beta_schedule="scaled_linear",
        interpolation_type="linear", timestep_spacing="leading", steps_offset=1, use_karras_sigmas=False,
        prediction_type="epsilon",
    )


def pipeline(model, unet=None, text_encoder=None):
    from diffusers import KolorsPipeline

    return KolorsPipeline(vae=model.vae, text_encoder=text_encoder if text_encoder is not None else model.chatglm,
                          tokenizer=model.tokenizer, unet=unet if unet is not None else model.denoiser,
                          scheduler=euler_scheduler())
