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
from . import registry
from .base import Conditioning, FlowObjective, Target, TrainingModel, time_shift_linear
from .detect import require_family
from .files import (diffusers_component, find_weights_file, is_diffusers_folder, load_state_dict, local_path,
                    safetensors_shapes)
from .flux_layout import block_targets
from .sd3_layout import (
    CLIP_G_PREFIX,
    CLIP_L_PREFIX,
    T5_PREFIX,
    VAE_PREFIX,
    diffusers_config_from_original,
    dequantize_original,
    diffusers_to_original,
    layout_of,
    original_to_diffusers,
    transformer_prefix,
    transformer_shapes,
)
from .text_encoders import (EncoderFile, find_tokenizer, identify_text_encoder, load_clip_projected, load_t5_encoder,
                            load_tokenizer)
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
    sd = dequantize_original({k: v for k, v in load_state_dict(path, dtype, prefix).items() if k in own}, str(path))
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
        self.t5_max_length = t5_max_length
        self.device = torch.device(device)
        self.dtype = dtype
        patch = transformer.config.patch_size
        self.pixel_factor = (vae_scale(vae) if vae is not None else 8) * patch

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
    def text_encoders_loaded(self) -> bool:
        return self.clip_l is not None and self.clip_g is not None and (self.t5 is not None or not self.has_t5)

    def release_text_encoders(self) -> None:
        self.clip_l = self.clip_g = self.t5 = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

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
        """FlowMatchEulerDiscreteScheduler(shift=3).set_timesteps(steps): evenly spaced from 1 to its smallest
        training sigma (shift(1/1000)), shifted by 3, then 0."""
        lowest = time_shift_linear(SHIFT, torch.tensor(1.0 / NUM_TRAIN_TIMESTEPS, dtype=torch.float64))
        sig = time_shift_linear(SHIFT, torch.linspace(1.0, float(lowest), steps, dtype=torch.float64))
        return torch.cat([sig, torch.zeros(1, dtype=sig.dtype)]).float()

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


def load_sd3(mc: ModelConfig, device: str, dtype: torch.dtype, arch: str = "sd3") -> SD3Model:
    root = local_path(mc.name_or_path, "model.name_or_path")
    transformer = load_sd3_transformer(root, dtype, arch)
    folder = root if is_diffusers_folder(root) else None
    cfg = transformer.config

    te_paths = [local_path(p, f"model.text_encoder_paths[{i}]") for i, p in enumerate(mc.text_encoder_paths)]
    found = _classify_encoders(te_paths)
    for role, ef in _checkpoint_parts(root).items():
        found.setdefault(role, ef)
    if folder is not None:
        for role, sub in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"), ("t5", "text_encoder_3")):
            if role not in found and (folder / sub).is_dir():
                found[role] = EncoderFile("t5" if role == "t5" else "clip", folder / sub, "")
    missing = [k for k in ("clip_l", "clip_g") if k not in found]
    if missing:
        names = {"clip_l": "CLIP-L (clip_l.safetensors)", "clip_g": "CLIP-G (clip_g.safetensors)"}
        raise ModelFileError(
            "model.text_encoder_paths: SD3 needs " + " and ".join(names[k] for k in missing)
            + " (T5-XXL is optional); use a checkpoint that includes them or list the local files"
            " (ComfyUI keeps them in models/text_encoders)"
        )

    # tokenizer_paths: [CLIP] or [CLIP, T5] or [CLIP-L, CLIP-G, T5]
    tok_paths = [local_path(p, f"model.tokenizer_paths[{i}]") for i, p in enumerate(mc.tokenizer_paths)]
    near = [root, *te_paths]
    tok_l = load_tokenizer(find_tokenizer("clip", tok_paths[0] if tok_paths else None,
                                          [folder / "tokenizer"] if folder else [], near))
    g_explicit = tok_paths[1] if len(tok_paths) == 3 else None
    if g_explicit is not None or (folder is not None and (folder / "tokenizer_2").is_dir()):
        tok_g = load_tokenizer(find_tokenizer("clip", g_explicit, [folder / "tokenizer_2"] if folder else [], near))
    else:
        # CLIP-G shares CLIP-L's vocabulary; SD3 (like SDXL) pads its prompts with "!" rather than end-of-text
        tok_g = load_tokenizer(find_tokenizer("clip", tok_paths[0] if tok_paths else None, [], near))
        if "!" in tok_g.get_vocab():
            tok_g.pad_token = "!"

    clip_l = load_clip_projected(found["clip_l"], dtype, tok_l.eos_token_id, "clip_l")
    clip_g = load_clip_projected(found["clip_g"], dtype, tok_g.eos_token_id, "clip_g")
    t5 = tok_t5 = None
    if "t5" in found:
        t5_explicit = tok_paths[-1] if len(tok_paths) >= 2 else None
        tok_t5 = load_tokenizer(find_tokenizer("t5", t5_explicit, [folder / "tokenizer_3"] if folder else [], near))
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

    if mc.vae_path:
        vae_src = local_path(mc.vae_path, "model.vae_path")
    elif not root.is_dir() and f"{VAE_PREFIX}encoder.conv_in.weight" in safetensors_shapes(root):
        vae_src = root
    elif folder is not None and (folder / "vae").is_dir():
        vae_src = folder / "vae"
    else:
        raise ModelFileError("model.vae_path: SD3 needs its VAE (the 16-channel SD3 VAE, in ComfyUI's models/vae)")
    vae = load_vae(vae_src, dtype, SD3_VAE_SCALE, SD3_VAE_SHIFT, cfg.in_channels)

    dev = torch.device(device)
    for m in (vae, clip_l, clip_g, t5):  # the transformer follows in place_denoiser(), after the encoding
        if m is not None:
            m.to(dev)
    return SD3Model(transformer, vae, clip_l, clip_g, t5, tok_l, tok_g, tok_t5, mc.t5_max_length or T5_MAX_LENGTH,
                    dev, dtype, arch)


