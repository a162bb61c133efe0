"""HunyuanVideo (2024, 13B, text-to-video) on the diffusers backend, from the files ComfyUI users keep.

The transformer loads from `models/diffusion_models/hunyuan_video_t2v_720p_bf16.safetensors` (bf16, fp8, ComfyUI's
scaled fp8 dequantized on load), in the original key layout or the names ComfyUI renames it to on load, with its
config from the shapes; or from a local diffusers folder. Image-to-video and 1.5 checkpoints are refused by name.

Text, as HunyuanVideoPipeline encodes it: the llava-llama-3-8B text model (`llava_llama3_fp16` or
`llava_llama3_fp8_scaled`, a Llama 3 LlamaModel) reads the prompt inside the video template, its third-last hidden
states are kept from the first token after the template's prefix on (the crop), 256 tokens with their attention
mask; CLIP-L's pooled output conditions the modulation. ComfyUI encodes the same tokens without padding (its crop
ends after the prompt's `<|eot_id|>`): the mask makes the two the same to the model.

Guidance-distilled: the guidance embedding reads 1.0 while training (`model.train_guidance`), the preview's
guidance_scale when sampling (ComfyUI's default is 6); no classifier-free guidance. Rectified flow with timestep =
1000 sigma; previews are Euler steps over linspace(1, 0) shifted by 7 (`model.sample_shift`), as the pipeline's
scheduler does. VAE: 16 channels, 8x spatial, 4x temporal (clips of 4k+1 frames), latents scaled by 0.476986.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ModelFileError
from .base import Conditioning, Target, TrainingModel
from .detect import require_family
from .family import Family
from .files import dequantize_scaled_fp8, diffusers_component, load_state_dict, safetensors_shapes
from .hunyuan_video_layout import (PATCH_KEY, diffusers_config_from_original, is_attention_projection, layout_of,
                                   original_to_diffusers, refiner_linears, to_comfy_names, unsupported_variant,
                                   vae_config_from_comfy, vae_key_to_comfy)
from .layout import ORIGINAL_PREFIXES, block_targets
from .objectives import FlowObjective
from .schedules import flow_sample_sigmas
from .sources import ModelSources
from .text_encoders import load_clip_text_model, load_llama_encoder

log = logging.getLogger("trainer")

# the video prompt template the model was trained with (HunyuanVideo's, as diffusers and ComfyUI use it)
PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
TEXT_TOKENS = 256  # kept after the crop (diffusers' max_sequence_length), with the attention mask
TEXT_ROUND = 32  # text tokens given to the transformer: the longest prompt's, rounded up to this
LLAMA_HIDDEN_STATE = -3  # the third-last hidden state: two layers skipped, no final norm
CLIP_MAX_LENGTH = 77
NUM_TRAIN_TIMESTEPS = 1000
SAMPLE_SHIFT = 7.0  # the pipeline's scheduler and ComfyUI's sampling shift
TRAIN_SHIFT = 7.0  # timestep_type: shift, as musubi-tuner trains HunyuanVideo (discrete_flow_shift 7)
TRAIN_GUIDANCE = 1.0  # musubi-tuner's training guidance
FPS = 24.0
VAE_PREFIXES = ("vae.", "first_stage_model.", "")


def load_hunyuan_transformer(path: Path, dtype: torch.dtype, arch: str = "hunyuan_video"):
    """HunyuanVideoTransformer3DModel from a single file in the original or ComfyUI's layout, or a diffusers folder."""
    from diffusers import HunyuanVideoTransformer3DModel

    if path.is_dir():
        folder = diffusers_component(path, "transformer", "HunyuanVideo")
        model = HunyuanVideoTransformer3DModel.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
        if model.config.image_condition_type is not None:
            raise ModelFileError(f"{path}: an image-to-video HunyuanVideo ({model.config.image_condition_type});"
                                 " only text-to-video is supported")
        return model
    shapes = safetensors_shapes(path)
    require_family(path, shapes, "hunyuan_video", arch)
    prefix = next((p for p in ORIGINAL_PREFIXES if f"{p}{PATCH_KEY}" in shapes), None)
    if prefix is None:
        raise ModelFileError(f"{path}: a HunyuanVideo checkpoint without {PATCH_KEY} is not supported")
    shapes = to_comfy_names({k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)})
    why = unsupported_variant(shapes)
    if why is not None:
        raise ModelFileError(f"{path}: {why}; model.arch {arch!r} trains HunyuanVideo text-to-video")
    cfg = diffusers_config_from_original(shapes, str(path))
    with torch.device("meta"):
        model = HunyuanVideoTransformer3DModel(**cfg)
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd = dequantize_scaled_fp8(load_state_dict(path, dtype, prefix), str(path))
    sd = original_to_diffusers(sd, model_shapes, cfg, str(path))
    missing, _ = model.load_state_dict(sd, strict=False, assign=True)
    if missing:
        raise ModelFileError(f"{path}: incomplete HunyuanVideo checkpoint, missing {missing[0]}")
    return model


