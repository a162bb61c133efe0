"""Kolors on the diffusers backend, from the files ComfyUI-Kolors-MZ users keep.

Kolors is an SDXL-layout UNet whose text is ChatGLM3-6B: its 4096-wide penultimate hidden states are projected to
the UNet's 2048 by `encoder_hid_proj` (inside the UNet), and the pooled vector is the last token of the final layer
(4096 + 6 x 256 size ids = the UNet's 5632 added inputs). The UNet side is the SDXL family's code, shared by
composition (trainer.models.sdxl: loading, targets in ComfyUI's LDM names, the k-diffusion predict, discrete
timesteps); what differs is the text encoder and the schedule.

Files: the UNet in diffusers' layout as Kolors ships it and the MZ node loads it (`models/unet/
diffusion_pytorch_model.fp16.safetensors`), or in the LDM layout (what the MZ checkpoint loader reads), config from
the shapes; ChatGLM3 (`models/LLM/chatglm3-fp16.safetensors` or its 8-bit file, trainer.models.chatglm); the SDXL
VAE (`sdxl_vae.safetensors`). Or a local diffusers folder (Kolors-diffusers: unet, text_encoder, tokenizer, vae).

Schedule: Kolors' scheduler config — scaled-linear betas 0.00085..0.014 over 1100 training timesteps, epsilon
prediction, EulerDiscreteScheduler with "leading" spacing and steps_offset 1 (what ComfyUI-Kolors-MZ's sampling
settings give ComfyUI too). LoRA files use ComfyUI's SDXL keys (`diffusion_model.input_blocks.4.1...`), which the
MZ node's MODEL patches through LoraLoaderModelOnly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ModelFileError
from .base import Conditioning, Target, TrainingModel
from .chatglm import chatglm_prefix, find_chatglm_tokenizer, load_chatglm, load_chatglm_tokenizer
from .family import Family
from .objectives import EpsObjective
from .sdxl import (SDXL_VAE_SCALE, ddpm_sigmas, discrete_train_sigmas, leading_sigmas, load_sdxl_unet, predict_unet,
                   table_timesteps, unet_blocks, unet_targets)
from .sdxl_layout import NUM_TIME_IDS, TIME_ID_CHANNELS, VAE_PREFIX
from .sources import ModelSources
from .vae import load_vae, vae_scale

NUM_TRAIN_TIMESTEPS = 1100
BETA_START, BETA_END = 0.00085, 0.014
MAX_LENGTH = 256  # KolorsPipeline's max_sequence_length


def kolors_sigmas() -> torch.Tensor:
    return ddpm_sigmas(BETA_START, BETA_END, NUM_TRAIN_TIMESTEPS)


class KolorsModel(TrainingModel):
    arch = "kolors"
    objective = EpsObjective()
    text_encoder_attrs = ("chatglm",)

    def __init__(self, unet: nn.Module, vae: nn.Module, chatglm: nn.Module | None, tokenizer,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.denoiser = unet
        self.vae = vae
        self.chatglm = chatglm
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        self.vae_scale = vae_scale(vae)
        self.sigma_table = kolors_sigmas()
        self._log_sigmas = self.sigma_table.double().log()

    # --- what the loop adapts (the SDXL UNet's) -------------------------------------------------
    def targets(self) -> list[Target]:
        return unet_targets(self.denoiser)

    def repeated_blocks(self) -> list[nn.Module]:
        return unet_blocks(self.denoiser)

    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels

    # --- text ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> Conditioning:
        """As KolorsPipeline.encode_prompt: 256 tokens (left-padded, with attention mask and position ids); the
        context is ChatGLM's penultimate hidden states, the pooled vector the final layer's last token."""
        if not self.text_encoders_loaded():
            raise RuntimeError("text encoder was released; embeddings must come from the cache")
        enc = self.chatglm
        dev = next(enc.parameters()).device
        tokens = self.tokenizer(captions, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                                return_tensors="pt")
        out = enc(input_ids=tokens["input_ids"].to(dev), attention_mask=tokens["attention_mask"].to(dev),
                  position_ids=tokens["position_ids"].to(dev), output_hidden_states=True)
        # ChatGLM's hidden states are sequence first: (tokens, batch, width)
        context = out.hidden_states[-2].permute(1, 0, 2).float().cpu()
        pooled = out.hidden_states[-1][-1].float().cpu()
        return {"crossattn": context, "pooled": pooled}

    # --- denoising (SDXL's, over Kolors' schedule) ----------------------------------------------
    def sigma_to_t(self, sigmas: torch.Tensor) -> torch.Tensor:
        return table_timesteps(self._log_sigmas, sigmas)

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning,
                guidance: float | None = None) -> torch.Tensor:
        return predict_unet(self.denoiser, noisy, sigmas, cond, self.sigma_to_t, self.vae_scale, self.device, self.dtype)

    def schedule_position(self, sigmas: torch.Tensor) -> torch.Tensor:
        return self.sigma_to_t(sigmas) / (NUM_TRAIN_TIMESTEPS - 1)

    def train_sigmas(self, kind: str | None, batch: int, gen: torch.Generator,
                     latent_shape: tuple[int, ...]) -> torch.Tensor:
        return discrete_train_sigmas(self.sigma_table, kind, batch, gen)

    def sample_sigmas(self, steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """Kolors' EulerDiscreteScheduler: "leading" timesteps (every 1100 // steps, + 1), then 0."""
        return leading_sigmas(self.sigma_table, steps)

    def save_metadata(self) -> dict[str, str]:
        return {
            "ss_base_model_version": "kolors",
            "modelspec.architecture": "kolors/lora",
            "modelspec.prediction_type": "epsilon",
            "eridiffusion.arch": self.arch,
        }


