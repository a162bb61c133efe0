"""Test helpers for SDXL: tiny real SDXL-structured files, diffusers' pipeline over a loaded model, key renames."""

from __future__ import annotations

from pathlib import Path

import torch

# SDXL's block structure (3 levels, 2 resnets each, transformers of depth 0 / 1 / 2, so the same
# input_blocks / output_blocks numbering as the real model) at tiny widths
TINY_SDXL = dict(widths=(32, 64, 128), layers=2, depths=(0, 1, 2), clip_l_width=32, clip_g_width=64, pooled=32,
                 vae_widths=(32, 32))


def write_tiny_sdxl(folder: Path, full: bool = True, v_pred: bool = False, seed: int = 11) -> dict:
    from trainer.demo.sdxl import write_sdxl_files

    return write_sdxl_files(folder, full=full, v_pred=v_pred, seed=seed, **TINY_SDXL)


def load(cfg: dict, dtype: torch.dtype = torch.float32):
    from trainer.config import ModelConfig
    from trainer.models.sdxl import load_sdxl

    return load_sdxl(ModelConfig(**{k: v for k, v in cfg.items() if k != "arch"}), "cpu", dtype)


def euler_scheduler(v_pred: bool = False):
    """EulerDiscreteScheduler as SDXL base ships it (scheduler_config.json of stable-diffusion-xl-base-1.0)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        interpolation_type="linear", timestep_spacing="leading", steps_offset=1, use_karras_sigmas=False,
        prediction_type="v_prediction" if v_pred else "epsilon",
    )


def pipeline(model, unet=None):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=model.vae, text_encoder=model.clip_l, text_encoder_2=model.clip_g, tokenizer=model.tok_l,
        tokenizer_2=model.tok_g, unet=unet if unet is not None else model.denoiser,
        scheduler=euler_scheduler(model.v_pred),
    )


def comfy_to_kohya(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_down.weight` ->
    `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight`: the two spellings ComfyUI
    treats as one layer (comfy.lora.model_lora_keys_unet). A string rename, no layout knowledge."""
    out = {}
    for k, v in tensors.items():
        assert k.startswith("diffusion_model."), k
        module, _, suffix = k[len("diffusion_model."):].partition(".lora_")
        if not suffix:
            module, _, suffix = k[len("diffusion_model."):].rpartition(".")
            out[f"lora_unet_{module.replace('.', '_')}.{suffix}"] = v
        else:
            out[f"lora_unet_{module.replace('.', '_')}.lora_{suffix}"] = v
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
