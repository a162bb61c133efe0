"""Sana (600M, 1.6B, Sana 1.5 1.6B / 4.8B) on the diffusers backend, from the files Sana users keep.

The transformer (diffusers' SanaTransformer2DModel) loads from a single safetensors file in the original layout
(what ComfyUI_ExtraModels' "Sana Checkpoint Loader" reads from models/checkpoints, optionally under
`model.diffusion_model.`), from the diffusers release's `transformer/diffusion_pytorch_model.safetensors` (which
ExtraModels also reads), or from a diffusers folder. The original .pth releases are pickles: refused by name, like
every pickle (use the diffusers release's safetensors). Sana Sprint (a consistency model) and the 2K / 4K models
(positional embeddings) are refused by name.

Text (as SanaPipeline.encode_prompt and ExtraModels' "Sana Text Encode"): Gemma-2-2B-it's last hidden state for the
complex human instruction + caption, padded on the right to the instruction's tokens + 298, of which the first token
and the last 299 are kept (300 tokens) with their mask. The instruction is the original's (NVlabs/Sana configs,
ExtraModels: `generate an "Enhanced prompt"`); diffusers' default spells it with single quotes. Training follows the
original, which is what ComfyUI users sample with. VAE: DC-AE f32c32 (32 channels, 32x, scale 0.41407).

Objective: rectified flow, timestep = 1000 sigma, output the velocity noise - x0 (ExtraModels runs the model as
ComfyUI's FLOW type, shift 3). Previews: Euler over flow-match sigmas with shift 3 and classifier-free guidance.

LoRA: ExtraModels has no LoRA loader of its own; ComfyUI's LoraLoaderModelOnly maps `diffusion_model.<module>` onto
SanaMS's original module names (`diffusion_model.blocks.N.attn.qkv` ...), so saves use those names: q/k/v trained
as one fused target, cross-attention k/v likewise. Default targets: the attention linears; the feed-forward's 1x1
convs are conv targets (trained with a conv rank: network.conv or LoCon); the depthwise 3x3 is left out.

Known ExtraModels deviation (tests/integration/test_comfyui_sana.py): its SanaMS loads Sana 1.5's cross-attention q/k
norm weights but never applies them (MultiHeadCrossAttention.forward), so Sana 1.5 (base and LoRA alike) runs there
without them; the trainer follows NVlabs / diffusers, which apply them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ModelFileError
from .base import Conditioning, Target, TargetMember, TrainingModel, trim_right_padding
from .detect import require_family
from .family import Family
from .files import diffusers_component, load_state_dict, safetensors_metadata, safetensors_shapes
from .gemma import gemma_tokenizer, is_gemma, load_gemma
from .layout import ORIGINAL_PREFIXES, block_targets, join_original, split_original
from .sana_layout import (FF_CONVS, ORIGINAL_ONLY, SANA_DIFFUSERS_KEY, SANA_ORIGINAL_KEY, diffusers_config,
                          is_original, qkv_parts, sana_layout)
from .schedules import flow_match_euler_sigmas
from .sources import ModelSources
from .vae import load_dc_ae, vae_scale

NUM_TRAIN_TIMESTEPS = 1000
SHIFT = 3.0  # Sana's flow shift (ExtraModels' sampling_settings, diffusers' scheduler config)
MAX_TOKENS = 300
# the complex human instruction, as the original configs and ComfyUI_ExtraModels write it
INSTRUCTION = "\n".join([
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for image'
    ' generation. Evaluate the level of detail in the user prompt:',
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial"
    " relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping"
    " peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street"
    " lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass"
    " skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional commentary"
    " or evaluations:",
    "User Prompt: ",
])
CROSS_HEADS_METADATA = "sana.num_cross_attention_heads"  # written by this trainer's demo files (non-preset widths)


# --- the transformer ---------------------------------------------------------------------------------

def original_to_diffusers(sd: dict[str, torch.Tensor], cfg: dict, model_shapes: dict, source: str) -> dict:
    sd = {k: v for k, v in sd.items() if k not in ORIGINAL_ONLY}
    lin, par = sana_layout(cfg["num_layers"], cfg["qk_norm"] is not None)
    out: dict[str, torch.Tensor] = {}
    for i in range(cfg["num_layers"]):
        fused, parts = qkv_parts(i)
        try:
            w = sd.pop(f"{fused}.weight")
        except KeyError:
            raise ModelFileError(f"{source}: not a complete Sana checkpoint (missing {fused}.weight)") from None
        sizes = [model_shapes[f"{p}.weight"][0] for p in parts]
        out.update({f"{p}.weight": t.contiguous() for p, t in zip(parts, torch.split(w, sizes, dim=0))})
    out.update(split_original(sd, lin, par, model_shapes, source, "Sana"))
    return out


def diffusers_to_original(sd: dict[str, torch.Tensor], num_layers: int, qk_norm: bool) -> dict[str, torch.Tensor]:
    """The original layout of a SanaTransformer2DModel's state dict (demo files, the ComfyUI tests)."""
    lin, par = sana_layout(num_layers, qk_norm)
    out = join_original(sd, lin, par)
    for i in range(num_layers):
        fused, parts = qkv_parts(i)
        out[f"{fused}.weight"] = torch.cat([sd[f"{p}.weight"] for p in parts], dim=0)
    return out


