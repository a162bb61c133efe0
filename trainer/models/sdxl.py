"""Stable Diffusion XL on the diffusers backend, from local files.

The UNet loads from a single-file checkpoint in the original (LDM / ComfyUI) layout — a full
`checkpoints/` file with CLIP-L, OpenCLIP-G and the VAE inside, or a bare `diffusion_models/` UNet — with
its config derived from the shapes, or from a local diffusers folder.

Noise levels are k-diffusion sigmas over SDXL's DDPM schedule (scaled-linear betas 0.00085..0.012, 1000
steps): x_t = x0 + sigma * n, the UNet sees x_t / sqrt(sigma^2 + 1) (= sqrt(abar) x0 + sqrt(1 - abar) n)
at the timestep whose sigma this is. Training draws discrete timesteps (uniform unless train.timestep_type
says otherwise, see `train_sigmas`); the target is eps, or
v = sqrt(abar) n - sqrt(1 - abar) x0 for v-prediction models. Sampling is diffusers' EulerDiscreteScheduler
with SDXL's "leading" spacing (steps_offset 1).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ModelFileError
from .base import Conditioning, Target, TargetMember, TrainingModel
from .detect import require_family
from .device_constants import on_device
from .family import Family
from .files import diffusers_component, find_weights_file, load_state_dict, safetensors_metadata, safetensors_shapes
from .objectives import EpsObjective, VObjective
from .schedules import sample_flow_sigmas
from .sources import ModelSources
from .sdxl_layout import (
    CLIP_G_PREFIX,
    CLIP_L_PREFIX,
    NUM_TIME_IDS,
    TIME_ID_CHANNELS,
    UNET_PREFIXES,
    VAE_PREFIX,
    diffusers_to_ldm,
    is_open_clip,
    ldm_names,
    ldm_to_diffusers,
    transformers_to_open_clip,
    unet_config_from_diffusers,
    unet_config_from_ldm,
)
from .text_encoders import EncoderFile, identify_text_encoder, load_clip_projected, load_clip_text_model
from .vae import load_vae, vae_scale

log = logging.getLogger("trainer")

SDXL_VAE_SCALE = 0.13025
NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012
STEPS_OFFSET = 1  # SDXL's scheduler config ("leading" spacing)
CLIP_MAX_LENGTH = 77
# the Linears of each CLIP encoder layer that text-encoder LoRAs adapt (kohya, ComfyUI's LORA_CLIP_MAP)
CLIP_LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                      "mlp.fc2")
# ComfyUI's key prefixes for SDXL's two encoders (comfy.lora.model_lora_keys_clip: te1 = CLIP-L, te2 = CLIP-G)
TEXT_ENCODER_KEYS = (("clip_l", "lora_te1_"), ("clip_g", "lora_te2_"))


def ddpm_sigmas(beta_start: float = BETA_START, beta_end: float = BETA_END,
                steps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) for t = 0..steps-1 over scaled-linear betas, computed as diffusers'
    schedulers do (float32). The defaults are SDXL's schedule."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float32) ** 2
    abar = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - abar) / abar) ** 0.5


# --- the UNet side, shared with the SDXL-layout families (Kolors) by composition ----------------------

def unet_targets(unet: nn.Module) -> list[Target]:
    """Linears of the spatial transformers (attn1/attn2 q/k/v/out, ff, proj_in/out); resnet and resampler convs
    as conv targets. Keys are ComfyUI's LDM names (`diffusion_model.input_blocks.4.1...`)."""
    to_ldm = ldm_names(unet.config)
    out = []
    for name, mod in unet.named_modules():
        is_conv = isinstance(mod, nn.Conv2d)
        if isinstance(mod, nn.Linear) and ".attentions." in name:
            kind, fin, fout = "linear", mod.in_features, mod.out_features
        elif is_conv and ".attentions." in name:  # 1x1 conv projections (SD1-style UNets)
            kind, fin, fout = "conv", mod.in_channels, mod.out_channels
        elif is_conv and (".resnets." in name or "samplers." in name) and mod.groups == 1:
            kind, fin, fout = "conv", mod.in_channels, mod.out_channels
        else:
            continue
        ldm = to_ldm(name)
        if ldm is None:
            raise RuntimeError(f"no ComfyUI name for UNet module {name}")
        out.append(Target(f"diffusion_model.{ldm}", fin, fout, [TargetMember(mod, slice(0, fout))], kind=kind,
                          aliases=(f"unet.{name}",)))
    return out


