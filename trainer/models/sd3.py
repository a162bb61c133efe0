"""Stable Diffusion 3 / 3.5 (Medium, Large, Large-Turbo) on the diffusers backend, from local files.

The MMDiT loads from a single file in the original (Stability / ComfyUI) layout — a full `checkpoints/` file
with CLIP-L, CLIP-G, T5 and the VAE inside, or a bare `diffusion_models/` transformer — with its config from
the shapes (sd3_layout), or from a local diffusers folder. Text encoders and VAE may also come from separate
files (model.text_encoder_paths, model.vae_path).

Prompts are encoded as StableDiffusion3Pipeline.encode_prompt does: the penultimate hidden states of CLIP-L
and CLIP-G side by side, zero-padded to T5's width and followed by T5's tokens; pooled = both CLIPs' projected
embeddings. Without a T5 file its tokens are zeros (what the pipeline does when text_encoder_3 is None).
Objective: rectified flow, timestep = 1000 sigma; sampling is FlowMatchEulerDiscreteScheduler with shift 3.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import ModelFileError
from .base import Conditioning, Target, TrainingModel
from .detect import require_family
from .family import Family
from .files import dequantize_scaled_fp8, diffusers_component, find_weights_file, load_state_dict, safetensors_shapes
from .layout import block_targets
from .objectives import FlowObjective
from .schedules import flow_match_euler_sigmas
from .sources import ModelSources
from .sd3_layout import (
    CLIP_G_PREFIX,
    CLIP_L_PREFIX,
    T5_PREFIX,
    VAE_PREFIX,
    diffusers_config_from_original,
    diffusers_to_original,
    layout_of,
    original_to_diffusers,
    transformer_prefix,
    transformer_shapes,
)
from .text_encoders import EncoderFile, identify_text_encoder, load_clip_projected, load_t5_encoder
from .vae import load_vae, vae_scale

log = logging.getLogger("trainer")

SD3_VAE_SCALE = 1.5305
SD3_VAE_SHIFT = 0.0609
SHIFT = 3.0  # SD3's scheduler (and ComfyUI's model_sampling) shift
NUM_TRAIN_TIMESTEPS = 1000
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 256  # StableDiffusion3Pipeline's max_sequence_length


# --- the last context block's modulation in the original row order ----------------------------------

def _original_order_norm_class():
    from diffusers.models.normalization import AdaLayerNormContinuous

    class OriginalOrderAdaLayerNorm(AdaLayerNormContinuous):
        """AdaLayerNormContinuous whose linear emits (shift, scale), the original's order, instead of diffusers'
        (scale, shift): the ComfyUI weight `context_block.adaLN_modulation.1` is then this linear as it is, one
        plain LoRA target, and every network type (DoRA's column norms included) sees the original rows."""

        def forward(self, x: torch.Tensor, conditioning_embedding: torch.Tensor) -> torch.Tensor:
            emb = self.linear(self.silu(conditioning_embedding).to(x.dtype))
            shift, scale = torch.chunk(emb, 2, dim=1)
            return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]

    return OriginalOrderAdaLayerNorm


_ORIGINAL_ORDER_NORM = None


def use_original_modulation_order(model: nn.Module) -> nn.Module:
    """Reorder the last block's context modulation rows (diffusers order -> original) and switch its norm to read
    them so; the model computes exactly what it computed before."""
    global _ORIGINAL_ORDER_NORM
    if _ORIGINAL_ORDER_NORM is None:
        _ORIGINAL_ORDER_NORM = _original_order_norm_class()
    norm = model.transformer_blocks[-1].norm1_context
    if isinstance(norm, _ORIGINAL_ORDER_NORM):
        return model
    with torch.no_grad():
        for p in (norm.linear.weight, norm.linear.bias):
            a, b = p.detach().chunk(2, dim=0)
            p.copy_(torch.cat([b, a], dim=0))
    norm.__class__ = _ORIGINAL_ORDER_NORM
    return model