def load_hunyuan_vae(path: Path, dtype: torch.dtype):
    """AutoencoderKLHunyuanVideo from ComfyUI's hunyuan_video_vae file (LDM layout), a diffusers-named single file,
    or a diffusers folder. Tiled above 256 px (as musubi-tuner and ComfyUI encode): a 544x960 clip then fits 24 GB."""
    from diffusers import AutoencoderKLHunyuanVideo

    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").exists() else path
        vae = AutoencoderKLHunyuanVideo.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
    else:
        shapes = safetensors_shapes(path)
        prefix = next((p for p in VAE_PREFIXES if f"{p}decoder.conv_in.conv.weight" in shapes), None)
        if prefix is None:
            raise ModelFileError(f"{path}: not a HunyuanVideo VAE (no decoder.conv_in.conv.weight: a 2-D or another"
                                 " family's VAE; HunyuanVideo uses hunyuan_video_vae_bf16.safetensors)")
        shapes = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
        sd = load_state_dict(path, dtype, prefix)
        diffusers_named = "encoder.down_blocks.0.resnets.0.conv1.conv.weight" in shapes
        cfg = vae_config_from_comfy(_comfy_vae_shapes(shapes) if diffusers_named else shapes, str(path))
        with torch.device("meta"):
            vae = AutoencoderKLHunyuanVideo(**cfg)
        levels = len(cfg["block_out_channels"])
        if not diffusers_named:
            wanted = {vae_key_to_comfy(k, levels): k for k in vae.state_dict()}
            missing = [k for k in wanted if k not in sd]
            if missing:
                raise ModelFileError(f"{path}: not a complete HunyuanVideo VAE (missing {missing[0]})")
            # ComfyUI keeps the mid-block attention projections as 1x1x1 convolutions; diffusers as linears
            sd = {wanted[k]: (sd[k].flatten(1) if is_attention_projection(k) else sd[k]) for k in wanted}
        missing, _ = vae.load_state_dict(sd, strict=False, assign=True)
        if missing:
            raise ModelFileError(f"{path}: not a complete HunyuanVideo VAE (missing {missing[0]})")
    if vae.config.latent_channels != 16:
        raise ModelFileError(f"{path}: a {vae.config.latent_channels}-channel VAE; HunyuanVideo uses its 16-channel"
                             " VAE (hunyuan_video_vae_bf16.safetensors)")
    vae.enable_tiling()
    return vae.eval().requires_grad_(False)


def _comfy_vae_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """A diffusers-named VAE file's shapes under ComfyUI's names (to read its config one way)."""
    levels = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down_blocks."))
    return {vae_key_to_comfy(k, levels): v for k, v in shapes.items()}


def load_llama_tokenizer(folder: Path):
    """The Llama 3 tokenizer as its tokenizer.json defines it (BOS added by its post-processor), padding right with
    the file's pad token (llava-llama-3's `<pad>`)."""
    from transformers import PreTrainedTokenizerFast

    try:
        tok = PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # tokenizers and transformers raise many kinds here
        raise ModelFileError(f"{folder}: cannot load the Llama tokenizer ({e})") from None
    if tok.pad_token is None:
        raise ModelFileError(f"{folder}: the Llama tokenizer names no pad token (llava-llama-3's is <pad>); use the"
                             " tokenizer of a HunyuanVideo diffusers folder (tokenizer/)")
    tok.padding_side = "right"
    return tok


class _UnpaddedAttention:
    """The blocks' attention processor: diffusers' own, without the attention mask while every key is a real token
    (the mask is then all true: the same output, and SDPA may take its flash kernel, which a mask rules out).
    Each forward of the transformer decides, in a pre-hook, from the text mask it is given: for the mask that
    `predict` passes, from what predict knows (no host sync); for any other caller, from the mask itself. Backward's
    recompute of checkpointed blocks reuses the decision of the forward before it."""

    def __init__(self, transformer: nn.Module, blocks: list[nn.Module]) -> None:
        from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

        self.inner = HunyuanVideoAttnProcessor2_0()
        self.unpadded = False
        self._mask: torch.Tensor | None = None
        self._mask_unpadded = False
        for block in blocks:
            block.attn.set_processor(self)
        transformer.register_forward_pre_hook(self._decide, with_kwargs=True)

    def expect(self, mask: torch.Tensor, unpadded: bool) -> None:
        self._mask, self._mask_unpadded = mask, unpadded

    def _decide(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("encoder_attention_mask", args[3] if len(args) > 3 else None)
        self.unpadded = self._mask_unpadded if mask is self._mask else bool(mask is not None and mask.all())
        self._mask = None

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: torch.Tensor | None = None
                 ) -> torch.Tensor:
        return self.inner(attn, hidden_states, encoder_hidden_states, None if self.unpadded else attention_mask,
                          image_rotary_emb)


