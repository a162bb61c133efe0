"""One preparation for every model, whatever its backend and whoever loaded it (the CLI's loaders or a host
such as ComfyUI handing over its own MODEL): the same job gives the same prepared model.

Two phases, around the encoding of the dataset:
  before: fp8 storage of the block weights (`model.quantize`), the attention backend, gradient checkpointing,
          and the encoders (text, VAE) on the training device, alone there;
  after:  the text encoders leave the card (released, or parked on the CPU when a session will encode new
          prompts later), the denoiser moves onto it, the network is attached, and the blocks are compiled.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from .config import JobConfig
from .models.base import TrainingModel

log = logging.getLogger("trainer")


def checkpoint_fraction(setting: bool | float | None) -> float:
    """train.gradient_checkpointing as the fraction of blocks to checkpoint."""
    if setting is True:
        return 1.0
    return float(setting or 0.0)


def configure_attention(device: torch.device) -> None:
    # cuDNN's SDPA backward fails on Flux-sized attention on the H100 / H200 with torch 2.11 (illegal memory access
    # or NaN; see docs/architecture.md): flash and memory-efficient attention are used instead
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def prepare_for_encoding(model: TrainingModel, job: JobConfig, report: Callable[[str], None]) -> None:
    tc, mc = job.process.train, job.process.model
    if mc.quantize:
        # the loaders leave the denoiser on the CPU: quantized there, it moves to the card at fp8 size
        n, saved = model.quantize()
        report(f"model.quantize: {n} block linears stored in float8 e4m3 ({saved / 1e9:.1f} GB less)")
    configure_attention(model.device)
    model.set_gradient_checkpointing(checkpoint_fraction(tc.gradient_checkpointing))
    model.place_text_encoders(model.device)
    if isinstance(model.vae, torch.nn.Module):
        model.vae.to(model.device)


def prepare_for_training(model: TrainingModel, job: JobConfig, texts_cached: bool, keep_text_encoders: bool,
                         report: Callable[[str], None]) -> None:
    """Everything after the dataset is encoded, before the network is attached."""
    tc = job.process.train
    if texts_cached and not tc.train_text_encoder:
        if keep_text_encoders:
            model.place_text_encoders("cpu")  # back on the card only while a new prompt is encoded
        else:
            model.release_text_encoders()
    model.place_denoiser()  # after the encoders had the card to themselves


def compile_model(model: TrainingModel, job: JobConfig, report: Callable[[str], None]) -> None:
    """Regional compile, after the network's hooks are attached (they are traced into the blocks)."""
    if not job.process.train.compile:
        return
    if model.device.type != "cuda":
        log.warning("train.compile: needs a CUDA device; ignored on %s", model.device.type)
        return
    report("compiling the model's blocks (the first steps of each new size take longer)")
    model.compile_blocks()
