"""Random SDXL files: full checkpoints or bare UNets with ComfyUI-style clip_l / clip_g / vae files."""

from __future__ import annotations

from pathlib import Path

import torch

from ..fileio import save_safetensors_atomic
from ..models.sdxl_layout import (CLIP_G_PREFIX, CLIP_L_PREFIX, NUM_TIME_IDS, TIME_ID_CHANNELS, VAE_PREFIX,
                                  diffusers_to_ldm, heads_for, transformers_to_open_clip)
from . import tiny



def sdxl_unet_config(widths=(32, 64, 128), layers: int = 2, depths=(0, 1, 2), context: int = 96, pooled: int = 32) -> dict:
    """A diffusers UNet config with SDXL's structure at any width (heads of 64 channels, 6 x 256 time ids)."""
    n = len(widths)
    return dict(
        sample_size=32, in_channels=4, out_channels=4,
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        up_block_types=["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)],
        block_out_channels=list(widths), layers_per_block=layers, cross_attention_dim=context,
        attention_head_dim=[heads_for(w) for w in widths],
        transformer_layers_per_block=[d or (depths[-1] if i == n - 1 else 1) for i, d in enumerate(depths)],
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_ID_CHANNELS,
        projection_class_embeddings_input_dim=pooled + NUM_TIME_IDS * TIME_ID_CHANNELS, norm_num_groups=32,
    )


def random_unet_ldm(cfg: dict, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random weights for the UNet of `cfg`, in the LDM layout, with norm scales near 1 and small nonzero biases
    (so that a wrongly mapped bias or norm shows in the outputs)."""
    from diffusers import UNet2DConditionModel

    sd = tiny.random_weights(tiny.module_shapes(UNet2DConditionModel, cfg), seed, dtype, bias_std=0.1, norm_std=0.1)
    with torch.device("meta"):
        config = UNet2DConditionModel(**cfg).config
    return diffusers_to_ldm(sd, config)


def write_sdxl_files(folder: Path, widths=(32, 64, 128), layers: int = 2, depths=(0, 1, 2), clip_l_width: int = 32,
                     clip_g_width: int = 64, pooled: int = 32, clip_layers: int = 2, vae_widths=(32, 32),
                     full: bool = True, v_pred: bool = False, seed: int = 11, dtype: torch.dtype = torch.float32,
                     name: str = "sdxl") -> dict:
    """A random SDXL-structured model in the files users keep: one full checkpoint (`checkpoints/`: UNet under
    model.diffusion_model., CLIP-L, OpenCLIP-G, VAE), or with `full=False` a bare UNet plus ComfyUI-style
    clip_l / clip_g (transformers layout) / vae files. Returns the `model:` config."""
    folder.mkdir(parents=True, exist_ok=True)
    tok_dir = folder / "tokenizer"
    tok = tiny.build_tokenizer(tok_dir, "clip")
    vocab, bos, eos = len(tok), tok.bos_token_id, tok.eos_token_id
    unet = random_unet_ldm(sdxl_unet_config(widths, layers, depths, clip_l_width + clip_g_width, pooled), seed, dtype)
    clip_l = tiny.clip_state(vocab, clip_l_width, clip_layers, seed + 1, bos, eos)
    clip_g = tiny.clip_state(vocab, clip_g_width, clip_layers, seed + 2, bos, eos, projection=pooled, act="gelu")
    vae = tiny.random_weights(tiny.ldm_vae_shapes(list(vae_widths), 1, 4), seed + 3, dtype)
    marker = {"v_pred": torch.zeros(0)} if v_pred else {}
    cfg = {"arch": "sdxl", "tokenizer_paths": [str(tok_dir)]}
    if full:
        sd = {f"model.diffusion_model.{k}": v for k, v in unet.items()}
        sd.update({f"{CLIP_L_PREFIX}{k}": v.to(dtype) for k, v in clip_l.items()})
        sd.update({f"{CLIP_G_PREFIX}{k}": v.to(dtype) for k, v in transformers_to_open_clip(clip_g).items()})
        sd.update({f"{VAE_PREFIX}{k}": v for k, v in vae.items()})
        path = folder / f"{name}.safetensors"
        save_safetensors_atomic({**sd, **marker}, path)
        cfg["name_or_path"] = str(path)
    else:
        paths = {n: folder / f"{name}_{n}.safetensors" for n in ("unet", "clip_l", "clip_g", "vae")}
        save_safetensors_atomic({**unet, **marker}, paths["unet"])
        save_safetensors_atomic({k: v.to(dtype) for k, v in clip_l.items()}, paths["clip_l"])
        save_safetensors_atomic({k: v.to(dtype) for k, v in clip_g.items()}, paths["clip_g"])
        save_safetensors_atomic(vae, paths["vae"])
        cfg.update(name_or_path=str(paths["unet"]), text_encoder_paths=[str(paths["clip_l"]), str(paths["clip_g"])],
                   vae_path=str(paths["vae"]))
    return cfg


def write_sdxl_demo(folder: Path) -> dict:
    """A random SDXL in one ComfyUI-style checkpoint that ComfyUI detects as SDXL: it matches SDXL on
    model_channels 320, context 2048, adm 2816 and transformer depths [0,0,2,2,10,10], but not on the channel
    multipliers, so widths (320, 320, 320) make a 283M UNet. The text encoders are one layer each, at the
    widths the UNet needs (768 + 1280). Returns the `model:` config."""
    path = folder / "sdxl_demo.safetensors"
    if path.exists() and (folder / "tokenizer").exists():
        return {"arch": "sdxl", "name_or_path": str(path), "tokenizer_paths": [str(folder / "tokenizer")]}
    return write_sdxl_files(folder, widths=(320, 320, 320), layers=2, depths=(0, 2, 10), clip_l_width=768,
                            clip_g_width=1280, pooled=1280, clip_layers=1, vae_widths=(32, 32, 32, 32),
                            name="sdxl_demo", dtype=torch.bfloat16)
