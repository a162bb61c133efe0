"""SD3 / SD 3.5 MMDiT in two layouts: the original (Stability / ComfyUI `joint_blocks`) and diffusers'.

One table drives loading a single-file checkpoint into diffusers' SD3Transformer2DModel, writing one back,
and naming trainable layers by ComfyUI's keys (a fused `qkv` as three diffusers modules that each compute a
third of its rows). The config comes from the checkpoint's shapes: width and patch from `x_embedder.proj`,
depth from the joint blocks, head width from the 3.5 qk-norm scales (64 without them, as ComfyUI assumes),
Medium's dual-attention layers from the blocks that have `x_block.attn2`.

The last block's context stream is "pre-only" (its output is dropped): it has qkv and a modulation of two
vectors, no proj or mlp. That modulation is (shift, scale) in the original and (scale, shift) in diffusers.
"""

from __future__ import annotations

import math

import torch

from ..errors import ModelFileError
from .layout import LinearMap, ParamMap, count_blocks, join_original, split_original

# where the transformer sits: a full checkpoint (`checkpoints/`), a bare ComfyUI file, or a prefix-less one
ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
# a full checkpoint's other parts
CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
VAE_PREFIX = "first_stage_model."
OTHER_PARTS = ("text_encoders.", "first_stage_model.")

QK_NORM_HEAD_DIM = 64  # SD3.0 has no qk-norm scales to read the head width from; ComfyUI fixes it at 64