# --- loading -------------------------------------------------------------------------------------

def _text_encoder_path(src: ModelSources) -> Path:
    if len(src.text_encoder_paths) > 1:
        raise ModelFileError("model.text_encoder_paths: Kolors has one text encoder (ChatGLM3); list only"
                             " chatglm3-fp16.safetensors")
    for p in src.text_encoder_paths:
        if chatglm_prefix(p) is None:
            raise ModelFileError(f"model.text_encoder_paths[0]: {p} is not a ChatGLM3 text encoder; Kolors reads"
                                 " chatglm3-fp16.safetensors (ComfyUI's models/LLM)")
        return p
    folder = src.component("text_encoder")
    if folder is not None:
        return folder
    raise ModelFileError("model.text_encoder_paths: Kolors needs ChatGLM3 (chatglm3-fp16.safetensors, in ComfyUI's"
                         " models/LLM) or a diffusers folder with text_encoder/")


def load_kolors(mc: ModelConfig, device: torch.device, dtype: torch.dtype) -> KolorsModel:
    src = ModelSources(mc, "Kolors")
    # the tokenizer and the encoder's file first: seconds, before gigabytes are read
    tokenizer = load_chatglm_tokenizer(find_chatglm_tokenizer(src.tokenizer_path(0), src.folder, src.near))
    te_path = _text_encoder_path(src)
    unet = load_sdxl_unet(src.root, dtype, "kolors", family="kolors")
    cfg = unet.config
    if cfg.encoder_hid_dim is None:  # a diffusers folder of another SDXL-layout model
        raise ModelFileError(f"{src.root}: this UNet has no encoder_hid_proj (ChatGLM's projection): not Kolors")
    chatglm = load_chatglm(te_path, dtype)
    width = chatglm.config.hidden_size
    if width != cfg.encoder_hid_dim:
        raise ModelFileError(f"{te_path}: ChatGLM width {width} does not match the UNet's text input"
                             f" {cfg.encoder_hid_dim}")
    if width + NUM_TIME_IDS * TIME_ID_CHANNELS != cfg.projection_class_embeddings_input_dim:
        raise ModelFileError(f"{te_path}: ChatGLM's pooled width {width} does not match the UNet's pooled input"
                             f" {cfg.projection_class_embeddings_input_dim - NUM_TIME_IDS * TIME_ID_CHANNELS}")
    # the SDXL VAE overflows in fp16: keep it in fp32 then (latents are cached, decoding is for previews)
    vae_dtype = torch.float32 if dtype == torch.float16 else dtype
    vae = load_vae(src.vae("sdxl_vae.safetensors", f"{VAE_PREFIX}encoder.conv_in.weight"), vae_dtype, SDXL_VAE_SCALE,
                   None, cfg.in_channels)
    return KolorsModel(unet, vae, chatglm, tokenizer, torch.device(device), dtype)


FAMILIES = [
    Family("kolors", "Kolors: SDXL-layout UNet with ChatGLM3-6B text (eps, 1100 timesteps), SDXL VAE", load_kolors,
           # ComfyUI core has no Kolors: its users load it with ComfyUI-Kolors-MZ's nodes
           comfy_model_loader=("unet", "MZ_KolorsUNETLoaderV2 (ComfyUI-Kolors-MZ)"),
           comfy_text_loader=("LLM", "MZ_ChatGLM3Loader (ComfyUI-Kolors-MZ)")),
]