def unet_blocks(unet: nn.Module) -> list[nn.Module]:
    """The UNet's resnets and transformer blocks, in module order (checkpointing, quantizing, compiling)."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    return [m for m in unet.modules() if isinstance(m, (ResnetBlock2D, BasicTransformerBlock))]


def table_timesteps(log_sigmas: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The (fractional) timestep of each sigma: linear interpolation in log sigma over the DDPM table, on the
    sigmas' device (a training step's sigmas are on the card: no host round trip)."""
    if log_sigmas.device != sigmas.device:
        log_sigmas = on_device(("log sigmas", id(log_sigmas)), lambda: log_sigmas, sigmas.device, anchor=log_sigmas)
    ls = sigmas.to(torch.float64).clamp_min(1e-10).log()
    hi = torch.searchsorted(log_sigmas, ls).clamp(1, log_sigmas.shape[0] - 1)
    lo = hi - 1
    w = ((ls - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])).clamp(0, 1)
    return (lo + w).float()


def discrete_train_sigmas(table: torch.Tensor, kind: str | None, batch: int, gen: torch.Generator) -> torch.Tensor:
    """Sigmas of discrete DDPM timesteps. Unset or `linear`: uniform over the table, as SDXL was trained (kohya,
    ai-toolkit). Otherwise the flow families' distribution of u in (0, 1] is drawn and mapped to the timestep
    floor(u * steps), as OneTrainer's timestep distributions do for SDXL: `sigmoid` logit-normal (dense in the
    middle), `shift` uniform shifted by 3 toward noise, `flux_shift` the same (no resolution shift here)."""
    steps = table.shape[0]
    if kind in (None, "linear"):
        t = torch.randint(0, steps, (batch,), generator=gen)
    else:
        u = sample_flow_sigmas(kind, batch, gen, None)
        t = (u * steps).long().clamp(0, steps - 1)
    return table[t]


