"""HiDream-I1 (Full, Dev, Fast; 17B, mixture-of-experts) on the diffusers backend, from the files ComfyUI users keep.

The transformer loads from `models/diffusion_models/hidream_i1_{full,dev,fast}_*.safetensors` (bf16, fp16, fp8 or
scaled fp8, dequantized on load) with its config from the shapes (hidream_layout.py), or from a diffusers folder
(`HiDreamImageTransformer2DModel`). Text (as HiDreamImagePipeline.encode_prompt): CLIP-L and CLIP-G pooled through
their projections (768 + 1280), T5-XXL's last states, and every hidden layer of Llama-3.1-8B-Instruct (block i of
the transformer reads its own layer), all at 128 tokens (`model.t5_max_length`). VAE: Flux's (16 channels, 8x).

Objective: rectified flow, timestep = 1000 sigma; the transformer's output is the negated velocity (the pipeline and
ComfyUI both negate it). Previews: Euler over FlowMatchEulerDiscreteScheduler's sigmas with the variant's shift;
Full with classifier-free guidance, Dev and Fast (guidance-distilled) without.

Tokens are not padded: diffusers pads a non-square latent to 4096 tokens (the original's training code), ComfyUI
does not; training follows ComfyUI, where the LoRA is used (a mask of ones keeps diffusers from padding).

The Llama stack of a caption is large (128 tokens x 32 layers x 4096 = 32 MiB in bf16): with
`train.cache_text_embeddings` it is kept in memory in the training dtype, and `model.quantize` also stores the
Llama's linears in fp8 so the four encoders share a 24 GB card while the dataset is encoded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError, ModelFileError
from .base import Conditioning, Target, TrainingModel
from .detect import require_family
from .family import Family
from .files import dequantize_scaled_fp8, diffusers_component, load_state_dict, safetensors_shapes
from .flux import FLUX_VAE_SCALE, FLUX_VAE_SHIFT
from .hidream_layout import (PATCH, block_targets, image_ids, patchify, transformer_config, unpatchify_training)
from .hidream_text import llama_layers_of, llama_tokenizer, load_llama, sort_encoders
from .layout import ORIGINAL_PREFIXES
from .quantize import quantize_blocks
from .schedules import flow_match_euler_sigmas
from .sources import ModelSources
from .text_encoders import identify_text_encoder, load_clip_projected, load_t5_encoder, run_t5
from .vae import load_vae, vae_scale

MAX_LENGTH = 128  # HiDreamImagePipeline's max_sequence_length, for all four encoders
CLIP_MAX_TOKENS = 218  # the pipeline's cap on CLIP prompts
NUM_TRAIN_TIMESTEPS = 1000
TRAIN_SHIFT = 3.0


@dataclass(frozen=True)
class HiDreamVariant:
    """A checkpoint's sampling defaults: HiDream-I1's own inference.py (MODEL_CONFIGS) and diffusers' scheduler
    configs (Full: UniPC, shift 3; Dev and Fast: flow-match Euler, shift 6 / 3, no CFG)."""

    name: str
    shift: float
    guidance: float
    steps: int
    cfg: bool  # classifier-free guidance; Dev and Fast are guidance-distilled


VARIANTS = {
    "full": HiDreamVariant("full", 3.0, 5.0, 50, True),
    "dev": HiDreamVariant("dev", 6.0, 0.0, 28, False),
    "fast": HiDreamVariant("fast", 3.0, 0.0, 16, False),
}


def variant_of(mc: ModelConfig, path: Path) -> HiDreamVariant:
    """`model.variant`, else the one variant the file (or folder) name names."""
    if mc.variant is not None:
        key = mc.variant.strip().lower()
        if key not in VARIANTS:
            raise ConfigError(f"config.process[0].model.variant: {mc.variant!r} is not a HiDream-I1 variant; use one of"
                              f" {', '.join(VARIANTS)}")
        return VARIANTS[key]
    words = set(re.split(r"[^a-z0-9]+", path.name.lower()))
    named = [v for k, v in VARIANTS.items() if k in words]
    if len(named) != 1:
        raise ConfigError(f"config.process[0].model.variant: the file name {path.name!r} does not say whether this is"
                          " HiDream-I1 Full, Dev or Fast (their sampling differs); set model.variant: full, dev or"
                          " fast")
    return named[0]


def load_hidream_transformer(path: Path, dtype: torch.dtype, llama_layers: int):
    from diffusers import HiDreamImageTransformer2DModel

    if path.is_dir():
        folder = diffusers_component(path, "transformer", "HiDream")
        return HiDreamImageTransformer2DModel.from_pretrained(str(folder), torch_dtype=dtype,
                                                              local_files_only=True).eval()
    shapes = safetensors_shapes(path)
    require_family(path, shapes, "hidream", "hidream")
    prefix = next(p for p in ORIGINAL_PREFIXES if f"{p}caption_projection.0.linear.weight" in shapes)
    shapes = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    cfg = transformer_config(shapes, llama_layers, str(path))
    with torch.device("meta"):
        model = HiDreamImageTransformer2DModel(**cfg)
    sd = dequantize_scaled_fp8(load_state_dict(path, dtype, prefix), str(path))
    missing, _ = model.load_state_dict(sd, strict=False, assign=True)
    if missing:
        raise ModelFileError(f"{path}: incomplete HiDream checkpoint, missing {missing[0]}")
    return model.eval()


class HiDreamModel(TrainingModel):
    arch = "hidream"
    patch = PATCH
    checkpointing = "diffusers"
    text_encoder_attrs = ("clip_l", "clip_g", "t5", "llama")

    def __init__(self, transformer: nn.Module, vae: nn.Module | None, encoders: dict[str, nn.Module | None],
                 tokenizers: dict, device: torch.device, dtype: torch.dtype, variant: HiDreamVariant,
                 max_length: int = MAX_LENGTH, sample_shift: float | None = None,
                 train_shift: float = TRAIN_SHIFT) -> None:
        self.denoiser = transformer
        self.vae = vae
        self.clip_l, self.clip_g, self.t5, self.llama = (encoders[k] for k in ("clip_l", "clip_g", "t5", "llama"))
        self.tokenizers = tokenizers
        self.device, self.dtype = torch.device(device), dtype
        self.variant = variant
        self.max_length = max_length
        self.sample_shift = sample_shift or variant.shift
        self._train_shift = train_shift
        self.distilled_guidance = not variant.cfg  # Dev / Fast previews take no classifier-free guidance
        self.vae_scale = vae_scale(vae) if vae is not None else 8
        # diffusers runs the experts under no_grad outside training mode (moe_infer); ComfyUI always runs the other path
        from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU

        self._moe = [m for m in transformer.modules() if isinstance(m, MOEFeedForwardSwiGLU)]

    # --- what the loop adapts ------------------------------------------------------------------
    def targets(self) -> list[Target]:
        return block_targets(self.denoiser)

    def latent_channels(self) -> int:
        return self.denoiser.config.out_channels or self.denoiser.config.in_channels

    def repeated_blocks(self) -> list[nn.Module]:
        return [*self.denoiser.double_stream_blocks, *self.denoiser.single_stream_blocks]

    def quantize(self) -> tuple[int, int]:
        """The blocks' linears in fp8, and the Llama's: its 16 GB in bf16 would not share a 24 GB card with T5-XXL
        while the dataset is encoded (once: the embeddings are cached)."""
        n, saved = quantize_blocks(self.repeated_blocks())
        if self.llama is not None:
            n2, saved2 = quantize_blocks(list(self.llama.layers))
            n, saved = n + n2, saved + saved2
        return n, saved

    def compile_blocks(self) -> None:
        """The experts route tokens by data-dependent masks, which break a full graph: compiled with graph breaks."""
        import torch._dynamo

        blocks = self.repeated_blocks()
        cfg = torch._dynamo.config
        names = ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit")
        for name in names:
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 2 * len(blocks)))
        for b in blocks:
            b.compile(fullgraph=False)

    # --- encoders ------------------------------------------------------------------------------
    def _clip_pooled(self, model: nn.Module, tokenizer, captions: list[str]) -> torch.Tensor:
        positions = model.config.max_position_embeddings
        tok = tokenizer(captions, padding="max_length", max_length=min(self.max_length, CLIP_MAX_TOKENS, positions),
                        truncation=True, return_tensors="pt")
        dev = next(model.parameters()).device
        return model(tok.input_ids.to(dev)).text_embeds.float().cpu()

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> Conditioning:
        """As HiDreamImagePipeline.encode_prompt: pooled CLIP-L + CLIP-G, T5's states with its mask, and Llama's
        hidden states after each layer (b, layers, tokens, width), in the training dtype (32 MiB a caption in bf16)."""
        if not self.text_encoders_loaded():
            raise RuntimeError("text encoders were released; embeddings must come from the cache")
        tk = self.tokenizers
        pooled = torch.cat([self._clip_pooled(self.clip_l, tk["clip_l"], captions),
                            self._clip_pooled(self.clip_g, tk["clip_g"], captions)], dim=-1)
        t5, _ = run_t5(tk["t5"], self.t5, captions, min(self.max_length, tk["t5"].model_max_length))
        tok = tk["llama"](captions, padding="max_length", max_length=min(self.max_length, tk["llama"].model_max_length),
                          truncation=True, add_special_tokens=True, return_tensors="pt")
        dev = next(self.llama.parameters()).device
        out = self.llama(tok.input_ids.to(dev), attention_mask=tok.attention_mask.to(dev), output_hidden_states=True)
        llama = torch.stack(out.hidden_states[1:], dim=1).to(self.dtype).cpu()
        return {"t5": t5, "llama": llama, "pooled": pooled}

    # --- denoising -----------------------------------------------------------------------------
    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning,
                guidance: float | None = None) -> torch.Tensor:
        dev, dt = self.device, self.dtype
        b, _, h, w = noisy.shape
        tokens = patchify(noisy.to(dev, dt), self.patch)
        s = sigmas.float().reshape(-1)
        t = (s.expand(b) if s.numel() == 1 else s).to(dev) * NUM_TRAIN_TIMESTEPS
        for m in self._moe:  # the experts' differentiable path (ComfyUI's), without the unused auxiliary loss
            m.training, m.gate.training = True, False
        out = self.denoiser(
            hidden_states=tokens, timesteps=t, encoder_hidden_states_t5=cond["t5"].to(dev, dt),
            encoder_hidden_states_llama3=cond["llama"].to(dev, dt).transpose(0, 1),
            pooled_embeds=cond["pooled"].to(dev, dt), img_ids=image_ids(h, w, b, dev, self.patch),
            img_sizes=[(h // self.patch, w // self.patch)] * b,
            hidden_states_masks=torch.ones(b, tokens.shape[1], device=dev, dtype=dt), return_dict=False,
        )[0]
        if self.denoiser.training and not self.denoiser.config.force_inference_output:
            out = unpatchify_training(out, h, w, self.patch)  # diffusers' training-mode layout (b, c, tokens, p*p)
        return -out

    def sample_sigmas(self, steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        return flow_match_euler_sigmas(steps, self.sample_shift)

    def train_shift(self) -> float:
        return self._train_shift

    def save_metadata(self) -> dict[str, str]:
        v = self.variant.name
        return {"ss_base_model_version": f"hidream_i1_{v}", "modelspec.architecture": f"HiDream-I1-{v.title()}/lora",
                "eridiffusion.arch": self.arch}


def _encoder_files(src: ModelSources):
    found = sort_encoders(src.text_encoder_paths)
    for attr, sub in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"), ("t5", "text_encoder_3")):
        folder = src.component(sub)
        if getattr(found, attr) is None and folder is not None:
            setattr(found, attr, identify_text_encoder(folder))
    if found.llama is None and src.component("text_encoder_4") is not None:
        found.llama = src.component("text_encoder_4")
    missing = found.missing()
    if missing:
        raise ModelFileError("model.text_encoder_paths: HiDream-I1 needs " + ", ".join(missing) + "; list the local"
                             " files (ComfyUI keeps them in models/text_encoders)")
    return found


def load_hidream(mc: ModelConfig, device: torch.device, dtype: torch.dtype) -> HiDreamModel:
    """HiDream-I1 from local files; everything stays on the CPU (the prepare step places it). Every file and
    tokenizer is found before the 34 GB transformer is read."""
    src = ModelSources(mc, "HiDream-I1")
    variant = variant_of(mc, src.root)
    files = _encoder_files(src)
    tokenizers = {"clip_l": src.tokenizer("clip", src.tokenizer_path(0), "tokenizer"),
                  "clip_g": src.tokenizer("clip", src.tokenizer_path(1), "tokenizer_2"),
                  "t5": src.tokenizer("t5", src.tokenizer_path(2), "tokenizer_3")}
    candidates = [c for c in (src.component("tokenizer_4"), files.llama if files.llama.is_dir() else None) if c]
    tokenizers["llama"] = llama_tokenizer(src.tokenizer_path(3), candidates, src.near)
    vae_path = src.vae("ae.safetensors (Flux's)")
    transformer = load_hidream_transformer(src.root, dtype, llama_layers_of(files.llama))
    cfg = transformer.config
    encoders = {
        "clip_l": load_clip_projected(files.clip_l, dtype, tokenizers["clip_l"].eos_token_id, "clip_l"),
        "clip_g": load_clip_projected(files.clip_g, dtype, tokenizers["clip_g"].eos_token_id, "clip_g"),
        "t5": load_t5_encoder(files.t5, dtype),
        "llama": load_llama(files.llama, dtype),
    }
    pooled = encoders["clip_l"].config.projection_dim + encoders["clip_g"].config.projection_dim
    if pooled != cfg.text_emb_dim:
        raise ModelFileError(f"{files.clip_l.path}, {files.clip_g.path}: pooled CLIP widths add up to {pooled}; the"
                             f" model reads {cfg.text_emb_dim} (CLIP-L 768 + CLIP-G 1280)")
    if encoders["t5"].config.d_model != cfg.caption_channels[0]:
        raise ModelFileError(f"{files.t5.path}: T5 width {encoders['t5'].config.d_model} does not match the model's"
                             f" text input {cfg.caption_channels[0]}")
    if encoders["llama"].config.hidden_size != cfg.caption_channels[1]:
        raise ModelFileError(f"{files.llama}: Llama width {encoders['llama'].config.hidden_size} does not match the"
                             f" model's Llama input {cfg.caption_channels[1]}")
    if max(cfg.llama_layers) >= encoders["llama"].config.num_hidden_layers:
        raise ModelFileError(f"{files.llama}: {encoders['llama'].config.num_hidden_layers} Llama layers; the model"
                             f" reads layer {max(cfg.llama_layers)}")
    vae = load_vae(vae_path, dtype, FLUX_VAE_SCALE, FLUX_VAE_SHIFT, cfg.out_channels or cfg.in_channels)
    return HiDreamModel(transformer, vae, encoders, tokenizers, torch.device(device), dtype, variant,
                        mc.t5_max_length or MAX_LENGTH, mc.sample_shift, mc.train_shift or TRAIN_SHIFT)


FAMILIES = [
    Family("hidream", "HiDream-I1 Full / Dev / Fast (17B, mixture of experts): CLIP-L + CLIP-G + T5-XXL +"
           " Llama-3.1-8B (every layer), Flux VAE", load_hidream, comfy_clip_type="hidream",
           model_defaults={"variant": None, "sample_shift": None, "train_shift": TRAIN_SHIFT},
           tokenizers=(("clip", 0, "tokenizer"), ("clip", 1, "tokenizer_2"), ("t5", 2, "tokenizer_3")),
           cuda_graphs_refusal="its step reads values on the host (a capture failed there: bench/cuda_graph_families.py)"),
]
