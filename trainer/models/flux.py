"""Flux.1 (dev, schnell, and Flux-layout derivatives) on the diffusers backend, from local files."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ModelFileError
from . import registry
from .base import Conditioning, Target, TrainingModel, linear_mu, time_shift_exponential
from .files import is_diffusers_folder, local_path
from .transformer_file import load_transformer
from .flux_layout import (
    block_targets,
    diffusers_config_from_original,
    flux_layout,
    original_to_diffusers,
)
from .text_encoders import (
    find_tokenizer,
    identify_text_encoder,
    load_clip_text_model,
    load_t5_encoder,
    load_tokenizer,
)
from .vae import load_vae, vae_scale

# Flex.1 is Flux's layout (8 double blocks) with a guidance embedder meant to be bypassed in training
FAMILY_DEFAULTS = {"flex1": {"bypass_guidance_embedding": True}}

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
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def load_flux_transformer(path: Path, dtype: torch.dtype, arch: str):
    """FluxTransformer2DModel from an original-layout single file or a diffusers folder."""
    from diffusers import FluxTransformer2DModel

    return load_transformer(path, dtype, arch, FluxTransformer2DModel, "flux", diffusers_config_from_original,
                            original_to_diffusers, "Flux")


def latent_channels_of(cfg) -> int:
    """Channels of the latent the transformer denoises (its output; img_in may take extra inputs)."""
    return (cfg.out_channels or cfg.in_channels) // 4


class FluxModel(TrainingModel):
    arch = "flux"
    default_bypass_guidance = False  # a family built on Flux that trains with the guidance embedding bypassed sets True

    def __init__(
        self,
        transformer: nn.Module,
        vae: nn.Module,
        clip: nn.Module | None,
        t5: nn.Module | None,
        clip_tokenizer,
        t5_tokenizer,
        t5_max_length: int,
        device: torch.device,
        dtype: torch.dtype,
        bypass_guidance_embedding: bool = False,
        arch: str = "flux",
    ) -> None:
        self.arch = arch
        self.denoiser = transformer
        self.vae = vae
        self.clip = clip
        self.t5 = t5
        self.clip_tokenizer = clip_tokenizer
        self.t5_tokenizer = t5_tokenizer
        self.t5_max_length = t5_max_length
        self.device = torch.device(device)
        self.dtype = dtype
        cfg = transformer.config
        self.guidance_embeds = bool(cfg.guidance_embeds)
        self.distilled_guidance = self.guidance_embeds
        self.bypass_guidance = bypass_guidance_embedding and self.guidance_embeds
        self.pixel_factor = vae_scale(vae) * 2
        self._bypass_handle = None

    # --- what the loop adapts ------------------------------------------------------------------
    def targets(self) -> list[Target]:
        cfg = self.denoiser.config
        lin, _ = flux_layout(cfg.num_layers, cfg.num_single_layers, cfg.guidance_embeds)
        return block_targets(self.denoiser, lin)

    def latent_channels(self) -> int:
        return latent_channels_of(self.denoiser.config)

    @classmethod
    def check_transformer(cls, transformer: nn.Module, source: Path, arch: str) -> None:
        """Refuse a Flux-layout checkpoint whose img_in takes inputs this family does not give it."""
        cfg = transformer.config
        out = cfg.out_channels or cfg.in_channels
        if cfg.in_channels != out:
            hint = " (Flex.2: use model.arch flex2)" if cfg.in_channels == 196 and out == 64 else ""
            raise ModelFileError(
                f"{source}: img_in takes {cfg.in_channels} features per token but the model outputs {out}: a Flux"
                f" variant with extra input channels{hint}, which model.arch {arch!r} does not feed"
            )

    def repeated_blocks(self) -> list[nn.Module]:
        return [*self.denoiser.transformer_blocks, *self.denoiser.single_transformer_blocks]

    # --- encoders ------------------------------------------------------------------------------
    def text_encoders_loaded(self) -> bool:
        return self.clip is not None and self.t5 is not None

    def release_text_encoders(self) -> None:
        self.clip = None
        self.t5 = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

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
        ttok = self.t5_tokenizer(
            captions, padding="max_length", max_length=self.t5_max_length, truncation=True,
            add_special_tokens=True, return_tensors="pt",
        )
        t5_device = next(self.t5.parameters()).device
        embeds = self.t5(ttok.input_ids.to(t5_device), output_hidden_states=False)[0]
        return {"t5": embeds.float().cpu(), "pooled": pooled.float().cpu()}

    # --- denoising -----------------------------------------------------------------------------
    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning, guidance: float | None = None) -> torch.Tensor:
        b, _, h, w = noisy.shape
        dev, dt = self.device, self.dtype
        txt = cond["t5"].to(dev, dt)
        g = None
        if self.guidance_embeds:
            g = torch.full((b,), 1.0 if guidance is None else float(guidance), device=dev, dtype=torch.float32)
        out = self.denoiser(
            hidden_states=pack_latents(noisy.to(dev, dt)),
            encoder_hidden_states=txt,
            pooled_projections=cond["pooled"].to(dev, dt),
            timestep=sigmas.to(dev, dt),
            img_ids=image_ids(h, w, dev, dt),
            txt_ids=torch.zeros(txt.shape[1], 3, device=dev, dtype=dt),
            guidance=g,
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)

    def uses_dynamic_shift(self) -> bool:
        # dev-style (guidance-distilled) models sample with the resolution-dependent shift, schnell without
        return self.guidance_embeds

    def _mu(self, latent_shape: tuple[int, ...]) -> float:
        h, w = latent_shape[-2:]
        return linear_mu((h // 2) * (w // 2))

    def train_shift_mu(self, latent_shape: tuple[int, ...]) -> float | None:
        return self._mu(latent_shape)

    def sample_sigmas(self, steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        sig = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
        if self.uses_dynamic_shift():
            sig = time_shift_exponential(self._mu(latent_shape), sig)
        return torch.cat([sig, torch.zeros(1, dtype=sig.dtype)]).float()

    def set_train_hooks(self, training: bool) -> None:
        """With bypass_guidance_embedding, the guidance embedding adds nothing while training."""
        if self._bypass_handle is not None:
            self._bypass_handle.remove()
            self._bypass_handle = None
        if training and self.bypass_guidance:
            emb = self.denoiser.time_text_embed.guidance_embedder
            self._bypass_handle = emb.register_forward_hook(lambda m, i, o: torch.zeros_like(o))

    def save_metadata(self) -> dict[str, str]:
        variant = "dev" if self.guidance_embeds else "schnell"
        return {
            "ss_base_model_version": f"flux1-{variant}",
            "modelspec.architecture": f"Flux.1-{variant}/lora",
            "eridiffusion.arch": self.arch,
        }


def _folder_component(root: Path, name: str) -> Path | None:
    p = root / name
    return p if p.is_dir() else None


def load_flux(mc: ModelConfig, device: str, dtype: torch.dtype, arch: str = "flux",
              model_cls: type[FluxModel] = FluxModel) -> FluxModel:
    """A Flux-layout family from local files; `model_cls` is the family's FluxModel (Flex.2 feeds extra inputs)."""
    root = local_path(mc.name_or_path, "model.name_or_path")
    transformer = load_flux_transformer(root, dtype, arch)
    model_cls.check_transformer(transformer, root, arch)
    folder = root if is_diffusers_folder(root) else None

    # text encoders: configured files first, then the diffusers folder
    te_paths = [local_path(p, f"model.text_encoder_paths[{i}]") for i, p in enumerate(mc.text_encoder_paths)]
    found = {}
    for p in te_paths:
        ef = identify_text_encoder(p)
        found.setdefault(ef.kind, ef)
    if folder is not None:
        for kind, sub in (("clip", "text_encoder"), ("t5", "text_encoder_2")):
            if kind not in found and _folder_component(folder, sub):
                found[kind] = identify_text_encoder(folder / sub)
    missing = [k for k in ("clip", "t5") if k not in found]
    if missing:
        names = {"clip": "CLIP-L (clip_l.safetensors)", "t5": "T5-XXL (t5xxl_fp16.safetensors)"}
        raise ModelFileError(
            "model.text_encoder_paths: Flux needs " + " and ".join(names[k] for k in missing)
            + "; list the local files (ComfyUI keeps them in models/text_encoders)"
        )

    tok_paths = [local_path(p, f"model.tokenizer_paths[{i}]") for i, p in enumerate(mc.tokenizer_paths)]
    near = [root, *te_paths]
    clip_tok = load_tokenizer(find_tokenizer(
        "clip", tok_paths[0] if len(tok_paths) > 0 else None,
        [folder / "tokenizer"] if folder else [], near))
    t5_tok = load_tokenizer(find_tokenizer(
        "t5", tok_paths[1] if len(tok_paths) > 1 else None,
        [folder / "tokenizer_2"] if folder else [], near))

    clip = load_clip_text_model(found["clip"], dtype, clip_tok.eos_token_id)
    t5 = load_t5_encoder(found["t5"], dtype)
    if clip.config.hidden_size != transformer.config.pooled_projection_dim:
        raise ModelFileError(
            f"{found['clip'].path}: CLIP width {clip.config.hidden_size} does not match the model's"
            f" pooled input {transformer.config.pooled_projection_dim}"
        )
    if t5.config.d_model != transformer.config.joint_attention_dim:
        raise ModelFileError(
            f"{found['t5'].path}: T5 width {t5.config.d_model} does not match the model's"
            f" text input {transformer.config.joint_attention_dim}"
        )

    if mc.vae_path:
        vae_src = local_path(mc.vae_path, "model.vae_path")
    elif folder is not None and _folder_component(folder, "vae"):
        vae_src = folder / "vae"
    else:
        raise ModelFileError("model.vae_path: Flux needs its VAE (ae.safetensors, in ComfyUI's models/vae)")
    vae = load_vae(vae_src, dtype, FLUX_VAE_SCALE, FLUX_VAE_SHIFT, latent_channels_of(transformer.config))

    guidance = bool(transformer.config.guidance_embeds)
    t5_len = mc.t5_max_length or (512 if guidance else 256)
    default_bypass = FAMILY_DEFAULTS.get(arch, {}).get("bypass_guidance_embedding", model_cls.default_bypass_guidance)
    bypass = bool(mc.bypass_guidance_embedding) if mc.bypass_guidance_embedding is not None else default_bypass
    dev = torch.device(device)
    for m in (vae, clip, t5):  # the transformer follows in place_denoiser(), after the encoding
        m.to(dev)
    return model_cls(transformer, vae, clip, t5, clip_tok, t5_tok, t5_len, dev, dtype, bypass, arch)


