"""LTX-Video 0.9.x (2B, 13B) on the diffusers backend, from the files ComfyUI users keep.

The transformer and the VAE load from one Lightricks checkpoint in `models/checkpoints` (`ltx-video-2b-v0.9.x`,
`ltxv-13b-0.9.x-dev`, fp8 variants dequantized on load): ComfyUI's key names (`model.diffusion_model.*`, `vae.*`),
configs from the shapes and the `config` JSON in the file's metadata, as ComfyUI reads them (ltxv_layout.py); or
from a local diffusers folder. Text: T5-XXL (`t5xxl_fp16` or fp8 in `models/text_encoders`) run with its attention
mask, as ComfyUI runs it (diffusers' LTXPipeline runs T5 without it), padded to 128 tokens, the mask passed on to
the transformer's cross-attention. VAE: 128 channels, 32x spatial, 8x temporal (clips of 8k+1 frames, sides of 32k).

Objective: rectified flow, timestep = 1000 sigma, token positions scaled by the frame rate (25 fps: the family's
native rate). Previews: Euler over ComfyUI's LTXVScheduler sigmas (the shift from the latent's token count, stretched
to end at 0.1; what diffusers' LTXPipeline computes with LTX-Video's scheduler config), classifier-free guidance.

Image-to-video, as ComfyUI's LTXVImgToVideo: the start image's latent is the first latent frame, its tokens get
timestep 0 (per-token timesteps from the mask), the loss leaves it out and the sampler keeps it (`known_latents`).
The start image is the clip's first frame (`datasets[].do_i2v`) or the item's control image (`control_path`);
previews take `sample.samples[].control_image`. T2V and I2V train the same weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError, ModelFileError
from .base import Conditioning, Target, TrainingModel
from .device_constants import on_device
from .detect import require_family
from .family import Family
from .files import (dequantize_scaled_fp8, diffusers_component, load_state_dict, safetensors_metadata,
                    safetensors_shapes)
from .layout import ORIGINAL_PREFIXES, block_targets
from .ltxv_layout import (Positions, VaeLayout, file_config, original_to_diffusers, transformer_config,
                          transformer_layout, vae_layout, vae_original_config)
from .objectives import FlowObjective
from .schedules import time_shift_exponential
from .sources import ModelSources
from .text_encoders import load_t5_encoder, run_t5

T5_MAX_LENGTH = 128  # ComfyUI pads LTX-Video's T5 to at least 128 tokens; diffusers' LTXPipeline uses 128
FPS = 25.0
# ComfyUI's LTXVScheduler: mu from the token count, 0.95 at 1024 tokens to 2.05 at 4096, sigmas stretched to 0.1
BASE_TOKENS, MAX_TOKENS, BASE_SHIFT, MAX_SHIFT, TERMINAL = 1024, 4096, 0.95, 2.05, 0.1
# what ComfyUI's VAE decode gives a timestep-conditioned LTX decoder
DECODE_TIMESTEP, DECODE_NOISE = 0.05, 0.025
VAE_KEY = "decoder.up_blocks.0.res_blocks.0.conv1.conv.weight"  # ComfyUI's sign of an LTX VAE


def ltxv_mu(tokens: int) -> float:
    m = (MAX_SHIFT - BASE_SHIFT) / (MAX_TOKENS - BASE_TOKENS)
    return tokens * m + BASE_SHIFT - m * BASE_TOKENS


def ltxv_sigmas(steps: int, tokens: int, terminal: float = TERMINAL) -> torch.Tensor:
    """LTXVScheduler(steps, stretch=True, terminal): 1, ..., 1/steps shifted by mu(tokens), stretched so the last
    nonzero sigma is `terminal`, then 0."""
    sig = time_shift_exponential(ltxv_mu(tokens), torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64))
    one_minus = 1.0 - sig
    sig = 1.0 - one_minus / (one_minus[-1] / (1.0 - terminal))
    return torch.cat([sig, torch.zeros(1, dtype=sig.dtype)]).float()


def is_095_vae(cfg) -> bool:
    """0.9.5 and later (space-to-depth encoder): their transformers count the first frame causally."""
    return "LTXVideo095DownBlock3D" in tuple(cfg["down_block_types"] if isinstance(cfg, dict) else cfg.down_block_types)


def load_ltxv_transformer(path: Path, dtype: torch.dtype, arch: str = "ltxv") -> tuple[nn.Module, Positions | None]:
    """LTXVideoTransformer3DModel from a Lightricks checkpoint (the original names, config from the shapes and the
    metadata) or a diffusers folder (positions: None, decided by the VAE)."""
    from diffusers import LTXVideoTransformer3DModel

    if path.is_dir():
        folder = diffusers_component(path, "transformer", "LTX-Video")
        return LTXVideoTransformer3DModel.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True), None
    shapes = safetensors_shapes(path)
    require_family(path, shapes, "ltxv", arch)
    prefix = next(p for p in ORIGINAL_PREFIXES if f"{p}patchify_proj.weight" in shapes)
    own = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix) and not k.startswith("vae.")}
    meta = file_config(safetensors_metadata(path), str(path)).get("transformer") or {}
    cfg, pos = transformer_config(own, meta, str(path))
    with torch.device("meta"):
        model = LTXVideoTransformer3DModel(**cfg)
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd = {k: v for k, v in load_state_dict(path, dtype, prefix).items() if k in own}
    sd = original_to_diffusers(dequantize_scaled_fp8(sd, str(path)), model_shapes, cfg["num_layers"], str(path))
    for k, v in sd.items():
        if tuple(v.shape) != model_shapes.get(k, tuple(v.shape)):
            raise ModelFileError(f"{path}: {k} has shape {tuple(v.shape)} where the derived config makes"
                                 f" {model_shapes[k]}")
    missing, _ = model.load_state_dict(sd, strict=False, assign=True)
    if missing:
        raise ModelFileError(f"{path}: incomplete LTX-Video checkpoint, missing {missing[0]}")
    model.rope.theta = pos.theta
    return model, pos


def load_ltxv_vae(path: Path, dtype: torch.dtype) -> nn.Module:
    """AutoencoderKLLTXVideo from a Lightricks checkpoint's `vae.*` tensors or a separate LTX VAE file (its layout
    from the metadata's `vae` config, else the one ComfyUI guesses from the shapes), or a diffusers folder. Padding
    follows ComfyUI's convolutions for files, diffusers' for folders."""
    from diffusers import AutoencoderKLLTXVideo

    if path.is_dir():
        folder = diffusers_component(path, "vae", "LTX-Video VAE")
        vae = AutoencoderKLLTXVideo.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
        return vae.eval().requires_grad_(False)
    shapes = safetensors_shapes(path)
    prefix = next((p for p in ("vae.", "") if f"{p}{VAE_KEY}" in shapes), None)
    if prefix is None:
        raise ModelFileError(f"{path}: holds no LTX-Video VAE (no vae.{VAE_KEY}); set model.vae_path to the"
                             " Lightricks checkpoint or an LTX VAE file")
    own = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    meta = file_config(safetensors_metadata(path), str(path)).get("vae") or {}
    try:
        lay = vae_layout(vae_original_config(own, meta), own["encoder.conv_in.conv.weight"][0], str(path))
    except KeyError as e:
        raise ModelFileError(f"{path}: not a complete LTX-Video VAE (missing {e.args[0]})") from None
    with torch.device("meta"):
        vae = AutoencoderKLLTXVideo(**lay.config)
    table = {lay.to_original(k): k for k in vae.state_dict()}
    for o, k in table.items():
        want = tuple(vae.state_dict()[k].shape)
        if o not in own:
            raise ModelFileError(f"{path}: not the LTX VAE layout its config describes (missing {prefix}{o})")
        if own[o] != want:
            raise ModelFileError(f"{path}: {prefix}{o} has shape {own[o]}; its VAE config makes {want}")
    sd = load_state_dict(path, dtype, prefix)
    vae.load_state_dict({k: sd[o] for o, k in table.items()}, strict=True, assign=True)
    _set_padding(vae, lay)
    return vae.eval().requires_grad_(False)


def _set_padding(vae: nn.Module, lay: VaeLayout) -> None:
    """ComfyUI's LTX convolutions pad spatially as the VAE config says (its decoder: by reflection by default)."""
    for side, mode in (("encoder", lay.encoder_padding), ("decoder", lay.decoder_padding)):
        for m in getattr(vae, side).modules():
            if isinstance(m, nn.Conv3d) and any(p > 0 for p in m.padding):
                m.padding_mode = mode


