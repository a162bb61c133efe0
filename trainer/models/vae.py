"""KL autoencoders from local files: the original (LDM/BFL `ae.safetensors`) layout or a diffusers folder.

The config is derived from the checkpoint's shapes, so any channel widths load.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ModelFileError
from .files import load_state_dict, safetensors_shapes

LDM_PREFIXES = ("first_stage_model.", "vae.", "")


def _count(keys, pattern: str) -> int:
    n = 0
    while any(k.startswith(pattern.format(n)) for k in keys):
        n += 1
    return n


def ldm_vae_config(shapes: dict[str, tuple[int, ...]], scaling_factor: float, shift_factor: float | None) -> dict:
    levels = _count(shapes, "encoder.down.{}.")
    widths = [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)]
    layers = _count(shapes, "encoder.down.0.block.{}.")
    latent = shapes["decoder.conv_in.weight"][1]
    return dict(
        in_channels=shapes["encoder.conv_in.weight"][1],
        out_channels=shapes["decoder.conv_out.weight"][0],
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=widths,
        layers_per_block=layers,
        latent_channels=latent,
        norm_num_groups=32,
        use_quant_conv="quant_conv.weight" in shapes,
        use_post_quant_conv="post_quant_conv.weight" in shapes,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )


def load_vae(path: Path, dtype: torch.dtype, scaling_factor: float, shift_factor: float | None, latent_channels: int):
    """An AutoencoderKL from a single file or a diffusers folder; checks its latent width."""
    from diffusers import AutoencoderKL

    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").exists() else path
        if not (folder / "config.json").exists():
            raise ModelFileError(f"{path}: not a diffusers VAE folder (no config.json)")
        vae = AutoencoderKL.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
    else:
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        shapes = safetensors_shapes(path)
        prefix = next((p for p in LDM_PREFIXES if f"{p}encoder.conv_in.weight" in shapes), None)
        if prefix is None:
            raise ModelFileError(f"{path}: not a VAE in the original layout (no encoder.conv_in.weight)")
        shapes = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
        cfg = ldm_vae_config(shapes, scaling_factor, shift_factor)
        if any(w % 32 for w in cfg["block_out_channels"]):
            raise ModelFileError(f"{path}: VAE widths {cfg['block_out_channels']} are not multiples of 32")
        sd = load_state_dict(path, dtype, prefix)
        converted = convert_ldm_vae_checkpoint(sd, cfg)
        vae = AutoencoderKL(**cfg)
        missing, unexpected = vae.load_state_dict(converted, strict=False)
        if missing:
            raise ModelFileError(f"{path}: incomplete VAE, missing {len(missing)} tensors (e.g. {missing[0]})")
        if dtype != torch.float32:
            vae = vae.to(dtype)
    if vae.config.latent_channels != latent_channels:
        raise ModelFileError(
            f"{path}: this VAE has {vae.config.latent_channels} latent channels; the model needs {latent_channels}"
        )
    return vae.eval().requires_grad_(False)


# mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers (and 1.1): the config of the DC-AE file Sana users keep, which
# ComfyUI_ExtraModels' VAE loader also builds (VAE/conf.py)
SANA_DC_AE = dict(
    in_channels=3, latent_channels=32, attention_head_dim=32,
    encoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    decoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024], decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
    encoder_layers_per_block=[2, 2, 2, 3, 3, 3], decoder_layers_per_block=[3, 3, 3, 3, 3, 3],
    encoder_qkv_multiscales=[[], [], [], [5], [5], [5]], decoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
    upsample_block_type="interpolate", downsample_block_type="Conv", decoder_norm_types="rms_norm",
    decoder_act_fns="silu", scaling_factor=0.41407,
)


def load_dc_ae(path: Path, dtype: torch.dtype, latent_channels: int):
    """A deep-compression autoencoder (diffusers' AutoencoderDC): a diffusers folder, or the single
    `diffusion_pytorch_model.safetensors` of Sana's DC-AE (its config is fixed: SANA_DC_AE)."""
    from diffusers import AutoencoderDC

    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").exists() else path
        if not (folder / "config.json").exists():
            raise ModelFileError(f"{path}: not a diffusers DC-AE folder (no config.json)")
        vae = AutoencoderDC.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
    else:
        shapes = safetensors_shapes(path)
        if "encoder.conv_in.weight" not in shapes or "decoder.conv_out.weight" not in shapes:
            raise ModelFileError(f"{path}: not a DC-AE in diffusers' names (Sana's dc-ae-f32c32-sana-1.x-diffusers file)")
        with torch.device("meta"):
            vae = AutoencoderDC(**SANA_DC_AE)
        want = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
        wrong = sorted(k for k in want if shapes.get(k) != want[k])
        if wrong:
            raise ModelFileError(f"{path}: not Sana's DC-AE f32c32 ({wrong[0]} is {shapes.get(wrong[0])}, expected"
                                 f" {want[wrong[0]]}); give the diffusers folder with its config.json instead")
        vae.load_state_dict(load_state_dict(path, dtype), strict=True, assign=True)
    if vae.config.latent_channels != latent_channels:
        raise ModelFileError(f"{path}: this DC-AE has {vae.config.latent_channels} latent channels; the model needs"
                             f" {latent_channels}")
    return vae.eval().requires_grad_(False)


def vae_scale(vae) -> int:
    cfg = vae.config
    widths = getattr(cfg, "block_out_channels", None) or cfg.encoder_block_out_channels
    return 2 ** (len(widths) - 1)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> normalized latents (posterior mean, shifted and scaled by the VAE's config; a DC-AE's
    latent is deterministic)."""
    p = next(vae.parameters())
    out = vae.encode(images.to(p.device, p.dtype))
    lat = out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latent
    cfg = vae.config
    return ((lat.float() - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor).cpu()


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalized latents -> images in [-1, 1]."""
    p = next(vae.parameters())
    cfg = vae.config
    lat = latents.float() / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
    img = vae.decode(lat.to(p.device, p.dtype), return_dict=False)[0]
    return img.float().clamp(-1, 1).cpu()
