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
import torch.utils.checkpoint
from torch import nn

from ..config import ModelConfig
from ..errors import ModelFileError
from . import registry
from .base import (BlockForwards, Conditioning, Target, TrainingModel, checkpointed, linear_mu, spread_over_depth,
                   time_shift_exponential, time_shift_linear)
from .chroma_layout import (
    chroma_layout,
    diffusers_config_from_original,
    diffusers_to_original,
    match_original_modulation_index,
    original_to_diffusers,
)
from .files import is_diffusers_folder, local_path
from .flux import FLUX_VAE_SCALE, FLUX_VAE_SHIFT, image_ids, pack_latents, unpack_latents
from .flux_layout import block_targets
from .transformer_file import load_transformer
from .text_encoders import find_tokenizer, identify_text_encoder, load_t5_encoder, load_tokenizer
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

    return load_transformer(path, dtype, arch, ChromaTransformer2DModel, "chroma", diffusers_config_from_original,
                            original_to_diffusers, "Chroma")


class ChromaModel(TrainingModel):
    arch = "chroma"
    distilled_guidance = False  # true CFG with the negative prompt

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
        self.pixel_factor = vae_scale(vae) * 2 if vae is not None else 16
        self._checkpointed = BlockForwards()

    # --- what the loop adapts ------------------------------------------------------------------
    def targets(self) -> list[Target]:
        cfg = self.denoiser.config
        lin, _ = chroma_layout(cfg.num_layers, cfg.num_single_layers, cfg.approximator_layers)
        return block_targets(self.denoiser, lin)

    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels // 4

    def repeated_blocks(self) -> list[nn.Module]:
        return [*self.denoiser.transformer_blocks, *self.denoiser.single_transformer_blocks]

    def set_gradient_checkpointing(self, fraction: float) -> None:
        """Checkpoint a fraction of the blocks by wrapping their forward.

        diffusers' own checkpointing path calls Chroma's single blocks without the attention mask, so a
        batch whose captions differ in length would train on unmasked padding there; wrapping the blocks
        keeps every argument.
        """
        self._checkpointed.wrap(spread_over_depth(self.repeated_blocks(), fraction), checkpointed)

    # --- encoders ------------------------------------------------------------------------------
    def text_encoders_loaded(self) -> bool:
        return self.t5 is not None

    def release_text_encoders(self) -> None:
        self.t5 = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> Conditioning:
        """T5 embeddings (b, max_length, d) and the transformer's keep-mask (b, max_length): the prompt's
        tokens and the first padding token, as ChromaPipeline._get_t5_prompt_embeds builds them."""
        if not self.text_encoders_loaded():
            raise RuntimeError("text encoders were released; embeddings must come from the cache")
        tok = self.t5_tokenizer(
            captions, padding="max_length", max_length=self.t5_max_length, truncation=True, return_tensors="pt",
        )
        dev = next(self.t5.parameters()).device
        embeds = self.t5(tok.input_ids.to(dev), attention_mask=tok.attention_mask.to(dev), output_hidden_states=False)[0]
        lengths = tok.attention_mask.sum(dim=1)
        keep = torch.arange(tok.attention_mask.shape[1])[None, :] <= lengths[:, None]
        return {"t5": embeds.float().cpu(), "t5_mask": keep}

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

    def _mu(self, latent_shape: tuple[int, ...]) -> float:
        h, w = latent_shape[-2:]
        return linear_mu((h // 2) * (w // 2))

    def train_shift_mu(self, latent_shape: tuple[int, ...]) -> float | None:
        return self._mu(latent_shape)

    def sample_sigmas(self, steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """ChromaPipeline's: linspace(1, 1/steps) shifted by the scheduler (resolution-dependent by default)."""
        sig = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
        if self.dynamic_shift:
            sig = time_shift_exponential(self._mu(latent_shape), sig)
        elif self.shift != 1.0:
            sig = time_shift_linear(self.shift, sig)
        return torch.cat([sig, torch.zeros(1, dtype=sig.dtype)]).float()

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


def load_chroma(mc: ModelConfig, device: str, dtype: torch.dtype) -> ChromaModel:
    root = local_path(mc.name_or_path, "model.name_or_path")
    transformer = load_chroma_transformer(root, dtype)
    folder = root if is_diffusers_folder(root) else None

    te_paths = [local_path(p, f"model.text_encoder_paths[{i}]") for i, p in enumerate(mc.text_encoder_paths)]
    t5_file = None
    for p in te_paths:
        ef = identify_text_encoder(p)
        if ef.kind == "t5":
            t5_file = t5_file or ef
        else:
            log.warning("model.text_encoder_paths: %s is a %s text encoder; Chroma uses T5 only, ignored", p, ef.kind)
    if t5_file is None and folder is not None and (folder / "text_encoder").is_dir():
        t5_file = identify_text_encoder(folder / "text_encoder")
    if t5_file is None:
        raise ModelFileError(
            "model.text_encoder_paths: Chroma needs T5-XXL (t5xxl_fp16.safetensors); list the local file"
            " (ComfyUI keeps it in models/text_encoders)"
        )

    tok_paths = [local_path(p, f"model.tokenizer_paths[{i}]") for i, p in enumerate(mc.tokenizer_paths)]
    # one path is T5's; two follow Flux's order (CLIP, T5)
    explicit = tok_paths[-1] if tok_paths else None
    t5_tok = load_tokenizer(find_tokenizer("t5", explicit, [folder / "tokenizer"] if folder else [], [root, *te_paths]))

    t5 = load_t5_encoder(t5_file, dtype)
    if t5.config.d_model != transformer.config.joint_attention_dim:
        raise ModelFileError(
            f"{t5_file.path}: T5 width {t5.config.d_model} does not match the model's"
            f" text input {transformer.config.joint_attention_dim}"
        )

    if mc.vae_path:
        vae_src = local_path(mc.vae_path, "model.vae_path")
    elif folder is not None and (folder / "vae").is_dir():
        vae_src = folder / "vae"
    else:
        raise ModelFileError("model.vae_path: Chroma needs the Flux VAE (ae.safetensors, in ComfyUI's models/vae)")
    vae = load_vae(vae_src, dtype, FLUX_VAE_SCALE, FLUX_VAE_SHIFT, transformer.config.in_channels // 4)

    dynamic, shift = _scheduler_shift(folder)
    dev = torch.device(device)
    for m in (vae, t5):  # the transformer follows in place_denoiser(), after the encoding
        m.to(dev)
    return ChromaModel(transformer, vae, t5, t5_tok, mc.t5_max_length or T5_MAX_LENGTH, dev, dtype, dynamic, shift)


# --- small random models ------------------------------------------------------------------------

def chroma_diffusers_config(hidden: int, head_dim: int, double: int, single: int, context_dim: int,
                            approximator_hidden: int, approximator_layers: int, in_channels: int = 64,
                            approximator_in: int = 64) -> dict:
    from .flux_layout import rope_axes

    return dict(
        patch_size=1, in_channels=in_channels, num_layers=double, num_single_layers=single,
        attention_head_dim=head_dim, num_attention_heads=hidden // head_dim, joint_attention_dim=context_dim,
        axes_dims_rope=rope_axes(head_dim), approximator_num_channels=approximator_in,
        approximator_hidden_dim=approximator_hidden, approximator_layers=approximator_layers,
    )


def chroma_original_state_dict(cfg: dict, seed: int = 4, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights (tiny.random_state_dict's scales) for a Chroma of `cfg`, in the original layout."""
    from diffusers import ChromaTransformer2DModel

    from .tiny import random_state_dict

    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*FluxPosEmbed.*", category=FutureWarning)
        model = ChromaTransformer2DModel(**cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return diffusers_to_original(random_state_dict(shapes, seed, dtype), cfg)


def make_chroma_file(path: Path, cfg: dict, seed: int = 4, dtype: torch.dtype = torch.bfloat16) -> None:
    from ..fileio import save_safetensors_atomic

    save_safetensors_atomic(chroma_original_state_dict(cfg, seed, dtype), path)


def make_chroma_demo(folder: Path) -> dict:
    """Random Chroma files sized so ComfyUI detects and runs them as Chroma: hidden 3072 in 24 heads of 128
    and a 5-layer approximator of width 5120 (ComfyUI fixes these), one double and one single block; small
    T5 and VAE. Returns the `model:` config."""
    from . import tiny

    folder.mkdir(parents=True, exist_ok=True)
    paths = {n: folder / f for n, f in (("chroma", "chroma_demo.safetensors"), ("t5", "t5_demo.safetensors"),
                                         ("vae", "ae_demo.safetensors"))}
    tok_t5 = folder / "tokenizer_t5"
    if not all(p.exists() for p in paths.values()) or not tok_t5.exists():
        t5_tok = tiny.build_tokenizer(tok_t5, "t5")
        tiny.make_t5_file(paths["t5"], len(t5_tok), d_model=64, layers=1)
        tiny.make_vae_file(paths["vae"], [32, 32, 32, 32], layers=1, latent=16)
        cfg = chroma_diffusers_config(hidden=3072, head_dim=128, double=1, single=1, context_dim=64,
                                      approximator_hidden=5120, approximator_layers=5)
        make_chroma_file(paths["chroma"], cfg, dtype=torch.bfloat16)
    return {
        "arch": "chroma",
        "name_or_path": str(paths["chroma"]),
        "text_encoder_paths": [str(paths["t5"])],
        "vae_path": str(paths["vae"]),
        "tokenizer_paths": [str(tok_t5)],
        "t5_max_length": 32,
    }


registry.register(
    registry.Family(
        arch="chroma",
        description="Chroma (Flux-layout blocks, pruned modulation): T5-XXL only, 16-channel Flux VAE, true CFG",
        load=load_chroma,
        make_demo=make_chroma_demo,
    )
)
