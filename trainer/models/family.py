"""What the registry knows of a family before its model is loaded: how to load it and what it takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from ..config import ModelConfig
    from .base import TrainingModel


@dataclass(frozen=True)
class Family:
    arch: str
    description: str
    load: Callable[["ModelConfig", torch.device, torch.dtype], "TrainingModel"]
    # train.train_text_encoder: its models give text-encoder targets (TrainingModel.text_encoder_targets)
    text_encoder_training: bool = False
    # datasets[].control_path: its models take a control latent (cond["control"])
    takes_control: bool = False
    # clips in datasets (num_frames > 1) and video previews
    video: bool = False
    # datasets[].mask_path (VACE's masks, Flex.2's inpaint masks)
    takes_masks: bool = False
    # sample.samples[].inpaint_image / inpaint_mask / control_strength / control_stop (Flex.2)
    takes_inpaint: bool = False
    # datasets[].reference_path and sample.samples[].reference_image (VACE's reference images)
    takes_references: bool = False
    # why a dataset without control_path (or do_i2v) cannot train this family, or "" when it can
    requires_control: str = ""
    # checked against the config before anything loads (model keys only this family reads, and their defaults)
    model_defaults: dict = field(default_factory=dict)
    # the type ComfyUI's CLIP loaders take for its text encoder files ("" where they come inside a checkpoint)
    comfy_clip_type: str = ""
    # (models folder, loader node) for its separate model file and text encoder files in ComfyUI, where they are not
    # core ComfyUI's (a custom node's: Kolors); empty: models/diffusion_models + Load Diffusion Model, and
    # models/text_encoders + the CLIP loader for that many files
    comfy_model_loader: tuple[str, str] = ()
    comfy_text_loader: tuple[str, str] = ()
    comfy_vae_loader: tuple[str, str] = ()  # (folder, node) where core ComfyUI's Load VAE cannot read the VAE
    # tokenizers its loader must find: (kind, index in model.tokenizer_paths, diffusers folder component), checked
    # before any model file is read
    tokenizers: tuple[tuple[str, int, str], ...] = ()
    # train.cuda_graphs: why its training step cannot be captured (it reads values on the host inside the step, so
    # its shapes depend on the data); empty: it can (bench/cuda_graph_families.py measures which)
    cuda_graphs_refusal: str = ""
