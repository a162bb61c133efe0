"""Wan 2.1 (T2V 1.3B / 14B, I2V 14B) on the diffusers backend, from the files ComfyUI users keep.

The transformer loads from `models/diffusion_models/wan2.1_*.safetensors` (fp16, bf16, ComfyUI's fp8 and scaled fp8,
dequantized on load) with its config from the shapes, or from a local diffusers folder; the variant is read from
the keys as ComfyUI does (`img_emb.*` = I2V, `vace_patch_embedding` = VACE), and a file of another variant than
`model.arch` says is refused. Text: UMT5-XXL (`umt5_xxl_*.safetensors`, its SentencePiece tokenizer inside), 512
tokens, the padding zeroed as WanPipeline does. VAE: the Wan 2.1 VAE (16 channels, 8x spatial, 4x temporal: clips
of 4k+1 frames), latents normalized by its per-channel mean and std.

Objective: rectified flow with the timestep = 1000 sigma; previews are Euler steps over
FlowMatchEulerDiscreteScheduler's sigmas with shift 5 (`model.sample_shift`), with classifier-free guidance.

I2V (WanImageToVideo in ComfyUI, WanImageToVideoPipeline in diffusers): the start image VAE-encoded followed by
gray frames, a 4-channel mask that is 1 on the first latent frame, both fed beside the noisy latent (36 input
channels), and CLIP-ViT-H's penultimate features of the start image as `encoder_hidden_states_image`. The start
image is the clip's first frame (`datasets[].do_i2v`) or the item's control image (`datasets[].control_path`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError, ModelFileError
from .base import Conditioning, Target, TrainingModel
from .detect import require_family
from .family import Family
from .files import dequantize_scaled_fp8, diffusers_component, load_state_dict, safetensors_shapes
from .layout import ORIGINAL_PREFIXES, block_targets
from .objectives import FlowObjective
from .schedules import flow_match_euler_sigmas
from .sources import ModelSources
from .text_encoders import load_umt5_encoder, materialize, run_t5, spiece_tokenizer
from .wan_layout import (diffusers_config_from_original, layout_of, original_to_diffusers, vae_config_from_original,
                         vae_key_to_original, variant_of)

T5_MAX_LENGTH = 512
NUM_TRAIN_TIMESTEPS = 1000
SAMPLE_SHIFT = 5.0  # Wan's own sampling shift (ComfyUI's ModelSamplingSD3 for Wan defaults to 8)
TRAIN_SHIFT = 3.0  # timestep_type: shift, as the peers train Wan
# Wan 2.2 A14B (Wan 2.1 14B's blocks, two experts by noise level): where its high-noise expert hands over to the
# low-noise one on the 0..1 schedule, as Wan 2.2's own configs set it
T2V_BOUNDARY, I2V_BOUNDARY = 0.875, 0.9


def expert_defaults(boundary: float) -> dict:
    """The model keys of a family whose files may be Wan 2.2 A14B experts (model.expert), with its boundary."""
    return {"expert": None, "expert_boundary": boundary}
FPS = 16.0
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class WanVariant:
    arch: str
    kind: str  # what the checkpoint's keys say: t2v, i2v, vace
    name: str


T2V = WanVariant("wan21", "t2v", "Wan 2.1 T2V")
I2V = WanVariant("wan21_i2v", "i2v", "Wan 2.1 I2V")
VACE = WanVariant("wan21_vace", "vace", "Wan 2.1 VACE")
VARIANTS = {v.kind: v for v in (T2V, I2V, VACE)}
I2V_NEEDS = ("Wan 2.1 I2V trains on a start image: set datasets[].do_i2v: true (the clip's first frame) or"
             " datasets[].control_path (start images with the clips' names)")
VACE_NEEDS = ("Wan 2.1 VACE trains on control data: set datasets[].control_path (control videos or images with the"
              " clips' names; masks in mask_path) and / or datasets[].reference_path (reference images), or train on"
              " the Wan 2.1 T2V base instead, whose LoRA applies to VACE")


def refuse_wan22_only(path: Path, cfg: dict, kind: str) -> None:
    """Wan 2.2 files this loader cannot train, named before their weights are read: TI2V 5B (48-channel latents of
    the Wan 2.2 VAE) and I2V A14B (image channels without Wan 2.1's CLIP-vision keys, which ComfyUI's detection
    calls I2V too)."""
    if cfg.get("out_channels") == 48:
        raise ModelFileError(f"{path}: Wan 2.2 TI2V 5B (48-channel latents, the Wan 2.2 VAE), which this loader does"
                             " not train; train it on ComfyUI's MODEL (Training Model (from ComfyUI), or"
                             " model.backend: comfyui)")
    if kind == "t2v" and cfg.get("in_channels") != cfg.get("out_channels"):
        raise ModelFileError(f"{path}: an image-to-video Wan without CLIP-vision keys (Wan 2.2 I2V A14B:"
                             f" {cfg.get('in_channels')} input channels), which no loader here trains yet")


def load_wan_transformer(path: Path, dtype: torch.dtype, variant: WanVariant):
    from diffusers import WanTransformer3DModel, WanVACETransformer3DModel

    if path.is_dir():
        folder = diffusers_component(path, "transformer", "Wan")
        cls = WanVACETransformer3DModel if variant.kind == "vace" else WanTransformer3DModel
        model = cls.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
        kind = "vace" if "vace_layers" in model.config else "i2v" if model.config.image_dim is not None else "t2v"
    else:
        shapes = safetensors_shapes(path)
        require_family(path, shapes, "wan", variant.arch)
        prefix = next(p for p in ORIGINAL_PREFIXES if f"{p}head.modulation" in shapes)
        shapes = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
        kind = variant_of(shapes)
        if kind != variant.kind:
            want = {"t2v": "wan21", "i2v": "wan21_i2v", "vace": "wan21_vace"}[kind]
            raise ModelFileError(f"{path}: a {VARIANTS[kind].name} checkpoint,"
                                 f" but model.arch is {variant.arch!r}; use model.arch {want}")
        cfg = diffusers_config_from_original(shapes, str(path))
        refuse_wan22_only(path, cfg, kind)
        with torch.device("meta"):
            model = (WanVACETransformer3DModel if kind == "vace" else WanTransformer3DModel)(**cfg)
        model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        own = {k for k in shapes}
        sd = dequantize_scaled_fp8({k: v for k, v in load_state_dict(path, dtype, prefix).items() if k in own}, str(path))
        sd = original_to_diffusers(sd, model_shapes, cfg, str(path))
        missing, _ = model.load_state_dict(sd, strict=False, assign=True)
        if missing:
            raise ModelFileError(f"{path}: incomplete Wan checkpoint, missing {missing[0]}")
        # the rotary tables are computed buffers, not weights: build them for real (they were made on meta)
        rope = model.rope
        model.rope = type(rope)(rope.attention_head_dim, rope.patch_size, rope.max_seq_len)
        # diffusers keeps these in fp32 (its _keep_in_fp32_modules); a file's half precision is upcast the same way
        for name, p in model.named_parameters():
            if any(k in name for k in model._keep_in_fp32_modules):
                p.data = p.data.float()
    if kind != variant.kind:
        raise ModelFileError(f"{path}: a Wan {kind} model, but model.arch is {variant.arch!r}")
    return model


def load_wan_vae(path: Path, dtype: torch.dtype):
    """AutoencoderKLWan from ComfyUI's wan_2.1_vae.safetensors (the original layout) or a diffusers folder."""
    from diffusers import AutoencoderKLWan

    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").exists() else path
        vae = AutoencoderKLWan.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
    else:
        shapes = safetensors_shapes(path)
        cfg = vae_config_from_original(shapes, str(path))
        with torch.device("meta"):
            vae = AutoencoderKLWan(**cfg)
        to_original = {vae_key_to_original(k): k for k in vae.state_dict()}
        sd = load_state_dict(path, dtype)
        missing = [o for o in to_original if o not in sd]
        if missing:
            raise ModelFileError(f"{path}: not a Wan 2.1 VAE (missing {missing[0]})")
        vae.load_state_dict({to_original[o]: sd[o] for o in to_original}, strict=True, assign=True)
    if vae.config.z_dim != 16:
        raise ModelFileError(f"{path}: a {vae.config.z_dim}-channel VAE; Wan 2.1 uses the 16-channel Wan 2.1 VAE")
    return vae.eval().requires_grad_(False)