# --- small random SD3-layout files (demo, tests) -------------------------------------------------

def sd3_diffusers_config(hidden: int = 32, head_dim: int = 8, layers: int = 2, joint_dim: int = 32, pooled: int = 32,
                         dual=(0,), qk_norm: bool = True, pos_max: int = 16, patch: int = 2, in_channels: int = 16) -> dict:
    return dict(
        sample_size=min(128, pos_max * patch), patch_size=patch, in_channels=in_channels, num_layers=layers,
        attention_head_dim=head_dim, num_attention_heads=hidden // head_dim, joint_attention_dim=joint_dim,
        caption_projection_dim=hidden, pooled_projection_dim=pooled, out_channels=in_channels,
        pos_embed_max_size=pos_max, dual_attention_layers=tuple(dual), qk_norm="rms_norm" if qk_norm else None,
    )


def sd3_original_state_dict(cfg: dict, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random weights for `cfg` in the original layout: scaled matrices, norm scales near 1, small nonzero biases
    and a visible position table (so a misplaced bias, scale, swap or crop shows in the outputs)."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(**cfg)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in sorted(model.state_dict().items()):
        shape = tuple(v.shape)
        if k == "pos_embed.pos_embed":
            t = 0.5 * torch.randn(shape, generator=g)
        elif len(shape) >= 2:
            fan_in = 1
            for d in shape[1:]:
                fan_in *= d
            t = torch.randn(shape, generator=g) / fan_in**0.5
        elif "norm" in k:
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = 0.05 * torch.randn(shape, generator=g)
        sd[k] = t.to(dtype)
    return diffusers_to_original(sd, cfg)


def _clip_state(vocab: int, hidden: int, layers: int, seed: int, bos: int, eos: int) -> dict[str, torch.Tensor]:
    """A random CLIP text tower with a text projection, in ComfyUI's clip_l / clip_g key layout."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), max_position_embeddings=77, projection_dim=hidden,
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    model = CLIPTextModelWithProjection(cfg)
    return {(k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v
            for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def write_sd3_files(folder: Path, cfg: dict, clip_l_width: int = 16, clip_g_width: int = 16, clip_layers: int = 2,
                    t5_layers: int = 1, vae_widths=(32, 32), full: bool = True, seed: int = 21,
                    dtype: torch.dtype = torch.float32, name: str = "sd3") -> dict:
    """A random SD3 in the files users keep: one full checkpoint (transformer under model.diffusion_model.,
    CLIP-L, CLIP-G, T5 under text_encoders., VAE under first_stage_model.) or, with `full=False`, a bare
    transformer plus clip_l / clip_g / t5 / vae files. CLIP widths must sum to at most cfg's joint_attention_dim
    and to its pooled_projection_dim. Returns the `model:` config."""
    from ..fileio import save_safetensors_atomic
    from . import tiny

    folder.mkdir(parents=True, exist_ok=True)
    tok_clip, tok_t5 = folder / "tokenizer", folder / "tokenizer_t5"
    ct = tiny.build_tokenizer(tok_clip, "clip")
    tt = tiny.build_tokenizer(tok_t5, "t5")
    transformer = sd3_original_state_dict(cfg, seed, dtype)
    clip_l = {k: v.to(dtype) for k, v in _clip_state(len(ct), clip_l_width, clip_layers, seed + 1, ct.bos_token_id,
                                                     ct.eos_token_id).items()}
    clip_g = {k: v.to(dtype) for k, v in _clip_state(len(ct), clip_g_width, clip_layers, seed + 2, ct.bos_token_id,
                                                     ct.eos_token_id).items()}
    t5_file = folder / f"{name}_t5.safetensors"
    tiny.make_t5_file(t5_file, len(tt), d_model=cfg["joint_attention_dim"], layers=t5_layers, seed=seed + 3, dtype=dtype)
    vae = tiny.random_state_dict(tiny.ldm_vae_shapes(list(vae_widths), 1, cfg["in_channels"]), seed + 4, dtype)
    out = {"arch": "sd3", "tokenizer_paths": [str(tok_clip), str(tok_t5)], "t5_max_length": 16}
    if full:
        sd = {f"model.diffusion_model.{k}": v for k, v in transformer.items()}
        sd.update({f"{CLIP_L_PREFIX}{k}": v for k, v in clip_l.items()})
        sd.update({f"{CLIP_G_PREFIX}{k}": v for k, v in clip_g.items()})
        sd.update({f"{T5_PREFIX}{k}": v for k, v in load_state_dict(t5_file).items()})
        sd.update({f"{VAE_PREFIX}{k}": v for k, v in vae.items()})
        t5_file.unlink()
        path = folder / f"{name}.safetensors"
        save_safetensors_atomic(sd, path)
        out["name_or_path"] = str(path)
    else:
        paths = {n: folder / f"{name}_{n}.safetensors" for n in ("transformer", "clip_l", "clip_g", "vae")}
        save_safetensors_atomic(transformer, paths["transformer"])
        save_safetensors_atomic(clip_l, paths["clip_l"])
        save_safetensors_atomic(clip_g, paths["clip_g"])
        save_safetensors_atomic(vae, paths["vae"])
        out.update(name_or_path=str(paths["transformer"]), vae_path=str(paths["vae"]),
                   text_encoder_paths=[str(paths["clip_l"]), str(paths["clip_g"]), str(t5_file)])
    return out


def comfyui_sized_config(layers: int = 2, joint_dim: int = 64, pooled: int = 64, pos_max: int = 32) -> dict:
    """The smallest SD3.5-style MMDiT real ComfyUI detects as SD3: ComfyUI derives depth (= blocks = heads) from
    width / 64, so `layers` blocks of width 64 x layers in heads of 64; qk-norm, block 0 with dual attention."""
    return sd3_diffusers_config(hidden=64 * layers, head_dim=64, layers=layers, joint_dim=joint_dim, pooled=pooled,
                                dual=(0,), qk_norm=True, pos_max=pos_max)


def make_sd3_demo(folder: Path) -> dict:
    """A random SD 3.5 Medium-style MMDiT (2 blocks of width 128, qk-norm, dual attention in block 0) that
    ComfyUI detects as SD3, as a bare diffusion_models file, with small CLIP-L, CLIP-G, T5 and VAE files.
    Returns the `model:` config."""
    transformer = folder / "sd3_demo_transformer.safetensors"
    if transformer.exists() and (folder / "tokenizer").exists() and (folder / "tokenizer_t5").exists():
        return {
            "arch": "sd3", "name_or_path": str(transformer), "vae_path": str(folder / "sd3_demo_vae.safetensors"),
            "text_encoder_paths": [str(folder / f"sd3_demo_{n}.safetensors") for n in ("clip_l", "clip_g", "t5")],
            "tokenizer_paths": [str(folder / "tokenizer"), str(folder / "tokenizer_t5")], "t5_max_length": 16,
        }
    return write_sd3_files(folder, comfyui_sized_config(), clip_l_width=32, clip_g_width=32,
                           vae_widths=(32, 32, 32, 32), full=False, name="sd3_demo")


registry.register(
    registry.Family(
        arch="sd3",
        description="Stable Diffusion 3 / 3.5 (Medium, Large, Large-Turbo): CLIP-L + CLIP-G (+ optional T5-XXL),"
                    " 16-channel VAE",
        load=load_sd3,
        make_demo=make_sd3_demo,
    )
)