def sd3_layout(num_layers: int, dual_layers, qk_norm: bool) -> tuple[list[LinearMap], list[ParamMap]]:
    lin: list[LinearMap] = [
        LinearMap("x_embedder.proj", ("pos_embed.proj",)),
        LinearMap("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
        LinearMap("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
        LinearMap("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",)),
        LinearMap("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",)),
        LinearMap("context_embedder", ("context_embedder",)),
        LinearMap("final_layer.linear", ("proj_out",)),
        LinearMap("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True),
    ]
    par: list[ParamMap] = [ParamMap("pos_embed", "pos_embed.pos_embed")]
    dual = set(dual_layers)
    for i in range(num_layers):
        o, d = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        last = i == num_layers - 1
        lin += [
            LinearMap(f"{o}.x_block.attn.qkv", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"), True),
            LinearMap(f"{o}.x_block.attn.proj", (f"{d}.attn.to_out.0",), True),
            LinearMap(f"{o}.x_block.mlp.fc1", (f"{d}.ff.net.0.proj",), True),
            LinearMap(f"{o}.x_block.mlp.fc2", (f"{d}.ff.net.2",), True),
            LinearMap(f"{o}.x_block.adaLN_modulation.1", (f"{d}.norm1.linear",), True),
            LinearMap(f"{o}.context_block.attn.qkv",
                      (f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"), True),
            LinearMap(f"{o}.context_block.adaLN_modulation.1", (f"{d}.norm1_context.linear",), True, swap_halves=last),
        ]
        if not last:
            lin += [
                LinearMap(f"{o}.context_block.attn.proj", (f"{d}.attn.to_add_out",), True),
                LinearMap(f"{o}.context_block.mlp.fc1", (f"{d}.ff_context.net.0.proj",), True),
                LinearMap(f"{o}.context_block.mlp.fc2", (f"{d}.ff_context.net.2",), True),
            ]
        if i in dual:
            lin += [
                LinearMap(f"{o}.x_block.attn2.qkv", (f"{d}.attn2.to_q", f"{d}.attn2.to_k", f"{d}.attn2.to_v"), True),
                LinearMap(f"{o}.x_block.attn2.proj", (f"{d}.attn2.to_out.0",), True),
            ]
        if qk_norm:
            par += [
                ParamMap(f"{o}.x_block.attn.ln_q.weight", f"{d}.attn.norm_q.weight"),
                ParamMap(f"{o}.x_block.attn.ln_k.weight", f"{d}.attn.norm_k.weight"),
                ParamMap(f"{o}.context_block.attn.ln_q.weight", f"{d}.attn.norm_added_q.weight"),
                ParamMap(f"{o}.context_block.attn.ln_k.weight", f"{d}.attn.norm_added_k.weight"),
            ]
            if i in dual:
                par += [
                    ParamMap(f"{o}.x_block.attn2.ln_q.weight", f"{d}.attn2.norm_q.weight"),
                    ParamMap(f"{o}.x_block.attn2.ln_k.weight", f"{d}.attn2.norm_k.weight"),
                ]
    return lin, par


def layout_of(cfg) -> tuple[list[LinearMap], list[ParamMap]]:
    get = cfg.get if isinstance(cfg, dict) else lambda k: getattr(cfg, k)
    return sd3_layout(int(get("num_layers")), tuple(get("dual_attention_layers") or ()), get("qk_norm") is not None)


def transformer_prefix(shapes) -> str | None:
    return next((p for p in ORIGINAL_PREFIXES if f"{p}joint_blocks.0.x_block.attn.qkv.weight" in shapes), None)


def transformer_shapes(shapes: dict[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
    """The transformer's own tensors, prefix removed (a prefix-less file may still carry other parts)."""
    out = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    if not prefix:
        out = {k: v for k, v in out.items() if not k.startswith(OTHER_PARTS)}
    return out


def diffusers_config_from_original(shapes: dict[str, tuple[int, ...]], source: str) -> dict:
    """SD3Transformer2DModel config from the shapes of an original-layout state dict (prefix removed)."""
    unsupported = [k for k in ("context_processor.layers.0.attn.qkv.weight", "register") if k in shapes]
    if unsupported:
        raise ModelFileError(f"{source}: an MMDiT variant with {unsupported[0]} is not SD3 / SD 3.5; not supported")
    try:
        hidden, in_ch, patch, _ = shapes["x_embedder.proj.weight"]
        num_layers = count_blocks(shapes, "joint_blocks.")
        qk = "joint_blocks.0.x_block.attn.ln_q.weight" in shapes
        head_dim = shapes["joint_blocks.0.x_block.attn.ln_q.weight"][0] if qk else QK_NORM_HEAD_DIM
        caption_dim, joint_dim = shapes["context_embedder.weight"]
        pooled = shapes["y_embedder.mlp.0.weight"][1]
        out_ch = shapes["final_layer.linear.weight"][0] // (patch * patch)
        mlp = shapes["joint_blocks.0.x_block.mlp.fc1.weight"][0]
        n_patches = shapes["pos_embed"][1]
    except KeyError as e:
        raise ModelFileError(f"{source}: not a complete SD3 checkpoint (missing {e.args[0]})") from None
    dual = tuple(i for i in range(num_layers) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes)
    pos_max = math.isqrt(n_patches)
    if pos_max * pos_max != n_patches:
        raise ModelFileError(f"{source}: pos_embed of {n_patches} positions is not a square grid")
    if hidden % head_dim:
        raise ModelFileError(f"{source}: width {hidden} does not split into heads of {head_dim}")
    if caption_dim != hidden:
        raise ModelFileError(f"{source}: context_embedder width {caption_dim} differs from the model's {hidden}")
    if mlp != 4 * hidden:
        raise ModelFileError(f"{source}: MLP ratio {mlp / hidden:g} is not supported (SD3 uses 4)")
    return dict(
        sample_size=min(128, pos_max * patch),  # only seeds diffusers' default pos_embed; the file's replaces it
        patch_size=patch,
        in_channels=in_ch,
        num_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=hidden // head_dim,
        joint_attention_dim=joint_dim,
        caption_projection_dim=caption_dim,
        pooled_projection_dim=pooled,
        out_channels=out_ch,
        pos_embed_max_size=pos_max,
        dual_attention_layers=dual,
        qk_norm="rms_norm" if qk else None,
    )




def original_to_diffusers(sd: dict[str, torch.Tensor], model_shapes: dict[str, tuple[int, ...]], cfg: dict,
                          source: str) -> dict[str, torch.Tensor]:
    lin, par = layout_of(cfg)
    out = split_original(sd, lin, par, model_shapes, source, "SD3")
    if sd:  # split_original pops what it maps: anything left is a part this layout does not have
        extra = sorted(sd)
        raise ModelFileError(f"{source}: {len(extra)} transformer tensors this SD3 layout does not have (e.g. {extra[0]})")
    return out


def diffusers_to_original(sd: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    lin, par = layout_of(cfg)
    return join_original(sd, lin, par)