def leading_sigmas(table: torch.Tensor, steps: int, offset: int = STEPS_OFFSET) -> torch.Tensor:
    """EulerDiscreteScheduler's sigmas with "leading" spacing: timesteps every len(table) // steps, + offset, then 0."""
    import numpy as np

    n = table.shape[0]
    steps = max(1, min(int(steps), n))
    ts = (np.arange(0, steps) * (n // steps)).round()[::-1].astype(np.int64) + offset
    return torch.cat([table[torch.from_numpy(ts.copy())], torch.zeros(1)])


def predict_unet(unet: nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning,
                 timesteps: Callable[[torch.Tensor], torch.Tensor], vae_scale: int, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    """The UNet's output for k-diffusion latents: input scaled by 1 / sqrt(sigma^2 + 1), at `timesteps(sigmas)`,
    with the pooled text and SDXL's six size ids (the bucket as original and target size, no crop, unless `cond`
    carries `time_ids`)."""
    b, _, h, w = noisy.shape
    s = sigmas.float().reshape(-1).expand(b) if sigmas.numel() == 1 else sigmas.float().reshape(-1)
    t = timesteps(s).to(device)
    c_in = torch.rsqrt(s.to(device) ** 2 + 1).view(-1, 1, 1, 1)
    x = (noisy.to(device, torch.float32) * c_in).to(dtype)
    time_ids = cond.get("time_ids")
    if time_ids is None:
        # original size = target size = the bucket, no crop (what the pipeline does at sampling)
        H, W = h * vae_scale, w * vae_scale
        time_ids = on_device(("sdxl time ids", H, W), lambda: torch.tensor([[H, W, 0, 0, H, W]], dtype=torch.float32),
                             device).expand(b, NUM_TIME_IDS)
    return unet(
        x, t, encoder_hidden_states=cond["crossattn"].to(device, dtype),
        added_cond_kwargs={"text_embeds": cond["pooled"].to(device, dtype), "time_ids": time_ids.to(device, dtype)},
        return_dict=False,
    )[0]


class SDXLModel(TrainingModel):
    arch = "sdxl"
    text_encoder_attrs = ("clip_l", "clip_g")

    def __init__(self, unet: nn.Module, vae: nn.Module, clip_l: nn.Module | None, clip_g: nn.Module | None,
                 tok_l, tok_g, device: torch.device, dtype: torch.dtype, v_pred: bool = False) -> None:
        self.denoiser = unet
        self.vae = vae
        self.clip_l, self.clip_g = clip_l, clip_g
        self.tok_l, self.tok_g = tok_l, tok_g
        self.device = torch.device(device)
        self.dtype = dtype
        self.v_pred = v_pred
        self.objective = VObjective() if v_pred else EpsObjective()
        self.vae_scale = vae_scale(vae)
        self.sigma_table = ddpm_sigmas()
        self._log_sigmas = self.sigma_table.double().log()

    # --- what the loop adapts ------------------------------------------------------------------
    def targets(self) -> list[Target]:
        return unet_targets(self.denoiser)

    def text_encoder_targets(self) -> list[Target]:
        """q/k/v/out projections and MLP fc1/fc2 of every layer of CLIP-L and CLIP-G, keyed as ComfyUI reads them:
        `lora_te1_text_model_encoder_layers_0_self_attn_q_proj` (CLIP-L), `lora_te2_...` (CLIP-G)."""
        if not self.text_encoders_loaded():
            raise RuntimeError("text encoders were released; they must stay loaded to be trained")
        out = []
        for attr, prefix in TEXT_ENCODER_KEYS:
            encoder = getattr(self, attr)
            encoder = getattr(encoder, "text_model", encoder)  # transformers 5 flattens CLIPTextModel
            for i, layer in enumerate(encoder.encoder.layers):
                for name in CLIP_LAYER_LINEARS:
                    mod = layer.get_submodule(name)
                    path = f"text_model.encoder.layers.{i}.{name}"
                    out.append(Target(prefix + path.replace(".", "_"), mod.in_features, mod.out_features,
                                      [TargetMember(mod, slice(0, mod.out_features))], aliases=(f"{attr}.{path}",),
                                      component="text_encoder"))
        return out

    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels

    def repeated_blocks(self) -> list[nn.Module]:
        return unet_blocks(self.denoiser)

    # --- encoders ------------------------------------------------------------------------------
    @staticmethod
    def _hidden(encoder: nn.Module, tokenizer, captions: list[str]):
        ids = tokenizer(
            captions, padding="max_length", max_length=min(CLIP_MAX_LENGTH, tokenizer.model_max_length),
            truncation=True, return_tensors="pt",
        ).input_ids
        return encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)

    def _encode(self, captions: list[str]) -> Conditioning:
        """As StableDiffusionXLPipeline.encode_prompt: penultimate hidden states of CLIP-L and CLIP-G side by
        side, pooled = CLIP-G's projected text embedding (on the encoders' device, in the caller's grad mode)."""
        if not self.text_encoders_loaded():
            raise RuntimeError("text encoders were released; embeddings must come from the cache")
        out_l = self._hidden(self.clip_l, self.tok_l, captions)
        out_g = self._hidden(self.clip_g, self.tok_g, captions)
        embeds = torch.cat([out_l.hidden_states[-2].float(), out_g.hidden_states[-2].float()], dim=-1)
        return {"crossattn": embeds, "pooled": out_g.text_embeds.float()}

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> Conditioning:
        return {k: v.cpu() for k, v in self._encode(captions).items()}

    def encode_text_for_training(self, captions: list[str]) -> Conditioning:
        # with grad: adapters on the encoders (train.train_text_encoder) learn; without them nothing is recorded
        return self._encode(captions)

    # --- denoising -----------------------------------------------------------------------------
    def sigma_to_t(self, sigmas: torch.Tensor) -> torch.Tensor:
        return table_timesteps(self._log_sigmas, sigmas)

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning, guidance: float | None = None) -> torch.Tensor:
        return predict_unet(self.denoiser, noisy, sigmas, cond, self.sigma_to_t, self.vae_scale, self.device, self.dtype)

    def schedule_position(self, sigmas: torch.Tensor) -> torch.Tensor:
        return self.sigma_to_t(sigmas) / (NUM_TRAIN_TIMESTEPS - 1)

    def train_sigmas(self, kind: str | None, batch: int, gen: torch.Generator, latent_shape: tuple[int, ...]) -> torch.Tensor:
        return discrete_train_sigmas(self.sigma_table, kind, batch, gen)

    def sample_sigmas(self, steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """EulerDiscreteScheduler's sigmas for SDXL: "leading" timesteps (every 1000 // steps, + 1), then 0."""
        return leading_sigmas(self.sigma_table, steps)

    def save_metadata(self) -> dict[str, str]:
        return {
            "ss_base_model_version": "sdxl_base_v1-0",
            "ss_v2": "False",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "modelspec.prediction_type": "v" if self.v_pred else "epsilon",
            "eridiffusion.arch": self.arch,
        }


# --- loading -------------------------------------------------------------------------------------

def _unet_prefix(shapes) -> str | None:
    return next((p for p in UNET_PREFIXES if f"{p}input_blocks.0.0.weight" in shapes), None)


def load_sdxl_unet(path: Path, dtype: torch.dtype, arch: str = "sdxl", family: str = "sdxl"):
    """UNet2DConditionModel from a single file — the LDM layout (full checkpoint or bare UNet) or diffusers' (a
    pipeline's unet/diffusion_pytorch_model.safetensors) — with its config from the shapes, or a diffusers folder.
    `family`: what the file's keys must say it is (detect.SIGNATURES), so another family's file is one clear error."""
    from diffusers import UNet2DConditionModel

    if path.is_dir():
        folder = diffusers_component(path, "unet", "SDXL")
        # a folder holding only the fp16 variant (Kolors-diffusers ships so) is read as that variant
        variant = "fp16" if not any(folder.glob("diffusion_pytorch_model.safetensors*")) \
            and any(folder.glob("diffusion_pytorch_model.fp16.safetensors*")) else None
        return UNet2DConditionModel.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True,
                                                    variant=variant)
    shapes = safetensors_shapes(path)
    require_family(path, shapes, family, arch)
    if "conv_in.weight" in shapes:  # diffusers' names
        cfg = unet_config_from_diffusers(shapes, str(path))
        with torch.device("meta"):
            model = UNet2DConditionModel(**cfg)
        sd = load_state_dict(path, dtype)
        missing = sorted(set(model.state_dict()) - set(sd))
        unknown = sorted(set(sd) - set(model.state_dict()))
        if missing or unknown:
            what = f"missing {len(missing)} tensors (e.g. {missing[0]})" if missing else f"{len(unknown)} unknown" \
                f" tensors (e.g. {unknown[0]})"
            raise ModelFileError(f"{path}: not a complete diffusers-layout UNet: {what}")
        model.load_state_dict(sd, strict=True, assign=True)
        return model
    prefix = _unet_prefix(shapes)
    # a bare UNet keeps every key; a full checkpoint's other parts sit under other prefixes
    unet_shapes = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    if not prefix:
        unet_shapes = {k: v for k, v in unet_shapes.items() if not k.startswith(("conditioner.", "first_stage_model."))
                       and k not in ("v_pred", "ztsnr")}
    cfg = unet_config_from_ldm(unet_shapes, str(path))
    with torch.device("meta"):
        model = UNet2DConditionModel(**cfg)
    model_keys = set(model.state_dict())
    sd = load_state_dict(path, dtype, prefix)
    sd = {k: v for k, v in sd.items() if k in unet_shapes}
    sd = ldm_to_diffusers(sd, model.config, model_keys, str(path))
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def _ckpt_parts(path: Path) -> set[str]:
    """Which SDXL parts a single file holds: unet, clip_l, clip_g, vae."""
    if path.is_dir():
        return set()
    shapes = safetensors_shapes(path)
    parts = set()
    if _unet_prefix(shapes) is not None:
        parts.add("unet")
    if f"{CLIP_L_PREFIX}text_model.embeddings.token_embedding.weight" in shapes:
        parts.add("clip_l")
    if is_open_clip(shapes, CLIP_G_PREFIX):
        parts.add("clip_g")
    if f"{VAE_PREFIX}encoder.conv_in.weight" in shapes:
        parts.add("vae")
    return parts


def _token_width(shapes: dict[str, tuple[int, ...]]) -> int | None:
    for k, v in shapes.items():
        if k.endswith("token_embedding.weight"):
            return v[1]
    return None


def _shapes_of(path: Path) -> dict[str, tuple[int, ...]]:
    files = find_weights_file(path) if path.is_dir() else [path]
    out: dict[str, tuple[int, ...]] = {}
    for f in files:
        out.update(safetensors_shapes(f))
    return out


G_PREFIXES = (CLIP_G_PREFIX, "clip_g.transformer.", "text_encoders.clip_g.transformer.", "transformer.", "model.", "")


def _clip_g_prefix(shapes) -> str | None:
    for p in G_PREFIXES:
        if is_open_clip(shapes, p) or f"{p}text_projection.weight" in shapes:
            return p
    return None


def _classify_encoders(paths: list[Path]) -> dict[str, tuple[Path, str]]:
    """Which listed file is CLIP-L and which CLIP-G: the OpenCLIP layout or width 1280 is G, width 768 is L;
    of two others, the only one with a text projection is G; else ComfyUI's DualCLIPLoader order (clip_l, clip_g)."""
    info = []
    for p in paths:
        shapes = _shapes_of(p)
        width = _token_width(shapes)
        g_prefix = _clip_g_prefix(shapes)
        open_clip = g_prefix is not None and is_open_clip(shapes, g_prefix)
        kind = "clip_g" if open_clip or width == 1280 else "clip_l" if width == 768 else None
        info.append((p, g_prefix, kind))
    chosen: dict[str, tuple[Path, str | None]] = {}
    for p, g_prefix, kind in info:
        if kind is not None and kind not in chosen:
            chosen[kind] = (p, g_prefix)
    rest = [(p, g) for p, g, kind in info if (p, g) not in chosen.values()]
    with_projection = [r for r in rest if r[1] is not None]
    if "clip_g" not in chosen and len(rest) == 2 and len(with_projection) == 1:
        chosen["clip_g"] = with_projection[0]  # of two towers, the one with a text projection
        rest.remove(with_projection[0])
    for kind in ("clip_l", "clip_g"):
        if kind not in chosen and rest:
            chosen[kind] = rest.pop(0)
    out = {}
    if "clip_l" in chosen:
        ef = identify_text_encoder(chosen["clip_l"][0])
        out["clip_l"] = (ef.path, ef.prefix)
    if "clip_g" in chosen:
        p, g_prefix = chosen["clip_g"]
        if g_prefix is None:
            raise ModelFileError(f"{p}: not a CLIP-G text encoder (no text_projection); SDXL's second encoder is CLIP-G")
        out["clip_g"] = (p, g_prefix)
    return out


def load_clip_g(path: Path, prefix: str, dtype: torch.dtype, eos_token_id: int | None):
    """CLIPTextModelWithProjection from OpenCLIP (full SDXL checkpoints) or transformers layout (ComfyUI's
    clip_g.safetensors), or a diffusers `text_encoder_2` folder; its projection gives SDXL's pooled vector."""
    return load_clip_projected(EncoderFile("clip", path, prefix), dtype, eos_token_id, "clip_g",
                               identity_projection=False)


def _config_v_pred(mc: ModelConfig) -> bool | None:
    return mc.is_v_pred  # `model.is_v_pred` (ai-toolkit's name; `v_pred` also accepted)


def _file_v_pred(path: Path) -> bool | None:
    """ComfyUI's marker (a `v_pred` key) or modelspec metadata; zero-terminal-SNR models are noted."""
    if path.is_dir():
        sched = path / "scheduler" / "scheduler_config.json"
        if sched.exists():
            import json

            return json.loads(sched.read_text()).get("prediction_type") == "v_prediction"
        return None
    shapes = safetensors_shapes(path)
    if "ztsnr" in shapes:
        log.warning("%s: a zero-terminal-SNR model; this trainer uses the standard SDXL schedule for it", path)
    if "v_pred" in shapes:
        return True
    md = safetensors_metadata(path)
    pt = md.get("modelspec.prediction_type")
    if pt:
        return pt.lower() in ("v", "v_prediction", "v-prediction")
    return None


def load_sdxl(mc: ModelConfig, device: torch.device, dtype: torch.dtype, arch: str = "sdxl") -> SDXLModel:
    src = ModelSources(mc, "SDXL")
    unet = load_sdxl_unet(src.root, dtype, arch)
    parts = _ckpt_parts(src.root)

    found: dict[str, tuple[Path, str]] = _classify_encoders(src.text_encoder_paths) if src.text_encoder_paths else {}
    if "clip_l" not in found and "clip_l" in parts:
        found["clip_l"] = (src.root, CLIP_L_PREFIX)
    if "clip_g" not in found and "clip_g" in parts:
        found["clip_g"] = (src.root, CLIP_G_PREFIX)
    for kind, sub in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
        folder = src.component(sub)
        if kind not in found and folder is not None:
            found[kind] = (folder, "")
    src.require(found, {"clip_l": "CLIP-L (clip_l.safetensors)", "clip_g": "CLIP-G (clip_g.safetensors)"},
                "use a full checkpoint (ComfyUI's models/checkpoints) or list the local files (models/text_encoders)")

    tok_l = src.tokenizer("clip", src.tokenizer_path(0), "tokenizer")
    if len(src.tokenizer_paths) > 1 or src.component("tokenizer_2") is not None:
        tok_g = src.tokenizer("clip", src.tokenizer_path(1), "tokenizer_2")
    else:
        # CLIP-G shares CLIP-L's vocabulary; SDXL pads its prompts with "!" (id 0) rather than end-of-text
        tok_g = src.tokenizer("clip", src.tokenizer_path(0), "tokenizer")
        if "!" in tok_g.get_vocab():
            tok_g.pad_token = "!"

    clip_l = load_clip_text_model(EncoderFile("clip", *found["clip_l"]), dtype, tok_l.eos_token_id)
    clip_g = load_clip_g(*found["clip_g"], dtype, tok_g.eos_token_id)
    width = clip_l.config.hidden_size + clip_g.config.hidden_size
    if width != unet.config.cross_attention_dim:
        raise ModelFileError(
            f"{found['clip_l'][0]}, {found['clip_g'][0]}: CLIP-L + CLIP-G width {width} does not match the UNet's"
            f" text input {unet.config.cross_attention_dim}"
        )
    adm = clip_g.config.projection_dim + NUM_TIME_IDS * unet.config.addition_time_embed_dim
    if adm != unet.config.projection_class_embeddings_input_dim:
        raise ModelFileError(
            f"{found['clip_g'][0]}: CLIP-G projection {clip_g.config.projection_dim} does not match the UNet's"
            f" pooled input {unet.config.projection_class_embeddings_input_dim - NUM_TIME_IDS * TIME_ID_CHANNELS}"
        )

    # SDXL's VAE overflows in fp16: keep it in fp32 then (latents are cached, decoding is for previews)
    vae_dtype = torch.float32 if dtype == torch.float16 else dtype
    vae_src = src.vae("sdxl_vae.safetensors", f"{VAE_PREFIX}encoder.conv_in.weight")
    vae = load_vae(vae_src, vae_dtype, SDXL_VAE_SCALE, None, unet.config.in_channels)

    v_pred = _config_v_pred(mc)
    if v_pred is None:
        v_pred = bool(_file_v_pred(src.root))
    return SDXLModel(unet, vae, clip_l, clip_g, tok_l, tok_g, torch.device(device), dtype, v_pred=v_pred)


FAMILIES = [
    Family("sdxl", "Stable Diffusion XL (eps or v-prediction): CLIP-L + OpenCLIP-G, 4-channel VAE", load_sdxl,
           text_encoder_training=True, comfy_clip_type="sdxl", tokenizers=(("clip", 0, "tokenizer"),)),
]