def load_clip_vision(path: Path, dtype: torch.dtype):
    """CLIPVisionModel (ComfyUI's clip_vision_h.safetensors, transformers layout, or a folder); config from shapes."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if path.is_dir():
        return CLIPVisionModel.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True).eval()
    sd = {k: v for k, v in load_state_dict(path, dtype).items() if k.startswith("vision_model.")}
    try:
        hidden, _, patch, _ = sd["vision_model.embeddings.patch_embedding.weight"].shape
        positions = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
        cfg = CLIPVisionConfig(
            hidden_size=hidden, intermediate_size=sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_hidden_layers=1 + max(int(k.split(".")[3]) for k in sd if k.startswith("vision_model.encoder.layers.")),
            num_attention_heads=max(1, hidden // 80 if hidden % 80 == 0 else hidden // 64), patch_size=patch,
            image_size=int(round((positions - 1) ** 0.5)) * patch, hidden_act="gelu",
        )
    except (KeyError, ValueError) as e:
        raise ModelFileError(f"{path}: not a CLIP vision model (missing {e})") from None
    return materialize(CLIPVisionModel, cfg, sd, dtype, "vision_model.", path, "CLIP vision model")


def _fit_frames(video: torch.Tensor, frames: int, pad: float = 0.0) -> torch.Tensor:
    """(c, f', h, w) cut or padded (with `pad`: ComfyUI pads a short control video with gray, a mask with ones) to f."""
    if video.shape[1] >= frames:
        return video[:, :frames]
    return F.pad(video, (0, 0, 0, 0, 0, frames - video.shape[1]), value=pad)


def pad_text(context: torch.Tensor, length: int = T5_MAX_LENGTH) -> torch.Tensor:
    """I2V's text at exactly 512 tokens: diffusers' Wan attention tells the image tokens from the text by assuming 512
    text tokens (ComfyUI's UMT5 gives 512 too). Zeros are what UMT5's padding gives (WanPipeline zeroes it)."""
    if context.shape[1] == length:
        return context
    if context.shape[1] > length:
        raise ConfigError(f"model.t5_max_length: Wan 2.1 I2V reads 512 text tokens, got {context.shape[1]}")
    return F.pad(context, (0, 0, 0, length - context.shape[1]))


class WanModel(TrainingModel):
    objective = FlowObjective()
    vae_scale, vae_temporal, patch = 8, 4, 2
    native_fps = FPS
    checkpointing = "diffusers"

    def __init__(self, transformer: nn.Module, vae: nn.Module | None, umt5: nn.Module | None, tokenizer,
                 device: torch.device, dtype: torch.dtype, variant: WanVariant = T2V, clip_vision: nn.Module | None = None,
                 t5_max_length: int = T5_MAX_LENGTH, sample_shift: float = SAMPLE_SHIFT,
                 train_shift: float = TRAIN_SHIFT) -> None:
        self.variant = variant
        self.arch = variant.arch
        self.denoiser = transformer
        self.vae = vae
        self.umt5 = umt5
        self.clip_vision = clip_vision
        self.tokenizer = tokenizer
        self.device, self.dtype = torch.device(device), dtype
        self.t5_max_length = t5_max_length
        self.sample_shift, self._train_shift = sample_shift, train_shift
        self.i2v = variant.kind == "i2v"
        self.vace = variant.kind == "vace"
        self.text_encoder_attrs = ("umt5",)
        # control_path: I2V's start image (else do_i2v: the clip's first frame); VACE's control video, with masks
        self.takes_control = self.i2v or self.vace
        self.takes_masks = self.takes_references = self.vace
        self.leading_frames_key = "vace_reference" if self.vace else None

    # --- what the loop adapts ------------------------------------------------------------------
    def targets(self) -> list[Target]:
        lin, _ = layout_of(self.denoiser.config)
        return block_targets(self.denoiser, lin)

    def latent_channels(self) -> int:
        return self.denoiser.config.out_channels

    def repeated_blocks(self) -> list[nn.Module]:
        # in the order they run (VACE's blocks first), which block swap's eviction relies on
        return [*getattr(self.denoiser, "vace_blocks", []), *self.denoiser.blocks]

    # --- encoders ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> Conditioning:
        """As WanPipeline._get_t5_prompt_embeds: UMT5 with the attention mask, padded to max length with zeros."""
        if self.umt5 is None:
            raise RuntimeError("text encoders were released; embeddings must come from the cache")
        hidden, mask = run_t5(self.tokenizer, self.umt5, captions, self.t5_max_length)
        return {"context": torch.where(mask.bool()[..., None], hidden, torch.zeros_like(hidden))}

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(shape)
        std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(shape)
        return mean.to(like.device), std.to(like.device)

    @torch.no_grad()
    def encode_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Images (b, 3, h, w) as one-frame clips, or clips (b, 3, f, h, w), in [-1, 1] -> (b, 16, t, h/8, w/8)."""
        clips = images[:, :, None] if images.dim() == 4 else images
        p = next(self.vae.parameters())
        z = self.vae.encode(clips.to(p.device, p.dtype)).latent_dist.mode().float()
        mean, std = self._latent_stats(z)
        return ((z - mean) / std).cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        p = next(self.vae.parameters())
        mean, std = self._latent_stats(latents)
        z = latents.float() * std + mean
        return self.vae.decode(z.to(p.device, p.dtype), return_dict=False)[0].float().clamp(-1, 1).cpu()

    # --- image-to-video conditioning -------------------------------------------------------------
    @torch.no_grad()
    def image_condition(self, start: torch.Tensor, frames: int) -> Conditioning:
        """I2V's inputs for a clip of `frames` frames from its start image (3, h, w) in [-1, 1]: the 20 channels
        beside the noisy latent (mask, then the encoded start image followed by gray frames) and CLIP's features."""
        h, w = start.shape[-2:]
        video = torch.zeros(1, 3, frames, h, w)  # 0 in [-1, 1]: ComfyUI's gray 0.5
        video[:, :, 0] = start
        image = self.encode_pixels(video)[0]
        t = image.shape[1]
        mask = torch.zeros(4, t, *image.shape[-2:])
        mask[:, 0] = 1.0  # the start frame is given
        return {"image_cond": torch.cat([mask, image], dim=0), "clip_fea": self.clip_features(start)}

    @torch.no_grad()
    def clip_features(self, image: torch.Tensor) -> torch.Tensor:
        """CLIP vision's penultimate hidden states of an image (3, h, w) in [-1, 1] (ComfyUI's clip_vision_output
        .penultimate_hidden_states): resized to the model's size (shortest side, bicubic), center-cropped, normalized."""
        if self.clip_vision is None:
            raise ConfigError("model.clip_vision_path: Wan 2.1 I2V needs CLIP vision H (clip_vision_h.safetensors,"
                              " in ComfyUI's models/clip_vision)")
        x = self.clip_pixels(image)
        p = next(self.clip_vision.parameters())
        out = self.clip_vision(pixel_values=x.to(p.device, p.dtype), output_hidden_states=True)
        return out.hidden_states[-2][0].float().cpu()

    def clip_pixels(self, image: torch.Tensor) -> torch.Tensor:
        """CLIP vision's input for an image (3, h, w) in [-1, 1], as ComfyUI's clip_preprocess makes it: the shortest
        side scaled to the model's size (bicubic, antialiased), center-cropped, quantized to 8 bits, normalized."""
        size = self.clip_vision.config.image_size
        x = ((image.float() + 1) / 2)[None]
        if x.shape[-2:] != (size, size):
            scale = size / min(x.shape[-2:])
            x = F.interpolate(x, size=(round(scale * x.shape[-2]), round(scale * x.shape[-1])), mode="bicubic",
                              antialias=True)
            top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
            x = x[..., top:top + size, left:left + size]
        x = (255.0 * x).clamp(0, 255).round() / 255.0
        return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    def encode_conditions(self, pixels: torch.Tensor, control: torch.Tensor | None,
                          mask: torch.Tensor | None = None, reference: torch.Tensor | None = None) -> Conditioning | None:
        """I2V's inputs from the item's start image (its control image, or the clip's first frame with do_i2v);
        VACE's from its control video (or image), mask and reference image."""
        frames = pixels.shape[1] if pixels.dim() == 4 else 1
        if self.i2v and control is not None:
            return self.image_condition(control if control.dim() == 3 else control[:, 0], frames)
        if self.vace and (control is not None or reference is not None):
            return self.vace_condition(control, mask, frames, reference, pixels.shape[-2:])
        return None

    @torch.no_grad()
    def vace_condition(self, control: torch.Tensor | None, mask: torch.Tensor | None, frames: int,
                       reference: torch.Tensor | None = None, size: tuple[int, int] | None = None) -> Conditioning:
        """VACE's 96 input channels, as ComfyUI's WanVaceToVideo builds them: the control video where the mask is 0
        ("inactive") and where it is 1 ("reactive"), each VAE-encoded (16 + 16 channels), and the mask folded 8x8
        into 64 channels at the latent's frame count. `control` (3, f, h, w) in [-1, 1]: a control video; (3, h, w):
        an image that is the clip's first frame (the rest gray and generated: VACE's image-to-video, `do_i2v`);
        None: all gray (a reference image alone). `mask` (1, [f,] h, w) in [0, 1], 1 where the model generates;
        None: everywhere (but a first-frame image). `reference` (3, h, w): a reference image, encoded as one latent
        frame put before the control's (beside zeros, its mask 0) and returned as `vace_reference`, the clean frame
        training prepends to the target."""
        h, w = control.shape[-2:] if control is not None else size
        first_frame = control is not None and control.dim() == 3
        if control is None:
            video = torch.zeros(3, frames, h, w)  # 0 in [-1, 1]: ComfyUI's gray 0.5
        elif first_frame:
            video = torch.zeros(3, frames, h, w)
            video[:, 0] = control
        else:
            video = _fit_frames(control, frames)
        if mask is None:
            m = torch.ones(1, frames, h, w)
            if first_frame:
                m[:, 0] = 0.0
        else:
            m = _fit_frames(mask if mask.dim() == 4 else mask[:, None].expand(-1, frames, -1, -1), frames, pad=1.0)
        inactive = self.encode_pixels((video * (1 - m))[None])[0]
        reactive = self.encode_pixels((video * m)[None])[0]
        s = self.vae_scale
        folded = m[0].reshape(frames, h // s, s, w // s, s).permute(2, 4, 0, 1, 3).reshape(s * s, frames, h // s, w // s)
        t = inactive.shape[1]
        folded = F.interpolate(folded[None], size=(t, h // s, w // s), mode="nearest-exact")[0]
        vace = torch.cat([inactive, reactive, folded], dim=0)
        if reference is None:
            return {"vace": vace}
        ref = self.encode_pixels(reference[None, :, None])[0]  # (16, 1, h/8, w/8)
        lead = torch.cat([ref, torch.zeros_like(ref), torch.zeros_like(folded[:, :1])], dim=0)
        return {"vace": torch.cat([lead, vace], dim=1), "vace_reference": ref}

    def requires_conditions(self) -> str | None:
        return I2V_NEEDS if self.i2v else VACE_NEEDS if self.vace else None

    # --- denoising -----------------------------------------------------------------------------
    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning,
                guidance: float | None = None) -> torch.Tensor:
        dev, dt = self.device, self.dtype
        x = noisy.to(dev, dt)
        image = None
        if self.i2v:
            if "image_cond" not in cond:
                raise ConfigError(self.requires_conditions())
            x = torch.cat([x, cond["image_cond"].to(dev, dt).expand(x.shape[0], -1, -1, -1, -1)], dim=1)
            image = cond["clip_fea"].to(dev, dt)
        b = x.shape[0]
        s = sigmas.float().reshape(-1)
        t = (s.expand(b) if s.numel() == 1 else s) * NUM_TRAIN_TIMESTEPS
        context = cond["context"].to(dev, dt)
        if image is not None:
            context = pad_text(context)
        if self.vace:
            if "vace" not in cond:
                raise ConfigError(VACE_NEEDS)
            return self.denoiser(hidden_states=x, timestep=t.to(dev), encoder_hidden_states=context,
                                 control_hidden_states=cond["vace"].to(dev, dt).expand(b, -1, -1, -1, -1),
                                 return_dict=False)[0]
        return self.denoiser(hidden_states=x, timestep=t.to(dev), encoder_hidden_states=context,
                             encoder_hidden_states_image=image, return_dict=False)[0]

    def sample_sigmas(self, steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        return flow_match_euler_sigmas(steps, self.sample_shift)

    def train_shift(self) -> float:
        return self._train_shift

    def save_metadata(self) -> dict[str, str]:
        cfg = self.denoiser.config
        size = "14B" if cfg.num_attention_heads * cfg.attention_head_dim >= 5120 else "1.3B"
        return {"ss_base_model_version": f"wan2.1_{self.variant.kind}_{size}",
                "modelspec.architecture": f"wan2.1-{self.variant.kind}/lora", "eridiffusion.arch": self.arch}


def load_wan(mc: ModelConfig, device: torch.device, dtype: torch.dtype, variant: WanVariant = T2V) -> WanModel:
    src = ModelSources(mc, variant.name)
    transformer = load_wan_transformer(src.root, dtype, variant)
    found = src.encoders_by_kind({"umt5": "text_encoder"})
    src.require(found, {"umt5": "UMT5-XXL (umt5_xxl_fp16.safetensors)"},
                "list the local file (ComfyUI keeps it in models/text_encoders)")
    explicit = src.tokenizer_path(0)
    if explicit is not None or src.component("tokenizer") is not None:
        tok = src.tokenizer("t5", explicit, "tokenizer")
    else:
        tok = spiece_tokenizer(found["umt5"].path)
        if tok is None:
            raise ModelFileError(f"{found['umt5'].path}: holds no tokenizer (ComfyUI's umt5 files carry one); set"
                                 " model.tokenizer_paths to a UMT5 tokenizer folder")
    umt5 = load_umt5_encoder(found["umt5"], dtype)
    if umt5.config.d_model != transformer.config.text_dim:
        raise ModelFileError(f"{found['umt5'].path}: UMT5 width {umt5.config.d_model} does not match the model's"
                             f" text input {transformer.config.text_dim}")
    vae = load_wan_vae(src.vae("wan_2.1_vae.safetensors"), dtype)
    clip_vision = None
    if variant.kind == "i2v":
        if not mc.clip_vision_path and src.component("image_encoder") is None:
            raise ModelFileError("model.clip_vision_path: Wan 2.1 I2V needs CLIP vision H (clip_vision_h.safetensors,"
                                 " in ComfyUI's models/clip_vision)")
        from .files import local_path

        path = local_path(mc.clip_vision_path, "model.clip_vision_path") if mc.clip_vision_path else \
            src.component("image_encoder")
        clip_vision = load_clip_vision(path, dtype)
        if clip_vision.config.hidden_size != transformer.config.image_dim:
            raise ModelFileError(f"{path}: CLIP vision width {clip_vision.config.hidden_size} does not match the"
                                 f" model's image input {transformer.config.image_dim}")
    model = WanModel(transformer, vae, umt5, tok, torch.device(device), dtype, variant, clip_vision,
                     mc.t5_max_length or T5_MAX_LENGTH, mc.sample_shift or SAMPLE_SHIFT, mc.train_shift or TRAIN_SHIFT)
    if clip_vision is not None:
        model.text_encoder_attrs = ("umt5", "clip_vision")
    return model


FAMILIES = [
    Family("wan21", "Wan 2.1 T2V (1.3B, 14B): UMT5-XXL, the Wan 2.1 VAE; video clips and images",
           lambda mc, device, dtype: load_wan(mc, device, dtype, T2V), video=True,
           model_defaults={"sample_shift": SAMPLE_SHIFT, "train_shift": TRAIN_SHIFT, **expert_defaults(T2V_BOUNDARY)},
           comfy_clip_type="wan"),
    Family("wan21_i2v", "Wan 2.1 I2V (14B 480p / 720p): as T2V plus the start image and CLIP vision H",
           lambda mc, device, dtype: load_wan(mc, device, dtype, I2V), video=True, takes_control=True,
           requires_control=I2V_NEEDS, comfy_clip_type="wan",
           model_defaults={"sample_shift": SAMPLE_SHIFT, "train_shift": TRAIN_SHIFT, **expert_defaults(I2V_BOUNDARY)}),
    Family("wan21_vace", "Wan 2.1 VACE (1.3B, 14B): as T2V plus control videos and masks",
           lambda mc, device, dtype: load_wan(mc, device, dtype, VACE), video=True, takes_control=True,
           takes_masks=True, takes_references=True, requires_control=VACE_NEEDS,
           model_defaults={"sample_shift": SAMPLE_SHIFT, "train_shift": TRAIN_SHIFT, **expert_defaults(T2V_BOUNDARY)},
           comfy_clip_type="wan"),
]
