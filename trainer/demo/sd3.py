"""Random SD3 / SD 3.5 files: full checkpoints or bare transformers with separate encoders, in ComfyUI's layouts."""

from __future__ import annotations

from pathlib import Path

import torch

from ..fileio import save_safetensors_atomic
from ..models.files import load_state_dict
from ..models.sd3_layout import CLIP_G_PREFIX, CLIP_L_PREFIX, T5_PREFIX, VAE_PREFIX, diffusers_to_original
from . import tiny



def sd3_diffusers_config(hidden: int = 32, head_dim: int = 8, layers: int = 2, joint_dim: int = 32, pooled: int = 32,
                         dual=(0,), qk_norm: bool = True, pos_max: int = 16, patch: int = 2, in_channels: int = 16) -> dict:
    return dict(
        sample_size=min(128, pos_max * patch), patch_size=patch, in_channels=in_channels, num_layers=layers,
        attention_head_dim=head_dim, num_attention_heads=hidden // head_dim, joint_attention_dim=joint_dim,
        caption_projection_dim=hidden, pooled_projection_dim=pooled, out_channels=in_channels,
        pos_embed_max_size=pos_max, dual_attention_layers=tuple(dual), qk_norm="rms_norm" if qk_norm else None,
    )


def sd3_original_state_dict(cfg: dict, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random weights for `cfg` in the original layout: norm scales near 1, small nonzero biases and a visible
    position table (so a misplaced bias, scale, swap or crop shows in the outputs)."""
    from diffusers import SD3Transformer2DModel

    sd = tiny.random_weights(tiny.module_shapes(SD3Transformer2DModel, cfg), seed, dtype, bias_std=0.05, norm_std=0.1,
                             std={"pos_embed.pos_embed": 0.5})
    return diffusers_to_original(sd, cfg)


def write_sd3_files(folder: Path, cfg: dict, clip_l_width: int = 16, clip_g_width: int = 16, clip_layers: int = 2,
                    t5_layers: int = 1, vae_widths=(32, 32), full: bool = True, seed: int = 21,
                    dtype: torch.dtype = torch.float32, name: str = "sd3") -> dict:
    """A random SD3 in the files users keep: one full checkpoint (transformer under model.diffusion_model.,
    CLIP-L, CLIP-G, T5 under text_encoders., VAE under first_stage_model.) or, with `full=False`, a bare
    transformer plus clip_l / clip_g / t5 / vae files. CLIP widths must sum to at most cfg's joint_attention_dim
    and to its pooled_projection_dim. Returns the `model:` config."""
    folder.mkdir(parents=True, exist_ok=True)
    tok_clip, tok_t5 = folder / "tokenizer", folder / "tokenizer_t5"
    ct = tiny.build_tokenizer(tok_clip, "clip")
    tt = tiny.build_tokenizer(tok_t5, "t5")
    transformer = sd3_original_state_dict(cfg, seed, dtype)
    clip_l = {k: v.to(dtype) for k, v in tiny.clip_state(len(ct), clip_l_width, clip_layers, seed + 1, ct.bos_token_id,
                                                         ct.eos_token_id, projection=clip_l_width).items()}
    clip_g = {k: v.to(dtype) for k, v in tiny.clip_state(len(ct), clip_g_width, clip_layers, seed + 2, ct.bos_token_id,
                                                         ct.eos_token_id, projection=clip_g_width).items()}
    t5_file = folder / f"{name}_t5.safetensors"
    tiny.make_t5_file(t5_file, len(tt), d_model=cfg["joint_attention_dim"], layers=t5_layers, seed=seed + 3, dtype=dtype)
    vae = tiny.random_weights(tiny.ldm_vae_shapes(list(vae_widths), 1, cfg["in_channels"]), seed + 4, dtype)
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


def write_sd3_demo(folder: Path) -> dict:
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
