"""Flux.1 (dev, schnell, and Flux-layout derivatives: Flex.1, Flex.2) on the diffusers backend, from local files.

One model class serves every Flux-layout family; what differs between them is a `FluxVariant` (composition,
not subclasses): the arch, whether the guidance embedding is bypassed in training, and, for families whose
img_in reads more than the noisy latent (Flex.2), the function that builds its input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ModelFileError
from .base import Conditioning, Target, TrainingModel
from .device_constants import on_device
from .family import Family
from .flux_layout import diffusers_config_from_original, flux_layout, load_flux_layout_transformer, original_to_diffusers
from .layout import block_targets
from .schedules import flow_sample_sigmas, linear_mu
from .sources import ModelSources
from .text_encoders import load_clip_text_model, load_t5_encoder, run_t5
from .vae import load_vae, vae_scale

FLUX_VAE_SCALE = 0.3611
FLUX_VAE_SHIFT = 0.1159
CLIP_MAX_LENGTH = 77


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = x.shape
    c = d // 4
    x = x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    def make() -> torch.Tensor:
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] = torch.arange(h // 2)[:, None]
        ids[..., 2] = torch.arange(w // 2)[None, :]
        return ids.reshape(-1, 3)

    return on_device(("flux image ids", h, w), make, device, dtype)


def packed_mu(latent_shape: tuple[int, ...]) -> float:
    """Flux's resolution-dependent shift for a latent packed in 2x2 patches (its token count)."""
    h, w = latent_shape[-2:]
    return linear_mu((h // 2) * (w // 2))


def load_flux_transformer(path: Path, dtype: torch.dtype, arch: str):
    """FluxTransformer2DModel from an original-layout single file or a diffusers folder."""
    from diffusers import FluxTransformer2DModel

    return load_flux_layout_transformer(path, dtype, arch, FluxTransformer2DModel, "flux",
                                        diffusers_config_from_original, original_to_diffusers, "Flux")


def latent_channels_of(cfg) -> int:
    """Channels of the latent the transformer denoises (its output; img_in may take extra inputs)."""
    return (cfg.out_channels or cfg.in_channels) // 4


def _noisy_only(noisy: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    return noisy


def _flux_input_check(in_features: int, latent: int) -> str | None:
    if in_features == latent * 4:
        return None
    hint = " (Flex.2: use model.arch flex2)" if in_features == 196 and latent == 16 else ""
    return (f"img_in takes {in_features} features per token but the model outputs {latent * 4}: a Flux variant"
            f" with extra input channels{hint}")


@dataclass(frozen=True)
class FluxVariant:
    """What a Flux-layout family changes: its name, training defaults and img_in's input."""

    arch: str
    bypass_guidance_default: bool = False
    takes_control: bool = False
    # (noisy latent, conditioning) -> img_in's input channels, before 2x2 packing
    compose_input: Callable[[torch.Tensor, Conditioning], torch.Tensor] = _noisy_only
    # (img_in features, latent channels) -> None, or why this family cannot feed that img_in
    check_input: Callable[[int, int], str | None] = _flux_input_check
    metadata: dict = field(default_factory=dict)
    # datasets[].mask_path and the samples' inpaint inputs (Flex.2)
    takes_inpaint: bool = False
    # (model, pixels, control, mask) -> the item's cached conditions, for variants with more than a control latent
    encode_conditions: Callable[..., Conditioning | None] | None = None
    # (conditioning, step, steps) -> the conditioning of that preview step (Flex.2's control_stop)
    conditions_at: Callable[[Conditioning, int, int], Conditioning] | None = None


FLUX = FluxVariant("flux")
# Flex.1 is Flux's layout (8 double blocks) with a guidance embedder meant to be bypassed in training
FLEX1 = FluxVariant("flex1", bypass_guidance_default=True,
                    metadata={"ss_base_model_version": "flex1", "modelspec.architecture": "Flex.1/lora"})


class FluxModel(TrainingModel):
    text_encoder_attrs = ("clip", "t5")

    def __init__(self, transformer: nn.Module, vae: nn.Module | None, clip: nn.Module | None, t5: nn.Module | None,
                 clip_tokenizer, t5_tokenizer, t5_max_length: int, device: torch.device, dtype: torch.dtype,
                 bypass_guidance_embedding: bool = False, variant: FluxVariant = FLUX) -> None:
        self.variant = variant
        self.arch = variant.arch
        self.takes_control = variant.takes_control
        self.takes_masks = variant.takes_inpaint
        self.denoiser = transformer
        self.vae = vae
        self.clip, self.t5 = clip, t5
        self.clip_tokenizer, self.t5_tokenizer = clip_tokenizer, t5_tokenizer
        self.t5_max_length = t5_max_length
        self.device = torch.device(device)
        self.dtype = dtype
        self.guidance_embeds = bool(transformer.config.guidance_embeds)
        self.distilled_guidance = self.guidance_embeds
        self.bypass_guidance = bypass_guidance_embedding and self.guidance_embeds
        self.vae_scale = vae_scale(vae) if vae is not None else 8
        self._bypass_handle = None

    # --- what the loop adapts ------------------------------------------------------------------
    def targets(self) -> list[Target]:
        cfg = self.denoiser.config
        lin, _ = flux_layout(cfg.num_layers, cfg.num_single_layers, cfg.guidance_embeds)
        return block_targets(self.denoiser, lin)

    def latent_channels(self) -> int:
        return latent_channels_of(self.denoiser.config)

    def repeated_blocks(self) -> list[nn.Module]:
        return [*self.denoiser.transformer_blocks, *self.denoiser.single_transformer_blocks]

    # --- encoders ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> Conditioning:
        if not self.text_encoders_loaded():
            raise RuntimeError("text encoders were released; embeddings must come from the cache")
        ctok = self.clip_tokenizer(
            captions, padding="max_length", max_length=min(CLIP_MAX_LENGTH, self.clip_tokenizer.model_max_length),
            truncation=True, return_tensors="pt",
        )
        te_device = next(self.clip.parameters()).device
        pooled = self.clip(ctok.input_ids.to(te_device), output_hidden_states=False).pooler_output
        embeds, _ = run_t5(self.t5_tokenizer, self.t5, captions, self.t5_max_length, masked=False)
        return {"t5": embeds, "pooled": pooled.float().cpu()}

    def encode_conditions(self, pixels: torch.Tensor, control: torch.Tensor | None, mask: torch.Tensor | None = None,
                          reference: torch.Tensor | None = None) -> Conditioning | None:
        if self.variant.encode_conditions is not None:
            return self.variant.encode_conditions(self, pixels, control, mask)
        return super().encode_conditions(pixels, control, mask, reference)

    def conditions_at(self, cond: Conditioning, step: int, steps: int) -> Conditioning:
        return cond if self.variant.conditions_at is None else self.variant.conditions_at(cond, step, steps)

    # --- denoising -----------------------------------------------------------------------------
    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning,
                guidance: float | None = None) -> torch.Tensor:
        b, _, h, w = noisy.shape
        dev, dt = self.device, self.dtype
        txt = cond["t5"].to(dev, dt)
        g = None
        if self.guidance_embeds:
            g = torch.full((b,), 1.0 if guidance is None else float(guidance), device=dev, dtype=torch.float32)
        x = self.variant.compose_input(noisy.to(dev, dt), cond)
        out = self.denoiser(
            hidden_states=pack_latents(x),
            encoder_hidden_states=txt,
            pooled_projections=cond["pooled"].to(dev, dt),
            timestep=sigmas.to(dev, dt),
            img_ids=image_ids(h, w, dev, dt),
            txt_ids=torch.zeros(txt.shape[1], 3, device=dev, dtype=dt),
            guidance=g,
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)

    def attention_shapes(self, sizes: list[tuple[int, int, int]], batch: int) -> list[tuple[int, int, int, int, int]]:
        # one joint attention of the text (padded to t5_max_length) and the image tokens in every block, unmasked
        cfg = self.denoiser.config
        out = set()
        for w, h, f in sizes:
            tokens = math.prod(self.latent_shape(w, h, f)[2:]) // self.patch ** 2
            seq = self.t5_max_length + tokens
            out.add((batch, cfg.num_attention_heads, seq, seq, cfg.attention_head_dim))
        return sorted(out)

    def train_shift_mu(self, latent_shape: tuple[int, ...]) -> float | None:
        return packed_mu(latent_shape)

    def sample_sigmas(self, steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        # dev-style (guidance-distilled) models sample with the resolution-dependent shift, schnell without
        return flow_sample_sigmas(steps, packed_mu(latent_shape) if self.guidance_embeds else None)

    def set_train_hooks(self, training: bool) -> None:
        """With bypass_guidance_embedding, the guidance embedding adds nothing while training."""
        if self._bypass_handle is not None:
            self._bypass_handle.remove()
            self._bypass_handle = None
        if training and self.bypass_guidance:
            emb = self.denoiser.time_text_embed.guidance_embedder
            self._bypass_handle = emb.register_forward_hook(lambda m, i, o: torch.zeros_like(o))

    def save_metadata(self) -> dict[str, str]:
        kind = "dev" if self.guidance_embeds else "schnell"
        md = {"ss_base_model_version": f"flux1-{kind}", "modelspec.architecture": f"Flux.1-{kind}/lora"}
        return {**md, **self.variant.metadata, "eridiffusion.arch": self.arch}


def load_flux(mc: ModelConfig, device: torch.device, dtype: torch.dtype, variant: FluxVariant = FLUX) -> FluxModel:
    """A Flux-layout family from local files; everything stays on the CPU (the prepare step places it)."""
    src = ModelSources(mc, "Flux")
    transformer = load_flux_transformer(src.root, dtype, variant.arch)
    cfg = transformer.config
    why = variant.check_input(cfg.in_channels, latent_channels_of(cfg))
    if why is not None:
        raise ModelFileError(f"{src.root}: {why} (model.arch is {variant.arch!r})")

    found = src.encoders_by_kind({"clip": "text_encoder", "t5": "text_encoder_2"})
    src.require(found, {"clip": "CLIP-L (clip_l.safetensors)", "t5": "T5-XXL (t5xxl_fp16.safetensors)"},
                "list the local files (ComfyUI keeps them in models/text_encoders)")
    clip_tok = src.tokenizer("clip", src.tokenizer_path(0), "tokenizer")
    t5_tok = src.tokenizer("t5", src.tokenizer_path(1), "tokenizer_2")
    clip = load_clip_text_model(found["clip"], dtype, clip_tok.eos_token_id)
    t5 = load_t5_encoder(found["t5"], dtype)
    if clip.config.hidden_size != cfg.pooled_projection_dim:
        raise ModelFileError(f"{found['clip'].path}: CLIP width {clip.config.hidden_size} does not match the model's"
                             f" pooled input {cfg.pooled_projection_dim}")
    if t5.config.d_model != cfg.joint_attention_dim:
        raise ModelFileError(f"{found['t5'].path}: T5 width {t5.config.d_model} does not match the model's"
                             f" text input {cfg.joint_attention_dim}")
    vae = load_vae(src.vae("ae.safetensors"), dtype, FLUX_VAE_SCALE, FLUX_VAE_SHIFT, latent_channels_of(cfg))

    guidance = bool(cfg.guidance_embeds)
    t5_len = mc.t5_max_length or (512 if guidance else 256)
    bypass = variant.bypass_guidance_default if mc.bypass_guidance_embedding is None else mc.bypass_guidance_embedding
    return FluxModel(transformer, vae, clip, t5, clip_tok, t5_tok, t5_len, torch.device(device), dtype,
                     bool(bypass), variant)


FAMILIES = [
    Family("flux", "FLUX.1 dev / schnell (and Flux-layout derivatives): CLIP-L + T5-XXL, 16-channel VAE",
           lambda mc, device, dtype: load_flux(mc, device, dtype, FLUX), comfy_clip_type="flux",
           tokenizers=(("clip", 0, "tokenizer"), ("t5", 1, "tokenizer_2"))),
    Family("flex1", "Flex.1 (Flux layout, 8 double blocks): trained with the guidance embedding bypassed",
           lambda mc, device, dtype: load_flux(mc, device, dtype, FLEX1),
           model_defaults={"bypass_guidance_embedding": True}, comfy_clip_type="flux",
           tokenizers=(("clip", 0, "tokenizer"), ("t5", 1, "tokenizer_2"))),
]