def load_sd3_transformer(path: Path, dtype: torch.dtype, arch: str = "sd3"):
    """SD3Transformer2DModel from an original-layout single file (full checkpoint or bare transformer) or a
    diffusers folder, with the last context modulation in the original row order."""
    from diffusers import SD3Transformer2DModel

    if path.is_dir():
        folder = diffusers_component(path, "transformer", "SD3")
        model = SD3Transformer2DModel.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
        return use_original_modulation_order(model)
    shapes = safetensors_shapes(path)
    require_family(path, shapes, "sd3", arch)
    prefix = transformer_prefix(shapes)
    own = transformer_shapes(shapes, prefix)
    cfg = diffusers_config_from_original(own, str(path))
    with torch.device("meta"):
        model = SD3Transformer2DModel(**cfg)
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd = dequantize_scaled_fp8({k: v for k, v in load_state_dict(path, dtype, prefix).items() if k in own}, str(path))
    sd = original_to_diffusers(sd, model_shapes, cfg, str(path))
    missing, _ = model.load_state_dict(sd, strict=False, assign=True)
    if missing:
        raise ModelFileError(f"{path}: incomplete SD3 checkpoint, missing {missing[0]}")
    return use_original_modulation_order(model)


def variant(cfg) -> str:
    """modelspec's name for the variant: 3.5 Medium has dual-attention blocks, 3.5 Large qk-norm only."""
    if tuple(cfg.dual_attention_layers or ()):
        return "stable-diffusion-v3.5-medium"
    if cfg.qk_norm is not None:
        return "stable-diffusion-v3.5-large"
    return "stable-diffusion-v3-medium"