def make_flux_demo(folder: Path, arch: str = "flux", config_overrides: dict | None = None) -> dict:
    """Random Flux-architecture files sized so ComfyUI detects them as Flux (hidden 3072, 24 heads of 128,
    one double and one single block), with small text encoders and VAE. Returns the `model:` config.
    A family in Flux's layout passes its arch and its transformer config differences (Flex.2: img_in width)."""
    from . import tiny

    folder.mkdir(parents=True, exist_ok=True)
    paths = {n: folder / f for n, f in (("flux", f"{arch}_demo.safetensors"), ("clip", "clip_l_demo.safetensors"),
                                         ("t5", "t5_demo.safetensors"), ("vae", "ae_demo.safetensors"))}
    tok_clip, tok_t5 = folder / "tokenizer_clip", folder / "tokenizer_t5"
    if not all(p.exists() for p in paths.values()) or not (tok_clip.exists() and tok_t5.exists()):
        clip_tok = tiny.build_tokenizer(tok_clip, "clip")
        t5_tok = tiny.build_tokenizer(tok_t5, "t5")
        tiny.make_clip_file(paths["clip"], len(clip_tok), hidden=64, layers=1)
        tiny.make_t5_file(paths["t5"], len(t5_tok), d_model=64, layers=1)
        tiny.make_vae_file(paths["vae"], [32, 32, 32, 32], layers=1, latent=16)
        cfg = tiny.flux_diffusers_config(hidden=3072, head_dim=128, double=1, single=1, context_dim=64,
                                         pooled_dim=64, guidance=True)
        cfg.update(config_overrides or {})
        tiny.make_flux_file(paths["flux"], cfg, dtype=torch.bfloat16)
    return {
        "arch": arch,
        "name_or_path": str(paths["flux"]),
        "text_encoder_paths": [str(paths["clip"]), str(paths["t5"])],
        "vae_path": str(paths["vae"]),
        "tokenizer_paths": [str(tok_clip), str(tok_t5)],
        "t5_max_length": 32,
    }


registry.register(
    registry.Family(
        arch="flux",
        description="FLUX.1 dev / schnell (and Flux-layout derivatives): CLIP-L + T5-XXL, 16-channel VAE",
        load=load_flux,
        make_demo=make_flux_demo,
    )
)
registry.register(
    registry.Family(
        arch="flex1",
        description="Flex.1 (Flux layout, 8 double blocks): trained with the guidance embedding bypassed",
        load=lambda mc, device, dtype: load_flux(mc, device, dtype, arch="flex1"),
        make_demo=lambda folder: make_flux_demo(folder, arch="flex1"),
    )
)
