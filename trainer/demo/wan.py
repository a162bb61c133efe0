"""Random Wan 2.1 files in the layouts ComfyUI loads: the transformer (`diffusion_models`), a UMT5 encoder with
its tokenizer inside (`text_encoders`), the Wan 2.1 VAE (`vae`), and CLIP vision for I2V (`clip_vision`)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..fileio import save_safetensors_atomic
from ..models.wan_layout import diffusers_to_original, vae_key_to_original
from . import tiny


def wan_diffusers_config(dim: int = 128, layers: int = 2, ffn: int = 256, text_dim: int = 4096, freq_dim: int = 256,
                         i2v: bool = False, image_dim: int = 32, vace_layers: int = 0) -> dict:
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=dim // 128, attention_head_dim=128,
               in_channels=36 if i2v else 16, out_channels=16, text_dim=text_dim, freq_dim=freq_dim, ffn_dim=ffn,
               num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
    if i2v:
        cfg.update(image_dim=image_dim, added_kv_proj_dim=dim)
    if vace_layers:  # every (layers / vace_layers)-th block takes a VACE hint, as ComfyUI maps them
        cfg.update(vace_layers=[i * (layers // vace_layers) for i in range(vace_layers)], vace_in_channels=96)
    return cfg


def make_wan_file(path: Path, cfg: dict, seed: int = 31, dtype: torch.dtype = torch.float32) -> None:
    """A Wan transformer with random weights in the original layout (ComfyUI's `diffusion_models` file)."""
    from diffusers import WanTransformer3DModel, WanVACETransformer3DModel

    shapes = tiny.module_shapes(WanVACETransformer3DModel if "vace_layers" in cfg else WanTransformer3DModel, cfg)
    sd = tiny.random_weights(shapes, seed, dtype, bias_std=0.02, norm_std=0.1,
                             std={k: 0.05 for k in shapes if k.endswith("scale_shift_table")})
    save_safetensors_atomic(diffusers_to_original(sd, cfg), path)


def make_wan_vae_file(path: Path, base_dim: int = 16, seed: int = 32, dtype: torch.dtype = torch.float32) -> None:
    """A Wan 2.1 VAE (16 latent channels) with random weights in the original layout ComfyUI's VAE loader reads."""
    from diffusers import AutoencoderKLWan

    shapes = tiny.module_shapes(AutoencoderKLWan, dict(base_dim=base_dim, z_dim=16))
    sd = tiny.random_weights(shapes, seed, dtype)
    for k, v in sd.items():
        if k.endswith(".gamma"):  # RMS-norm scales
            sd[k] = torch.ones_like(v)
    save_safetensors_atomic({vae_key_to_original(k): v for k, v in sd.items()}, path)


def make_clip_vision_file(path: Path, hidden: int = 32, layers: int = 2, image_size: int = 28, patch: int = 14,
                          seed: int = 33, dtype: torch.dtype = torch.float32) -> None:
    """A small CLIP vision tower in the transformers layout (ComfyUI's clip_vision files)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                           num_attention_heads=max(1, hidden // 64), image_size=image_size, patch_size=patch,
                           hidden_act="gelu")
    model = CLIPVisionModel(cfg)
    sd = {(k if k.startswith("vision_model.") else f"vision_model.{k}"): v.to(dtype)
          for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    save_safetensors_atomic(sd, path)


def write_wan_files(folder: Path, i2v: bool = False, dim: int = 128, layers: int = 2, text_dim: int = 4096,
                    umt5_layers: int = 2, dtype: torch.dtype = torch.float32, name: str = "wan21",
                    image_dim: int = 1280, clip_layers: int = 1, vace: bool = False) -> dict:
    """A random Wan 2.1 in the files users keep. Sized so ComfyUI detects and loads it as Wan 2.1 (heads of 128,
    freq 256, text width 4096, I2V image features 1280: ComfyUI fixes those). Returns the `model:` config."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {n: folder / f"{name}_{n}.safetensors" for n in ("transformer", "umt5", "vae", "clip_vision")}
    make_wan_file(paths["transformer"], wan_diffusers_config(dim, layers, 2 * dim, text_dim, 256, i2v, image_dim,
                                                             layers // 2 if vace else 0), dtype=dtype)
    tiny.make_umt5_file(paths["umt5"], d_model=text_dim, layers=umt5_layers, heads=2, d_kv=32, d_ff=128, dtype=dtype)
    make_wan_vae_file(paths["vae"], dtype=dtype)
    model = {"arch": "wan21_i2v" if i2v else "wan21_vace" if vace else "wan21", "name_or_path": str(paths["transformer"]),
             "text_encoder_paths": [str(paths["umt5"])], "vae_path": str(paths["vae"]), "t5_max_length": 32}
    if i2v:
        make_clip_vision_file(paths["clip_vision"], hidden=image_dim, layers=clip_layers, dtype=dtype)
        model["clip_vision_path"] = str(paths["clip_vision"])
    return model


def write_wan_demo(folder: Path, i2v: bool = False, vace: bool = False) -> dict:
    arch = "wan21_i2v" if i2v else "wan21_vace" if vace else "wan21"
    name = f"{arch}_demo"
    transformer = folder / f"{name}_transformer.safetensors"
    if transformer.exists():
        model = {"arch": arch, "name_or_path": str(transformer),
                 "text_encoder_paths": [str(folder / f"{name}_umt5.safetensors")],
                 "vae_path": str(folder / f"{name}_vae.safetensors"), "t5_max_length": 32}
        if i2v:
            model["clip_vision_path"] = str(folder / f"{name}_clip_vision.safetensors")
        return model
    return write_wan_files(folder, i2v=i2v, vace=vace, dtype=torch.bfloat16, name=name)