class SD3Model(TrainingModel):
    arch = "sd3"
    objective = FlowObjective()

    def __init__(self, transformer: nn.Module, vae: nn.Module | None, clip_l: nn.Module | None,
                 clip_g: nn.Module | None, t5: nn.Module | None, tok_l, tok_g, tok_t5, t5_max_length: int,
                 device: torch.device, dtype: torch.dtype, arch: str = "sd3") -> None:
        self.arch = arch
        self.denoiser = transformer
        self.vae = vae
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.tok_l, self.tok_g, self.tok_t5 = tok_l, tok_g, tok_t5
        self.has_t5 = t5 is not None  # without a T5 file its tokens are zeros, also after release
        self.text_encoder_attrs = ("clip_l", "clip_g", "t5") if self.has_t5 else ("clip_l", "clip_g")
        self.t5_max_length = t5_max_length
        self.device = torch.device(device)
        self.dtype = dtype
        self.patch = transformer.config.patch_size
        self.vae_scale = vae_scale(vae) if vae is not None else 8

    # --- what the loop adapts ------------------------------------------------------------------
    def targets(self) -> list[Target]:
        """Every linear of the joint blocks, named by ComfyUI's keys (`diffusion_model.joint_blocks.0.x_block
        .attn.qkv`, fused q/k/v as three members)."""
        lin, _ = layout_of(self.denoiser.config)
        return block_targets(self.denoiser, lin)

    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels

    def repeated_blocks(self) -> list[nn.Module]:
        return list(self.denoiser.transformer_blocks)

    # --- encoders ------------------------------------------------------------------------------
    @staticmethod
    def _clip(encoder: nn.Module, tokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = tokenizer(
            captions, padding="max_length", max_length=min(CLIP_MAX_LENGTH, tokenizer.model_max_length),
            truncation=True, return_tensors="pt",
        ).input_ids
        out = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)
        return out.hidden_states[-2].float(), out.text_embeds.float()

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> Conditioning:
        if not self.text_encoders_loaded():
            raise RuntimeError("text encoders were released; embeddings must come from the cache")
        hl, pl = self._clip(self.clip_l, self.tok_l, captions)
        hg, pg = self._clip(self.clip_g, self.tok_g, captions)
        if self.t5 is not None:
            ids = self.tok_t5(
                captions, padding="max_length", max_length=self.t5_max_length, truncation=True,
                add_special_tokens=True, return_tensors="pt",
            ).input_ids
            t5 = self.t5(ids.to(next(self.t5.parameters()).device))[0].float()
        else:
            t5 = torch.zeros(len(captions), self.t5_max_length, self.denoiser.config.joint_attention_dim)
        clip = torch.cat([hl, hg], dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"context": torch.cat([clip, t5.to(clip.device)], dim=-2).cpu(),
                "pooled": torch.cat([pl, pg], dim=-1).cpu()}

    # --- denoising -----------------------------------------------------------------------------
    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning, guidance: float | None = None) -> torch.Tensor:
        dev, dt = self.device, self.dtype
        b = noisy.shape[0]
        s = sigmas.float().reshape(-1)
        # the timestep stays fp32: in bf16, 1000 sigma would be rounded to steps of up to 4
        t = (s.expand(b) if s.numel() == 1 else s) * NUM_TRAIN_TIMESTEPS
        return self.denoiser(
            hidden_states=noisy.to(dev, dt),
            encoder_hidden_states=cond["context"].to(dev, dt),
            pooled_projections=cond["pooled"].to(dev, dt),
            timestep=t.to(dev),
            return_dict=False,
        )[0]

    def sample_sigmas(self, steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        return flow_match_euler_sigmas(steps, SHIFT, NUM_TRAIN_TIMESTEPS)

    def save_metadata(self) -> dict[str, str]:
        return {
            "ss_base_model_version": "sd3",
            "modelspec.architecture": f"{variant(self.denoiser.config)}/lora",
            "eridiffusion.arch": self.arch,
        }


# --- text encoders -------------------------------------------------------------------------------

def _shapes_of(path: Path) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for f in (find_weights_file(path) if path.is_dir() else [path]):
        out.update(safetensors_shapes(f))
    return out


OPEN_CLIP_PREFIXES = ("text_encoders.clip_g.", "conditioner.embedders.1.model.", "model.", "")


def _classify_encoders(paths: list[Path]) -> dict[str, EncoderFile]:
    """CLIP-L, CLIP-G and T5 among the listed files: T5 by its keys; a CLIP of width 1280 (or in the OpenCLIP
    layout) is G, of width 768 L; others in ComfyUI's TripleCLIPLoader order (clip_l, then clip_g)."""
    from .sdxl_layout import is_open_clip

    found: dict[str, EncoderFile] = {}
    unknown: list[EncoderFile] = []
    for p in paths:
        shapes = _shapes_of(p)
        oc = next((pre for pre in OPEN_CLIP_PREFIXES if is_open_clip(shapes, pre)), None)
        if oc is not None:
            found.setdefault("clip_g", EncoderFile("clip", p, oc))
            continue
        ef = identify_text_encoder(p)
        if ef.kind == "t5":
            found.setdefault("t5", ef)
            continue
        width = next((v[1] for k, v in shapes.items() if k.endswith("token_embedding.weight")), None)
        role = {1280: "clip_g", 768: "clip_l"}.get(width)
        if role and role not in found:
            found[role] = ef
        else:
            unknown.append(ef)
    for role in ("clip_l", "clip_g"):
        if role not in found and unknown:
            found[role] = unknown.pop(0)
    return found


def _checkpoint_parts(path: Path) -> dict[str, EncoderFile]:
    """Text encoders inside a full SD3 checkpoint."""
    if path.is_dir():
        return {}
    shapes = safetensors_shapes(path)
    out = {}
    for role, prefix in (("clip_l", CLIP_L_PREFIX), ("clip_g", CLIP_G_PREFIX)):
        if f"{prefix}text_model.embeddings.token_embedding.weight" in shapes:
            out[role] = EncoderFile("clip", path, prefix)
    if f"{T5_PREFIX}encoder.block.0.layer.0.SelfAttention.q.weight" in shapes:
        out["t5"] = EncoderFile("t5", path, T5_PREFIX)
    return out


def load_sd3(mc: ModelConfig, device: torch.device, dtype: torch.dtype, arch: str = "sd3") -> SD3Model:
    src = ModelSources(mc, "SD3")
    transformer = load_sd3_transformer(src.root, dtype, arch)
    cfg = transformer.config

    found = _classify_encoders(src.text_encoder_paths)
    for role, ef in _checkpoint_parts(src.root).items():
        found.setdefault(role, ef)
    for role, sub in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"), ("t5", "text_encoder_3")):
        folder = src.component(sub)
        if role not in found and folder is not None:
            found[role] = EncoderFile("t5" if role == "t5" else "clip", folder, "")
    src.require(found, {"clip_l": "CLIP-L (clip_l.safetensors)", "clip_g": "CLIP-G (clip_g.safetensors)"},
                "T5-XXL is optional; use a checkpoint that includes them or list the local files (ComfyUI keeps"
                " them in models/text_encoders)")

    # tokenizer_paths: [CLIP] or [CLIP, T5] or [CLIP-L, CLIP-G, T5]
    tok_l = src.tokenizer("clip", src.tokenizer_path(0), "tokenizer")
    g_explicit = src.tokenizer_path(1) if len(src.tokenizer_paths) == 3 else None
    if g_explicit is not None or src.component("tokenizer_2") is not None:
        tok_g = src.tokenizer("clip", g_explicit, "tokenizer_2")
    else:
        # CLIP-G shares CLIP-L's vocabulary; SD3 (like SDXL) pads its prompts with "!" rather than end-of-text
        tok_g = src.tokenizer("clip", src.tokenizer_path(0), None)
        if "!" in tok_g.get_vocab():
            tok_g.pad_token = "!"

    clip_l = load_clip_projected(found["clip_l"], dtype, tok_l.eos_token_id, "clip_l")
    clip_g = load_clip_projected(found["clip_g"], dtype, tok_g.eos_token_id, "clip_g")
    t5 = tok_t5 = None
    if "t5" in found:
        t5_explicit = src.tokenizer_path(-1) if len(src.tokenizer_paths) >= 2 else None
        tok_t5 = src.tokenizer("t5", t5_explicit, "tokenizer_3")
        t5 = load_t5_encoder(found["t5"], dtype)
        if t5.config.d_model != cfg.joint_attention_dim:
            raise ModelFileError(f"{found['t5'].path}: T5 width {t5.config.d_model} does not match the model's"
                                 f" text input {cfg.joint_attention_dim}")
    else:
        log.info("SD3: no T5-XXL given; its %d text tokens are zeros (as StableDiffusion3Pipeline and ComfyUI"
                 " do without T5)", mc.t5_max_length or T5_MAX_LENGTH)
    width = clip_l.config.hidden_size + clip_g.config.hidden_size
    if width > cfg.joint_attention_dim:
        raise ModelFileError(f"{found['clip_l'].path}, {found['clip_g'].path}: CLIP-L + CLIP-G width {width} exceeds"
                             f" the model's text input {cfg.joint_attention_dim}")
    pooled = clip_l.config.projection_dim + clip_g.config.projection_dim
    if pooled != cfg.pooled_projection_dim:
        raise ModelFileError(f"{found['clip_l'].path}, {found['clip_g'].path}: pooled CLIP-L + CLIP-G width {pooled}"
                             f" does not match the model's pooled input {cfg.pooled_projection_dim}")

    vae = load_vae(src.vae("the 16-channel SD3 VAE", f"{VAE_PREFIX}encoder.conv_in.weight"), dtype, SD3_VAE_SCALE,
                   SD3_VAE_SHIFT, cfg.in_channels)
    return SD3Model(transformer, vae, clip_l, clip_g, t5, tok_l, tok_g, tok_t5, mc.t5_max_length or T5_MAX_LENGTH,
                    torch.device(device), dtype, arch)


FAMILIES = [
    Family("sd3", "Stable Diffusion 3 / 3.5 (Medium, Large, Large-Turbo): CLIP-L + CLIP-G (+ optional T5-XXL),"
           " 16-channel VAE", load_sd3, comfy_clip_type="sd3", tokenizers=(("clip", 0, "tokenizer"),)),
]