class HunyuanVideoModel(TrainingModel):
    objective = FlowObjective()
    vae_scale, vae_temporal, patch = 8, 4, 2
    native_fps = FPS
    checkpointing = "diffusers"
    text_encoder_attrs = ("llama", "clip")

    def __init__(self, transformer: nn.Module, vae: nn.Module | None, llama: nn.Module | None,
                 clip: nn.Module | None, llama_tokenizer, clip_tokenizer, device: torch.device, dtype: torch.dtype,
                 sample_shift: float = SAMPLE_SHIFT, train_shift: float = TRAIN_SHIFT,
                 train_guidance: float = TRAIN_GUIDANCE, arch: str = "hunyuan_video") -> None:
        self.arch = arch
        self.denoiser = transformer
        self.vae = vae
        self.llama, self.clip = llama, clip
        self.llama_tokenizer, self.clip_tokenizer = llama_tokenizer, clip_tokenizer
        self.device, self.dtype = torch.device(device), dtype
        self.sample_shift, self._train_shift = sample_shift, train_shift
        self.guidance_embeds = bool(transformer.config.guidance_embeds)
        self.distilled_guidance = self.guidance_embeds
        self.train_guidance = train_guidance
        self._crop: int | None = None
        self._attention = _UnpaddedAttention(transformer, self.repeated_blocks())

    # --- what the loop adapts ------------------------------------------------------------------
    def targets(self) -> list[Target]:
        """The double and single blocks' linears (ComfyUI's keys), then the token refiner's, which train only when
        network_kwargs.only_if_contains names them (`txt_in`, `individual_token_refiner`): peers leave it out."""
        cfg = self.denoiser.config
        lin, _ = layout_of(cfg)
        refiner = [replace(m, block=True) for i in range(cfg.num_refiner_layers) for m in refiner_linears(i)]
        return block_targets(self.denoiser, lin) + [replace(t, opt_in=True)
                                                    for t in block_targets(self.denoiser, refiner)]

    def latent_channels(self) -> int:
        return self.denoiser.config.out_channels

    def repeated_blocks(self) -> list[nn.Module]:
        return [*self.denoiser.transformer_blocks, *self.denoiser.single_transformer_blocks]

    # --- encoders ------------------------------------------------------------------------------
    @property
    def crop_start(self) -> int:
        """Tokens of the template before the prompt (its BOS included): 95 with llava-llama-3's tokenizer, the
        number diffusers' pipeline hard-codes; counted here, so any tokenizer crops where the prompt starts."""
        if self._crop is None:
            self._crop = len(self.llama_tokenizer(PROMPT_TEMPLATE.split("{}")[0]).input_ids)
        return self._crop

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> Conditioning:
        """As HunyuanVideoPipeline.encode_prompt: `context` (b, 256, 4096) and `mask` (b, 256) from the Llama text
        model, `pooled` (b, 768) from CLIP-L."""
        if not self.text_encoders_loaded():
            raise RuntimeError("text encoders were released; embeddings must come from the cache")
        crop = self.crop_start
        tok = self.llama_tokenizer([PROMPT_TEMPLATE.format(c) for c in captions], padding="max_length",
                                   max_length=crop + TEXT_TOKENS, truncation=True, return_tensors="pt")
        dev = next(self.llama.parameters()).device
        out = self.llama(input_ids=tok.input_ids.to(dev), attention_mask=tok.attention_mask.to(dev),
                         output_hidden_states=True)
        context = out.hidden_states[LLAMA_HIDDEN_STATE][:, crop:].float().cpu()
        mask = tok.attention_mask[:, crop:].float()
        ctok = self.clip_tokenizer(captions, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True,
                                   return_tensors="pt")
        cdev = next(self.clip.parameters()).device
        pooled = self.clip(ctok.input_ids.to(cdev), output_hidden_states=False).pooler_output.float().cpu()
        return {"context": context, "mask": mask, "pooled": pooled}

    @torch.no_grad()
    def encode_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Images (b, 3, h, w) as one-frame clips, or clips (b, 3, f, h, w), in [-1, 1] -> (b, 16, t, h/8, w/8)."""
        clips = images[:, :, None] if images.dim() == 4 else images
        p = next(self.vae.parameters())
        z = self.vae.encode(clips.to(p.device, p.dtype)).latent_dist.mode().float()
        return (z * self.vae.config.scaling_factor).cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        p = next(self.vae.parameters())
        z = latents.float() / self.vae.config.scaling_factor
        return self.vae.decode(z.to(p.device, p.dtype), return_dict=False)[0].float().clamp(-1, 1).cpu()

    # --- denoising -----------------------------------------------------------------------------
    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning,
                guidance: float | None = None) -> torch.Tensor:
        dev, dt = self.device, self.dtype
        x = noisy.to(dev, dt)
        b = x.shape[0]
        s = sigmas.float().reshape(-1)
        t = (s.expand(b) if s.numel() == 1 else s) * NUM_TRAIN_TIMESTEPS
        lengths = cond["mask"].sum(dim=1)  # where the cache keeps it (host memory: no sync)
        longest = int(lengths.max())
        unpadded = int(lengths.min()) == longest
        # the text is padded on the right: tokens past the batch's longest prompt are masked everywhere, so they
        # are left out (the model's output is the same; 256 tokens would outnumber a small clip's). Without
        # padding left in any row, the blocks' attention runs unmasked (flash); otherwise the text is kept to a
        # multiple of 32, so that a compiled block sees few text lengths
        n = longest if unpadded else min(cond["mask"].shape[1], max(TEXT_ROUND, -(-longest // TEXT_ROUND)
                                                                        * TEXT_ROUND))
        mask = cond["mask"][:, :n].to(dev, dt)
        self._attention.expect(mask, unpadded)
        g = None
        if self.guidance_embeds:
            g = torch.full((b,), 1.0 if guidance is None else float(guidance), device=dev) * NUM_TRAIN_TIMESTEPS
        return self.denoiser(hidden_states=x, timestep=t.to(dev), encoder_hidden_states=cond["context"][:, :n].to(dev, dt),
                             encoder_attention_mask=mask, pooled_projections=cond["pooled"].to(dev, dt),
                             guidance=None if g is None else g.to(dt), return_dict=False)[0]

    def sample_sigmas(self, steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        return flow_sample_sigmas(steps, shift=self.sample_shift)

    def train_shift(self) -> float:
        return self._train_shift

    def save_metadata(self) -> dict[str, str]:
        return {"ss_base_model_version": "hunyuan_video", "modelspec.architecture": "hunyuan-video-t2v/lora",
                "eridiffusion.arch": self.arch}


def load_hunyuan_video(mc: ModelConfig, device: torch.device, dtype: torch.dtype) -> HunyuanVideoModel:
    """HunyuanVideo from local files; everything stays on the CPU (the prepare step places it)."""
    src = ModelSources(mc, "HunyuanVideo")
    transformer = load_hunyuan_transformer(src.root, dtype)
    cfg = transformer.config
    found = src.encoders_by_kind({"llama": "text_encoder", "clip": "text_encoder_2"})
    src.require(found, {"llama": "the llava-llama-3-8B text model (llava_llama3_fp16.safetensors or"
                                 " llava_llama3_fp8_scaled.safetensors)", "clip": "CLIP-L (clip_l.safetensors)"},
                "list the local files (ComfyUI keeps them in models/text_encoders)")
    llama_tok = load_llama_tokenizer(src.tokenizer_folder("llama", src.tokenizer_path(0), "tokenizer"))
    clip_tok = src.tokenizer("clip", src.tokenizer_path(1), "tokenizer_2")
    llama = load_llama_encoder(found["llama"], dtype)
    clip = load_clip_text_model(found["clip"], dtype, clip_tok.eos_token_id)
    if llama.config.hidden_size != cfg.text_embed_dim:
        raise ModelFileError(f"{found['llama'].path}: Llama width {llama.config.hidden_size} does not match the"
                             f" model's text input {cfg.text_embed_dim}")
    if clip.config.hidden_size != cfg.pooled_projection_dim:
        raise ModelFileError(f"{found['clip'].path}: CLIP width {clip.config.hidden_size} does not match the model's"
                             f" pooled input {cfg.pooled_projection_dim}")
    vae = load_hunyuan_vae(src.vae("hunyuan_video_vae_bf16.safetensors"), dtype)
    return HunyuanVideoModel(transformer, vae, llama, clip, llama_tok, clip_tok, torch.device(device), dtype,
                             mc.sample_shift or SAMPLE_SHIFT, mc.train_shift or TRAIN_SHIFT,
                             TRAIN_GUIDANCE if mc.train_guidance is None else mc.train_guidance)


FAMILIES = [
    Family("hunyuan_video", "HunyuanVideo 13B text-to-video: llava-llama-3-8B + CLIP-L, the HunyuanVideo VAE;"
           " video clips and images", load_hunyuan_video, video=True,
           model_defaults={"sample_shift": SAMPLE_SHIFT, "train_shift": TRAIN_SHIFT, "train_guidance": TRAIN_GUIDANCE},
           comfy_clip_type="hunyuan_video", tokenizers=(("llama", 0, "tokenizer"), ("clip", 1, "tokenizer_2")),
           cuda_graphs_refusal="its step cuts the text to the batch's longest caption, read on the host"),
]
