"""Chroma (Flux-layout blocks, T5 only, no guidance embedding) on the diffusers backend, from local files.

Text: T5 run with the tokenizer's attention mask; in the transformer every padding token but the first is
masked out (ChromaPipeline's rule). The mask is a boolean keep-mask: ChromaPipeline's own default casts it
to float, which SDPA adds to the logits instead of masking (diffusers issues #12116, #13619), so previews
and the pipeline equivalence test give the pipeline the boolean mask. As the kept tokens are always a
prefix, `predict` trims the text to the longest kept prefix in the batch (exactly equivalent, and a batch
of one then needs no mask at all, so the fast attention kernels apply).

Sampling: true classifier-free guidance with the negative prompt (no distilled guidance), Flux's
resolution-dependent shift unless a diffusers folder's scheduler says otherwise.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ModelFileError
from .base import Conditioning, Target, TrainingModel
from .family import Family
from .chroma_layout import (
    chroma_layout,
    diffusers_config_from_original,
    diffusers_to_original,
    match_original_modulation_index,
    original_to_diffusers,
)
from .flux import FLUX_VAE_SCALE, FLUX_VAE_SHIFT, image_ids, pack_latents, packed_mu, unpack_latents
from .flux_layout import load_flux_layout_transformer
from .layout import block_targets
from .schedules import flow_sample_sigmas
from .sources import ModelSources
from .text_encoders import load_t5_encoder, run_t5
from .vae import load_vae, vae_scale

log = logging.getLogger("trainer")

T5_MAX_LENGTH = 512  # ChromaPipeline's max_sequence_length


def load_chroma_transformer(path: Path, dtype: torch.dtype, arch: str = "chroma"):
    """ChromaTransformer2DModel from an original-layout single file or a diffusers folder."""
    with warnings.catch_warnings():
        # diffusers' Chroma module builds its rope with a class diffusers itself marks deprecated
        warnings.filterwarnings("ignore", message=".*FluxPosEmbed.*", category=FutureWarning)
        model = _load_chroma_transformer(path, dtype, arch)
    match_original_modulation_index(model)
    return model


def _load_chroma_transformer(path: Path, dtype: torch.dtype, arch: str):
    from diffusers import ChromaTransformer2DModel

    return load_flux_layout_transformer(path, dtype, arch, ChromaTransformer2DModel, "chroma",
                                        diffusers_config_from_original, original_to_diffusers, "Chroma")


class ChromaModel(TrainingModel):
    arch = "chroma"
    distilled_guidance = False  # true CFG with the negative prompt
    text_encoder_attrs = ("t5",)
    # diffusers' own checkpointing path calls Chroma's single blocks without the attention mask, so a batch whose
    # captions differ in length would train on unmasked padding there; wrapping the blocks keeps every argument
    checkpointing = "wrap"

    def __init__(
        self,
        transformer: nn.Module,
        vae: nn.Module | None,
        t5: nn.Module | None,
        t5_tokenizer,
        t5_max_length: int,
        device: torch.device,
        dtype: torch.dtype,
        dynamic_shift: bool = True,
        shift: float = 1.0,
    ) -> None:
        self.denoiser = transformer
        self.vae = vae
        self.t5 = t5
        self.t5_tokenizer = t5_tokenizer
        self.t5_max_length = t5_max_length
        self.device = torch.device(device)
        self.dtype = dtype
        self.dynamic_shift = dynamic_shift
        self.shift = shift
        self.vae_scale = vae_scale(vae) if vae is not None else 8

    # --- what the loop adapts ------------------------------------------------------------------
    def targets(self) -> list[Target]:
        cfg = self.denoiser.config
        lin, _ = chroma_layout(cfg.num_layers, cfg.num_single_layers, cfg.approximator_layers)
        return block_targets(self.denoiser, lin)

    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels // 4

    def repeated_blocks(self) -> list[nn.Module]:
        return [*self.denoiser.transformer_blocks, *self.denoiser.single_transformer_blocks]

    # --- encoders ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> Conditioning:
        """T5 embeddings (b, max_length, d) and the transformer's keep-mask (b, max_length): the prompt's
        tokens and the first padding token, as ChromaPipeline._get_t5_prompt_embeds builds them."""
        if not self.text_encoders_loaded():
            raise RuntimeError("text encoders were released; embeddings must come from the cache")
        embeds, mask = run_t5(self.t5_tokenizer, self.t5, captions, self.t5_max_length)
        keep = torch.arange(mask.shape[1])[None, :] <= mask.sum(dim=1)[:, None]
        return {"t5": embeds, "t5_mask": keep}

    # --- denoising -----------------------------------------------------------------------------
    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning, guidance: float | None = None) -> torch.Tensor:
        b, _, h, w = noisy.shape
        dev, dt = self.device, self.dtype
        txt, keep = cond["t5"], cond.get("t5_mask")
        mask = None
        if keep is not None:
            keep = keep.bool()
            n = max(1, int(keep.sum(dim=1).max()))  # kept tokens are a prefix: trimming the rest changes nothing
            txt, keep = txt[:, :n], keep[:, :n]
            if not bool(keep.all()):
                img = torch.ones(b, (h // 2) * (w // 2), dtype=torch.bool)
                mask = torch.cat([keep.cpu(), img], dim=1).to(dev)
        txt = txt.to(dev, dt)
        out = self.denoiser(
            hidden_states=pack_latents(noisy.to(dev, dt)),
            encoder_hidden_states=txt,
            timestep=sigmas.to(dev, dt),
            img_ids=image_ids(h, w, dev, dt),
            txt_ids=torch.zeros(txt.shape[1], 3, device=dev, dtype=dt),
            attention_mask=mask,
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)

    def train_shift_mu(self, latent_shape: tuple[int, ...]) -> float | None:
        return packed_mu(latent_shape)

    def sample_sigmas(self, steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """ChromaPipeline's: linspace(1, 1/steps) shifted by the scheduler (resolution-dependent by default)."""
        return flow_sample_sigmas(steps, packed_mu(latent_shape) if self.dynamic_shift else None, self.shift)

    def save_metadata(self) -> dict[str, str]:
        return {"ss_base_model_version": "chroma", "modelspec.architecture": "Chroma/lora", "eridiffusion.arch": self.arch}