def load_sana_transformer(path: Path, dtype: torch.dtype):
    from diffusers import SanaTransformer2DModel

    if path.is_dir():
        folder = diffusers_component(path, "transformer", "Sana")
        model = SanaTransformer2DModel.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
        if model.config.guidance_embeds:
            raise ModelFileError(f"{path}: a Sana Sprint model (guidance embedding), a consistency model this trainer"
                                 " does not train; use Sana 1.0 / 1.5")
        return model.eval()
    shapes = safetensors_shapes(path)
    require_family(path, shapes, "sana", "sana")
    prefix = next(p for p in ORIGINAL_PREFIXES if f"{p}{SANA_ORIGINAL_KEY}" in shapes
                  or f"{p}{SANA_DIFFUSERS_KEY}" in shapes)
    own = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    heads = safetensors_metadata(path).get(CROSS_HEADS_METADATA)  # a non-preset width (this trainer's demo files)
    cfg = diffusers_config(own, str(path), int(heads) if heads else None)
    with torch.device("meta"):
        model = SanaTransformer2DModel(**cfg)
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd = load_state_dict(path, dtype, prefix)
    if is_original(own):
        sd = original_to_diffusers(sd, cfg, model_shapes, str(path))
    missing, _ = model.load_state_dict(sd, strict=False, assign=True)
    if missing:
        raise ModelFileError(f"{path}: incomplete Sana checkpoint, missing {missing[0]}")
    return model.eval()


def sana_targets(denoiser: nn.Module) -> list[Target]:
    """The attention linears by the original names (fused q/k/v and k/v as members), and the feed-forward's 1x1
    convs as conv targets."""
    cfg = denoiser.config
    lin, _ = sana_layout(cfg.num_layers, cfg.qk_norm is not None)
    out = block_targets(denoiser, lin)
    modules = dict(denoiser.named_modules())
    for i in range(cfg.num_layers):
        fused, parts = qkv_parts(i)
        mods = [modules[p] for p in parts]
        rows = [0]
        for m in mods:
            rows.append(rows[-1] + m.out_features)
        out.append(Target(f"diffusion_model.{fused}", mods[0].in_features, rows[-1],
                          [TargetMember(m, slice(a, b)) for m, a, b in zip(mods, rows, rows[1:])],
                          aliases=tuple(f"transformer.{p}" for p in parts)))
        for original, ours in FF_CONVS:
            mod = modules[f"transformer_blocks.{i}.{ours}"]
            out.append(Target(f"diffusion_model.blocks.{i}.{original}", mod.in_channels, mod.out_channels,
                              [TargetMember(mod, slice(0, mod.out_channels))], kind="conv",
                              aliases=(f"transformer.transformer_blocks.{i}.{ours}",)))
    return out


# --- the model -----------------------------------------------------------------------------------------

