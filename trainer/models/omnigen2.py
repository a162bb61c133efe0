"""OmniGen2 (4B) from the files ComfyUI users keep, on the project's own transformer (omnigen2_transformer.py: ComfyUI's
module names and forward convention; diffusers has no OmniGen2 class).

Files: `models/diffusion_models/omnigen2_fp16.safetensors` (config from the shapes; what the shapes cannot say is
fixed as ComfyUI fixes it: heads of 120 over rope axes (40, 40, 40), patch 2), `qwen_2.5_vl_fp16.safetensors`
(Qwen2.5-VL-3B, its language model only) and Flux's `ae.safetensors`.

Text, as ComfyUI encodes it (comfy/text_encoders/omnigen2.py): the caption inside Qwen's chat template with
OmniGen2's system prompt, no special tokens added, the last hidden state (after the final norm) with its mask.
ComfyUI encodes each prompt at its own length; batches here are padded on the right, and padding has no effect
on the model (masked as keys, positions counted without it), so a padded caption computes what the unpadded one
does. The padding is trimmed to the batch's longest caption before the transformer runs.

Objective: rectified flow with timestep = sigma (ComfyUI's FLOW type, multiplier 1), output the velocity
noise - x0, sampling shift 2.6 over ComfyUI's simple schedule. Edit training: `datasets[].control_path` images (same
stems) are the reference images, encoded at the item's size and fed as reference latents (ComfyUI's
ReferenceLatent): `cond["control"]`, also in previews (`sample.samples[].ctrl_img`).

LoRA: ComfyUI's names, `diffusion_model.layers.N.attn.to_q` ..., `feed_forward.linear_1/2/3`, `norm1.linear`, and
the same under `noise_refiner`, `context_refiner` and `ref_image_refiner`.
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
from .files import dequantize_scaled_fp8, diffusers_component, load_state_dict, safetensors_shapes
from .flux import FLUX_VAE_SCALE, FLUX_VAE_SHIFT
from .layout import ORIGINAL_PREFIXES, count_blocks
from .qwen25 import is_qwen, load_qwen25, qwen25_tokenizer
from .schedules import comfy_simple_sigmas
from .sources import ModelSources
from .vae import load_vae, vae_scale

SHIFT = 2.6  # ComfyUI's sampling_settings for OmniGen2
MAX_TOKENS = 256  # caption tokens kept (template included); ComfyUI does not cut, a 24 GB recipe must
TEMPLATE = ("<|im_start|>system\nYou are a helpful assistant that generates high-quality images based on user"
            " instructions.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n")
HEAD_DIM = 120  # sum of the rope axes (40, 40, 40), fixed by ComfyUI
PATCH = 2
STACKS = ("layers", "noise_refiner", "context_refiner", "ref_image_refiner")
BLOCK_LINEARS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "feed_forward.linear_1",
                 "feed_forward.linear_2", "feed_forward.linear_3", "norm1.linear")


def transformer_config(shapes: dict[str, tuple[int, ...]], source: str) -> dict:
    try:
        hidden, patch_dim = shapes["x_embedder.weight"]
        kv = shapes["layers.0.attn.to_k.weight"][0]
        text = shapes["time_caption_embed.caption_embedder.1.weight"][1]
        out = shapes["norm_out.linear_2.weight"][0]
        refs = shapes["image_index_embedding"][0]
        ff = shapes["layers.0.feed_forward.linear_1.weight"][0]
    except KeyError as e:
        raise ModelFileError(f"{source}: not a complete OmniGen2 checkpoint (missing {e.args[0]})") from None
    if hidden % HEAD_DIM or kv % HEAD_DIM:
        raise ModelFileError(f"{source}: OmniGen2 widths {hidden} / {kv} are not multiples of its 120-wide heads")
    cfg = dict(patch_size=PATCH, in_channels=patch_dim // PATCH**2, out_channels=out // PATCH**2, hidden_size=hidden,
               num_layers=count_blocks(shapes, "layers."), num_refiner_layers=count_blocks(shapes, "noise_refiner."),
               num_attention_heads=hidden // HEAD_DIM, num_kv_heads=kv // HEAD_DIM, text_feat_dim=text,
               max_ref_images=refs)
    if 256 * -(-4 * hidden // 256) != ff:
        raise ModelFileError(f"{source}: feed-forward width {ff} is not OmniGen2's (4 x {hidden} rounded up to 256)")
    return cfg


def load_omnigen2_transformer(path: Path, dtype: torch.dtype):
    from .omnigen2_transformer import OmniGen2Transformer

    if path.is_dir():
        folder = diffusers_component(path, "transformer", "OmniGen2")
        return OmniGen2Transformer.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True).eval()
    shapes = safetensors_shapes(path)
    require_family(path, shapes, "omnigen2", "omnigen2")
    prefix = next(p for p in ORIGINAL_PREFIXES if f"{p}time_caption_embed.timestep_embedder.linear_1.bias" in shapes)
    own = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    cfg = transformer_config(own, str(path))
    with torch.device("meta"):
        model = OmniGen2Transformer(**cfg)
    sd = dequantize_scaled_fp8(load_state_dict(path, dtype, prefix), str(path))
    missing, _ = model.load_state_dict(sd, strict=False, assign=True)
    if missing:
        raise ModelFileError(f"{path}: incomplete OmniGen2 checkpoint, missing {missing[0]}")
    return model.eval()


def omnigen2_targets(denoiser: nn.Module) -> list[Target]:
    modules = dict(denoiser.named_modules())
    out = []
    for stack in STACKS:
        for i in range(len(getattr(denoiser, stack))):
            for lin in BLOCK_LINEARS:
                name = f"{stack}.{i}.{lin}"
                mod = modules.get(name)
                if mod is None:  # the context refiner has no modulation
                    continue
                out.append(Target(f"diffusion_model.{name}", mod.in_features, mod.out_features,
                                  [TargetMember(mod, slice(0, mod.out_features))], aliases=(f"transformer.{name}",)))
    return out


class OmniGen2Model(TrainingModel):
    arch = "omnigen2"
    patch = PATCH
    takes_control = True  # reference images (edit training)
    text_encoder_attrs = ("qwen",)

    def __init__(self, transformer: nn.Module, vae: nn.Module | None, qwen: nn.Module | None, tokenizer,
                 device: torch.device, dtype: torch.dtype, max_tokens: int = MAX_TOKENS,
                 sample_shift: float | None = None, train_shift: float | None = None) -> None:
        self.denoiser = transformer
        self.vae = vae
        self.qwen = qwen
        self.tokenizer = tokenizer
        self.device, self.dtype = torch.device(device), dtype
        self.max_tokens = max_tokens
        self.sample_shift = sample_shift or SHIFT
        self._train_shift = train_shift or SHIFT
        self.vae_scale = vae_scale(vae) if vae is not None else 8

    def targets(self) -> list[Target]:
        return omnigen2_targets(self.denoiser)

    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels

    def repeated_blocks(self) -> list[nn.Module]:
        return list(self.denoiser.layers)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> Conditioning:
        """Qwen's last hidden state of each templated caption (`context`, (b, max_tokens, width)) and its mask."""
        if not self.text_encoders_loaded():
            raise RuntimeError("text encoders were released; embeddings must come from the cache")
        enc = self.tokenizer([TEMPLATE.format(c) for c in captions], padding="max_length", max_length=self.max_tokens,
                             truncation=True, add_special_tokens=False, return_tensors="pt")
        dev = next(self.qwen.parameters()).device
        hidden = self.qwen(enc.input_ids.to(dev), attention_mask=enc.attention_mask.to(dev))[0]
        return {"context": hidden.float().cpu(), "mask": enc.attention_mask.float()}

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning,
                guidance: float | None = None) -> torch.Tensor:
        dev, dt = self.device, self.dtype
        b = noisy.shape[0]
        s = sigmas.float().reshape(-1)
        s = (s.expand(b) if s.numel() == 1 else s).to(dev)
        context, mask = trim_right_padding(cond["context"], cond["mask"])
        context, mask = context.to(dev, dt), None if mask is None else mask.to(dev)
        x = noisy.to(dev, dt)
        if "control" not in cond:
            return self._run(x, s, context, mask, None)
        refs = cond["control"].to(dev, dt)
        # an all-zero reference is an item without one (its dataset has none, or control_dropout chose it): those
        # items run without a reference, as ComfyUI runs a prompt without ReferenceLatent
        has = refs.flatten(1).abs().amax(dim=1) > 0
        if bool(has.all()) or not bool(has.any()):
            return self._run(x, s, context, mask, refs if bool(has.all()) else None)
        out = torch.empty_like(x)
        for sel, r in ((has, refs[has]), (~has, None)):
            out[sel] = self._run(x[sel], s[sel], context[sel], None if mask is None else mask[sel], r)
        return out

    def _run(self, x, s, context, mask, refs):
        return self.denoiser(x, s, context, attention_mask=mask, ref_latents=[refs] if refs is not None else None)

    def sample_sigmas(self, steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        return comfy_simple_sigmas(steps, self.sample_shift)

    def train_shift(self) -> float:
        return self._train_shift

    def save_metadata(self) -> dict[str, str]:
        return {"ss_base_model_version": "omnigen2", "modelspec.architecture": "omnigen2/lora",
                "eridiffusion.arch": self.arch}


def _qwen_file(src: ModelSources) -> Path:
    for p in src.text_encoder_paths:
        if is_qwen(p):
            return p
    folder = src.component("text_encoder")
    if folder is not None:
        return folder
    named = ", ".join(str(p) for p in src.text_encoder_paths) or "nothing"
    raise ModelFileError("model.text_encoder_paths: OmniGen2 needs Qwen2.5-VL-3B (qwen_2.5_vl_fp16.safetensors, in"
                         f" ComfyUI's models/text_encoders); given: {named}")


def load_omnigen2(mc: ModelConfig, device: torch.device, dtype: torch.dtype) -> OmniGen2Model:
    """OmniGen2 from local files, on the CPU (the prepare step places it); tokenizer and files found first."""
    src = ModelSources(mc, "OmniGen2")
    qwen_path = _qwen_file(src)
    tokenizer = qwen25_tokenizer(src.tokenizer_path(0), [c for c in (src.component("tokenizer"),
                                 qwen_path if qwen_path.is_dir() else None) if c], src.near)
    vae_path = src.vae("ae.safetensors (Flux's)")
    transformer = load_omnigen2_transformer(src.root, dtype)
    qwen = load_qwen25(qwen_path, dtype)
    if qwen.config.hidden_size != transformer.config.text_feat_dim:
        raise ModelFileError(f"{qwen_path}: Qwen width {qwen.config.hidden_size} does not match the model's text input"
                             f" {transformer.config.text_feat_dim} (OmniGen2 reads Qwen2.5-VL-3B, 2048)")
    vae = load_vae(vae_path, dtype, FLUX_VAE_SCALE, FLUX_VAE_SHIFT, transformer.config.in_channels)
    return OmniGen2Model(transformer, vae, qwen, tokenizer, torch.device(device), dtype,
                         mc.t5_max_length or MAX_TOKENS, mc.sample_shift, mc.train_shift)


FAMILIES = [
    Family("omnigen2", "OmniGen2 (4B): Qwen2.5-VL-3B text, Flux VAE; reference images from control_path (edit)",
           load_omnigen2, takes_control=True, comfy_clip_type="omnigen2",
           model_defaults={"sample_shift": None, "train_shift": None},
           cuda_graphs_refusal="its step trims the text padding and sorts items with and without a reference image,"
           " read on the host"),
]