def _scheduler_shift(folder: Path | None) -> tuple[bool, float]:
    """(dynamic shifting, static shift) from a diffusers folder's scheduler config; Flux-dev's by default."""
    if folder is not None:
        p = folder / "scheduler" / "scheduler_config.json"
        if p.exists():
            try:
                cfg = json.loads(p.read_text())
            except (OSError, ValueError) as e:
                raise ModelFileError(f"{p}: unreadable scheduler config ({e})") from None
            return bool(cfg.get("use_dynamic_shifting", True)), float(cfg.get("shift", 1.0))
    return True, 1.0


def load_chroma(mc: ModelConfig, device: torch.device, dtype: torch.dtype) -> ChromaModel:
    src = ModelSources(mc, "Chroma")
    transformer = load_chroma_transformer(src.root, dtype)
    found = src.encoders_by_kind({"t5": "text_encoder"})
    if "clip" in found:
        log.warning("model.text_encoder_paths: %s is a CLIP text encoder; Chroma uses T5 only, ignored",
                    found["clip"].path)
    src.require(found, {"t5": "T5-XXL (t5xxl_fp16.safetensors)"},
                "list the local file (ComfyUI keeps it in models/text_encoders)")
    # one tokenizer path is T5's; two follow Flux's order (CLIP, T5)
    t5_tok = src.tokenizer("t5", src.tokenizer_path(-1), "tokenizer")
    t5 = load_t5_encoder(found["t5"], dtype)
    if t5.config.d_model != transformer.config.joint_attention_dim:
        raise ModelFileError(f"{found['t5'].path}: T5 width {t5.config.d_model} does not match the model's"
                             f" text input {transformer.config.joint_attention_dim}")
    vae = load_vae(src.vae("the Flux VAE, ae.safetensors"), dtype, FLUX_VAE_SCALE, FLUX_VAE_SHIFT,
                   transformer.config.in_channels // 4)
    dynamic, shift = _scheduler_shift(src.folder)
    return ChromaModel(transformer, vae, t5, t5_tok, mc.t5_max_length or T5_MAX_LENGTH, torch.device(device), dtype,
                       dynamic, shift)


FAMILIES = [
    Family("chroma", "Chroma (Flux-layout blocks, pruned modulation): T5-XXL only, 16-channel Flux VAE, true CFG",
           load_chroma, comfy_clip_type="chroma", tokenizers=(("t5", -1, "tokenizer"),),
           cuda_graphs_refusal="its step trims each batch's text padding to the longest caption, read on the host"),
]