class LTXVModel(TrainingModel):
    arch = "ltxv"
    objective = FlowObjective()
    vae_scale, vae_temporal, patch = 32, 8, 1
    native_fps = FPS
    conditions_on_fps = True  # token positions are in seconds: each clip at its own rate (cond["fps"])
    checkpointing = "diffusers"
    text_encoder_attrs = ("t5",)
    # control_path / do_i2v: the start image of image-to-video (T2V datasets need none)
    takes_control = True

    def __init__(self, transformer: nn.Module, vae: nn.Module | None, t5: nn.Module | None, tokenizer,
                 device: torch.device, dtype: torch.dtype, positions: Positions = Positions(),
                 t5_max_length: int = T5_MAX_LENGTH) -> None:
        self.denoiser = transformer
        self.vae = vae
        self.t5 = t5
        self.tokenizer = tokenizer
        self.device, self.dtype = torch.device(device), dtype
        self.positions = positions
        self.t5_max_length = t5_max_length
        if vae is not None:
            self.vae_scale = int(vae.spatial_compression_ratio)
            self.vae_temporal = int(vae.temporal_compression_ratio)

    # --- what the loop adapts ------------------------------------------------------------------
    def targets(self) -> list[Target]:
        lin, _ = transformer_layout(self.denoiser.config.num_layers)
        return block_targets(self.denoiser, lin)

    def latent_channels(self) -> int:
        return self.denoiser.config.out_channels

    def repeated_blocks(self) -> list[nn.Module]:
        return list(self.denoiser.transformer_blocks)

    # --- encoders ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> Conditioning:
        """T5 with its attention mask (as ComfyUI runs it), padded to t5_max_length; the mask goes to the model."""
        if self.t5 is None:
            raise RuntimeError("text encoders were released; embeddings must come from the cache")
        hidden, mask = run_t5(self.tokenizer, self.t5, captions, self.t5_max_length)
        return {"context": hidden, "attention_mask": mask.float()}

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1, 1)
        mean = self.vae.latents_mean.float().view(shape).to(like.device)
        std = self.vae.latents_std.float().view(shape).to(like.device)
        return mean, std / self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Images (b, 3, h, w) as one-frame clips, or clips (b, 3, f, h, w), in [-1, 1] -> (b, 128, t, h/32, w/32),
        normalized by the VAE's per-channel statistics (the posterior mean, as ComfyUI encodes)."""
        clips = images[:, :, None] if images.dim() == 4 else images
        p = next(self.vae.parameters())
        z = self.vae.encode(clips.to(p.device, p.dtype)).latent_dist.mode().float()
        mean, std = self._latent_stats(z)
        return ((z - mean) / std).cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """As ComfyUI decodes: a timestep-conditioned decoder gets timestep 0.05 and latents mixed with 2.5% noise
        (a fixed seed here, so a preview is repeatable)."""
        p = next(self.vae.parameters())
        x = latents.float()
        temb = None
        if self.vae.config.timestep_conditioning:
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(x.device)
            x = noise * DECODE_NOISE + (1.0 - DECODE_NOISE) * x
            temb = torch.full((x.shape[0],), DECODE_TIMESTEP, device=p.device, dtype=p.dtype)
        mean, std = self._latent_stats(x)
        z = (x * std + mean).to(p.device, p.dtype)
        return self.vae.decode(z, temb=temb, return_dict=False)[0].float().clamp(-1, 1).cpu()

    # --- image-to-video ------------------------------------------------------------------------
    @torch.no_grad()
    def encode_conditions(self, pixels: torch.Tensor, control: torch.Tensor | None,
                          mask: torch.Tensor | None = None, reference: torch.Tensor | None = None) -> Conditioning | None:
        """The start image's latent (one latent frame), for a clip with a start image. An image item (one frame)
        has nothing left to generate from one: it gets the condition marked not given (cached like the clips')."""
        if control is None:
            return None
        start = control if control.dim() == 3 else control[:, 0]
        first = self.encode_pixels(start[None])[0]
        if pixels.dim() == 3 or pixels.shape[1] == 1:
            return {"first_frame": torch.zeros_like(first), "first_frame_given": torch.zeros(1)}
        return {"first_frame": first, "first_frame_given": torch.ones(1)}

    def known_latents(self, cond: Conditioning, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The first latent frame is the start image's latent where the item has one (`first_frame_given`: 0 for
        items without, or whose control was dropped)."""
        if "first_frame" not in cond:
            return None
        first = cond["first_frame"].float()
        b = first.shape[0]
        values = torch.zeros(b, *like.shape[1:], dtype=torch.float32, device=first.device)
        values[:, :, :first.shape[2]] = first
        given = torch.zeros(b, 1, like.shape[2], 1, 1, dtype=torch.float32, device=first.device)
        given[:, :, :first.shape[2]] = cond["first_frame_given"].float().reshape(b, 1, 1, 1, 1)
        return values, given

    # --- denoising -----------------------------------------------------------------------------
    def _coords(self, frames: int, height: int, width: int, batch: int, fps: torch.Tensor | None = None) -> torch.Tensor:
        """Token positions as ComfyUI's LTXV computes them (latent index x the VAE's factors, the first frame counted
        causally where the file says so, time in seconds at each clip's frame rate `fps` (b,), ComfyUI's
        LTXVConditioning frame_rate; default the native 25), in the units diffusers' rotary embedding divides by its
        fixed (20, 2048, 2048)."""
        p = self.positions

        def grid() -> torch.Tensor:  # (1, 3, tokens): frame time in latent frames (before the rate), y, x
            t, y, x = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
            t = t.float() * p.vae_factors[0]
            if p.causal:
                t = (t + 1 - p.vae_factors[0]).clamp(min=0)
            space = torch.stack([y.float() * p.vae_factors[1] * (2048.0 / p.max_pos[1]),
                                 x.float() * p.vae_factors[2] * (2048.0 / p.max_pos[2])]).reshape(1, 2, -1)
            return torch.cat([t.reshape(1, 1, -1), space], dim=1)

        # the grid is made once per size on the device; only the rates are per batch (no host copy in the step)
        base = on_device(("ltxv coords", id(p), frames, height, width), grid, self.device, anchor=p)
        rate = (torch.full((batch,), float(self.native_fps), device=self.device) if fps is None
                else fps.to(self.device).float().reshape(-1).expand(batch))
        t = base[:, :1] / rate[:, None, None]
        return torch.cat([t * (20.0 / p.max_pos[0]), base[:, 1:].expand(batch, -1, -1)], dim=1)

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning,
                guidance: float | None = None) -> torch.Tensor:
        dev, dt = self.device, self.dtype
        b, c, f, h, w = noisy.shape
        tokens = noisy.to(dev, dt).permute(0, 2, 3, 4, 1).reshape(b, f * h * w, c)
        s = sigmas.float().reshape(-1).to(dev)
        t = (s.expand(b) if s.numel() == 1 else s) * self.positions.timestep_multiplier
        known = self.known_latents(cond, noisy)
        if known is not None:  # given tokens are clean: timestep 0 there (ComfyUI's LTXV.process_timestep)
            free = (1 - known[1].to(dev)).expand(b, 1, f, h, w).reshape(b, f * h * w)
            t = t[:, None] * free
        mask = cond["attention_mask"].to(dev, dt) if "attention_mask" in cond else None
        out = self.denoiser(hidden_states=tokens, encoder_hidden_states=cond["context"].to(dev, dt), timestep=t,
                            encoder_attention_mask=mask, video_coords=self._coords(f, h, w, b, cond.get("fps")), return_dict=False)[0]
        return out.reshape(b, f, h, w, c).permute(0, 4, 1, 2, 3)

    def sample_sigmas(self, steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        return ltxv_sigmas(steps, math.prod(latent_shape[2:]))

    def train_shift_mu(self, latent_shape: tuple[int, ...]) -> float | None:
        return ltxv_mu(math.prod(latent_shape[2:]))

    def save_metadata(self) -> dict[str, str]:
        cfg = self.denoiser.config
        size = "13b" if cfg.num_attention_heads * cfg.attention_head_dim >= 4096 else "2b"
        return {"ss_base_model_version": f"ltxv_{size}", "modelspec.architecture": "ltx-video/lora",
                "eridiffusion.arch": self.arch}


def load_ltxv(mc: ModelConfig, device: torch.device, dtype: torch.dtype) -> LTXVModel:
    if mc.clip_vision_path:
        raise ConfigError("config.process[0].model.clip_vision_path: not used by model.arch 'ltxv' (its start"
                          " images go through the VAE); remove it")
    src = ModelSources(mc, "LTX-Video")
    transformer, positions = load_ltxv_transformer(src.root, dtype)
    found = src.encoders_by_kind({"t5": "text_encoder"})
    src.require(found, {"t5": "T5-XXL (t5xxl_fp16.safetensors)"},
                "list the local file (ComfyUI keeps it in models/text_encoders)")
    tok = src.tokenizer("t5", src.tokenizer_path(0), "tokenizer")
    t5 = load_t5_encoder(found["t5"], dtype)
    if t5.config.d_model != transformer.config.caption_channels:
        raise ModelFileError(f"{found['t5'].path}: T5 width {t5.config.d_model} does not match the model's text"
                             f" input {transformer.config.caption_channels}")
    vae = load_ltxv_vae(src.vae("the LTX-Video VAE, inside the Lightricks checkpoint", f"vae.{VAE_KEY}"), dtype)
    if vae.config.latent_channels != transformer.config.in_channels:
        raise ModelFileError(f"model.vae_path: a {vae.config.latent_channels}-channel VAE; the model takes"
                             f" {transformer.config.in_channels}")
    if positions is None:  # a diffusers folder: 0.9.5 and later count the first frame causally
        positions = Positions(causal=is_095_vae(vae.config))
    return LTXVModel(transformer, vae, t5, tok, torch.device(device), dtype, positions,
                     mc.t5_max_length or T5_MAX_LENGTH)


FAMILIES = [
    Family("ltxv", "LTX-Video 0.9.x (2B, 13B): T5-XXL, the VAE inside the Lightricks checkpoint; clips, images,"
           " image-to-video (do_i2v / control_path)", load_ltxv, video=True, takes_control=True,
           comfy_clip_type="ltxv", tokenizers=(("t5", 0, "tokenizer"),)),
]