class SanaModel(TrainingModel):
    arch = "sana"
    patch = 1
    text_encoder_attrs = ("gemma",)

    def __init__(self, transformer: nn.Module, vae: nn.Module | None, gemma: nn.Module | None, tokenizer,
                 device: torch.device, dtype: torch.dtype, sample_shift: float | None = None,
                 train_shift: float | None = None) -> None:
        self.denoiser = transformer
        self.vae = vae
        self.gemma = gemma
        self.tokenizer = tokenizer
        self.device, self.dtype = torch.device(device), dtype
        self.patch = transformer.config.patch_size
        self.vae_scale = vae_scale(vae) if vae is not None else 32
        self.sample_shift = sample_shift or SHIFT
        self._train_shift = train_shift or SHIFT

    def targets(self) -> list[Target]:
        return sana_targets(self.denoiser)

    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels

    def repeated_blocks(self) -> list[nn.Module]:
        return list(self.denoiser.transformer_blocks)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> Conditioning:
        """Gemma's last hidden state of instruction + caption: the first token and the last 299 (`context`,
        (b, 300, 2304)) with their attention mask (`mask`, (b, 300))."""
        if not self.text_encoders_loaded():
            raise RuntimeError("text encoders were released; embeddings must come from the cache")
        tok = self.tokenizer
        tok.padding_side = "right"
        length = len(tok.encode(INSTRUCTION)) + MAX_TOKENS - 2
        enc = tok([INSTRUCTION + c for c in captions], padding="max_length", max_length=length, truncation=True,
                  add_special_tokens=True, return_tensors="pt")
        dev = next(self.gemma.parameters()).device
        hidden = self.gemma(enc.input_ids.to(dev), attention_mask=enc.attention_mask.to(dev))[0]
        keep = [0] + list(range(length - MAX_TOKENS + 1, length))
        return {"context": hidden[:, keep].float().cpu(), "mask": enc.attention_mask[:, keep].float()}

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning,
                guidance: float | None = None) -> torch.Tensor:
        dev, dt = self.device, self.dtype
        b = noisy.shape[0]
        s = sigmas.float().reshape(-1)
        t = (s.expand(b) if s.numel() == 1 else s) * NUM_TRAIN_TIMESTEPS  # fp32: bf16 would round 1000 sigma
        # captions are right-padded: the padding past the batch's longest caption is cut (what ExtraModels does, and
        # masked tokens change nothing), so a batch of one attends without a mask (a bias breaks compiled SDPA)
        context, mask = trim_right_padding(cond["context"], cond["mask"])
        return self.denoiser(noisy.to(dev, dt), encoder_hidden_states=context.to(dev, dt),
                             encoder_attention_mask=None if mask is None else mask.to(dev), timestep=t.to(dev),
                             return_dict=False)[0]

    def sample_sigmas(self, steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        return flow_match_euler_sigmas(steps, self.sample_shift, NUM_TRAIN_TIMESTEPS)

    def train_shift(self) -> float:
        return self._train_shift

    def save_metadata(self) -> dict[str, str]:
        cfg = self.denoiser.config
        size = {1152: "600m", 2240: "1600m" if cfg.num_layers <= 20 else "4800m"}.get(cfg.cross_attention_dim, "custom")
        version = "sana_1.5" if cfg.qk_norm is not None else "sana"
        return {"ss_base_model_version": f"{version}_{size}", "modelspec.architecture": f"{version}-{size}/lora",
                "eridiffusion.arch": self.arch}


def _gemma_file(src: ModelSources) -> Path:
    for p in src.text_encoder_paths:
        if is_gemma(p):
            return p
    folder = src.component("text_encoder")
    if folder is not None:
        return folder
    named = ", ".join(str(p) for p in src.text_encoder_paths) or "nothing"
    raise ModelFileError(f"model.text_encoder_paths: Sana needs Gemma-2-2B-it (the gemma-2-2b-it folder, or its"
                         f" safetensors); given: {named}")


def load_sana(mc: ModelConfig, device: torch.device, dtype: torch.dtype) -> SanaModel:
    """Sana from local files; everything stays on the CPU (the prepare step places it). The tokenizer and every file
    are found before the transformer is read."""
    src = ModelSources(mc, "Sana")
    gemma_path = _gemma_file(src)
    tokenizer = gemma_tokenizer(src.tokenizer_path(0), [src.component("tokenizer"), gemma_path], gemma_path)
    vae_path = src.vae("Sana's DC-AE f32c32 (dc-ae-f32c32-sana-1.1-diffusers)")
    transformer = load_sana_transformer(src.root, dtype)
    cfg = transformer.config
    gemma = load_gemma(gemma_path, dtype)
    if gemma.config.hidden_size != cfg.caption_channels:
        raise ModelFileError(f"{gemma_path}: Gemma width {gemma.config.hidden_size} does not match the model's text"
                             f" input {cfg.caption_channels} (Sana reads Gemma-2-2B-it, 2304)")
    vae = load_dc_ae(vae_path, dtype, cfg.in_channels)
    return SanaModel(transformer, vae, gemma, tokenizer, torch.device(device), dtype, mc.sample_shift, mc.train_shift)


FAMILIES = [
    Family("sana", "Sana 600M / 1.6B, Sana 1.5 (linear attention): Gemma-2-2B-it, DC-AE f32c32 (32x)", load_sana,
           model_defaults={"sample_shift": None, "train_shift": None},
           comfy_model_loader=("checkpoints", "Sana Checkpoint Loader (ComfyUI_ExtraModels)"),
           comfy_text_loader=("text_encoders", "Gemma Loader (ComfyUI_ExtraModels; it reads the gemma-2-2b-it"
                                               " folder, not a single file)"),
           comfy_vae_loader=("vae", "ExtraVAELoader (ComfyUI_ExtraModels, the dcae-f32c32 model)"),
           cuda_graphs_refusal="its step trims the text padding to the batch's longest caption, read on the host"),
]
