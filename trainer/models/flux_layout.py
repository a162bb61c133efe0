"""Flux.1 in two layouts: the original (BFL / ComfyUI `diffusion_models`) and diffusers'.

One table drives everything that crosses the two: loading a single-file checkpoint into the diffusers
module, writing one back, and naming trainable layers by ComfyUI's keys (fused `qkv` / `linear1`
included, as several diffusers modules that each compute a slice of the fused rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import ModelFileError

if TYPE_CHECKING:
    from .base import Target

ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")


@dataclass(frozen=True)
class LinearMap:
    """Original linear `original` = row-wise concatenation of the diffusers linears `parts`."""

    original: str
    parts: tuple[str, ...]
    block: bool = False  # inside a double/single block: a default LoRA target
    swap_halves: bool = False  # diffusers orders (scale, shift) where the original has (shift, scale)


@dataclass(frozen=True)
class ParamMap:
    original: str
    diffusers: str


def flux_layout(num_double: int, num_single: int, guidance: bool) -> tuple[list[LinearMap], list[ParamMap]]:
    lin: list[LinearMap] = [
        LinearMap("img_in", ("x_embedder",)),
        LinearMap("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
        LinearMap("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
        LinearMap("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
        LinearMap("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
        LinearMap("txt_in", ("context_embedder",)),
        LinearMap("final_layer.linear", ("proj_out",)),
        LinearMap("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True),
    ]
    if guidance:
        lin += [
            LinearMap("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
            LinearMap("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
        ]
    blin, par = block_layout(num_double, num_single, modulation=True)
    return lin + blin, par


def block_layout(num_double: int, num_single: int, modulation: bool) -> tuple[list[LinearMap], list[ParamMap]]:
    """The double / single stream blocks, shared by the Flux-layout families. `modulation`: each block has its
    own modulation linear (Flux); Chroma's blocks have none (one approximator computes every block's)."""
    lin: list[LinearMap] = []
    par: list[ParamMap] = []
    for i in range(num_double):
        o, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        if modulation:
            lin += [
                LinearMap(f"{o}.img_mod.lin", (f"{d}.norm1.linear",), True),
                LinearMap(f"{o}.txt_mod.lin", (f"{d}.norm1_context.linear",), True),
            ]
        lin += [
            LinearMap(f"{o}.img_attn.qkv", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"), True),
            LinearMap(f"{o}.img_attn.proj", (f"{d}.attn.to_out.0",), True),
            LinearMap(f"{o}.txt_attn.qkv", (f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"), True),
            LinearMap(f"{o}.txt_attn.proj", (f"{d}.attn.to_add_out",), True),
            LinearMap(f"{o}.img_mlp.0", (f"{d}.ff.net.0.proj",), True),
            LinearMap(f"{o}.img_mlp.2", (f"{d}.ff.net.2",), True),
            LinearMap(f"{o}.txt_mlp.0", (f"{d}.ff_context.net.0.proj",), True),
            LinearMap(f"{o}.txt_mlp.2", (f"{d}.ff_context.net.2",), True),
        ]
        par += [
            ParamMap(f"{o}.img_attn.norm.query_norm.scale", f"{d}.attn.norm_q.weight"),
            ParamMap(f"{o}.img_attn.norm.key_norm.scale", f"{d}.attn.norm_k.weight"),
            ParamMap(f"{o}.txt_attn.norm.query_norm.scale", f"{d}.attn.norm_added_q.weight"),
            ParamMap(f"{o}.txt_attn.norm.key_norm.scale", f"{d}.attn.norm_added_k.weight"),
        ]
    for i in range(num_single):
        o, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        if modulation:
            lin.append(LinearMap(f"{o}.modulation.lin", (f"{d}.norm.linear",), True))
        lin += [
            LinearMap(f"{o}.linear1", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"), True),
            LinearMap(f"{o}.linear2", (f"{d}.proj_out",), True),
        ]
        par += [
            ParamMap(f"{o}.norm.query_norm.scale", f"{d}.attn.norm_q.weight"),
            ParamMap(f"{o}.norm.key_norm.scale", f"{d}.attn.norm_k.weight"),
        ]
    return lin, par


def _swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def count_blocks(keys, prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Flux splits each head's rotary dims over (index, y, x): 128 -> (16, 56, 56)."""
    if head_dim == 128:
        return (16, 56, 56)
    a = (head_dim * 7 // 16) // 2 * 2
    return (head_dim - 2 * a, a, a)


def diffusers_config_from_original(shapes: dict[str, tuple[int, ...]], source: str) -> dict:
    """FluxTransformer2DModel config from the shapes of an original-layout state dict (prefix removed)."""
    try:
        hidden, in_ch = shapes["img_in.weight"]
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        mlp = shapes["double_blocks.0.img_mlp.0.weight"][0]
        cfg = dict(
            patch_size=1,
            in_channels=in_ch,
            out_channels=shapes["final_layer.linear.weight"][0],
            num_layers=count_blocks(shapes, "double_blocks."),
            num_single_layers=count_blocks(shapes, "single_blocks."),
            attention_head_dim=head_dim,
            num_attention_heads=hidden // head_dim,
            joint_attention_dim=shapes["txt_in.weight"][1],
            pooled_projection_dim=shapes["vector_in.in_layer.weight"][1],
            guidance_embeds="guidance_in.in_layer.weight" in shapes,
            axes_dims_rope=rope_axes(head_dim),
        )
    except KeyError as e:
        raise ModelFileError(f"{source}: not a complete Flux checkpoint (missing {e.args[0]})") from None
    if mlp != 4 * hidden:
        raise ModelFileError(f"{source}: Flux MLP ratio {mlp / hidden:g} is not supported (diffusers' Flux uses 4)")
    return cfg


def original_to_diffusers(sd: dict[str, torch.Tensor], model_shapes: dict[str, tuple[int, ...]], cfg: dict, source: str) -> dict[str, torch.Tensor]:
    lin, par = flux_layout(cfg["num_layers"], cfg["num_single_layers"], cfg["guidance_embeds"])
    return split_original(sd, lin, par, model_shapes, source, "Flux")


def diffusers_to_original(sd: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    lin, par = flux_layout(cfg["num_layers"], cfg["num_single_layers"], cfg["guidance_embeds"])
    return join_original(sd, lin, par)


def split_original(sd: dict[str, torch.Tensor], lin: list[LinearMap], par: list[ParamMap],
                   model_shapes: dict[str, tuple[int, ...]], source: str, family: str) -> dict[str, torch.Tensor]:
    """Original-layout tensors -> diffusers names (fused linears split by the diffusers module sizes)."""
    out: dict[str, torch.Tensor] = {}
    try:
        for m in lin:
            for suffix in ("weight", "bias"):
                t = sd.pop(f"{m.original}.{suffix}")
                if m.swap_halves:
                    t = _swap(t)
                sizes = [model_shapes[f"{p}.{suffix}"][0] for p in m.parts]
                for p, piece in zip(m.parts, torch.split(t, sizes, dim=0)):
                    out[f"{p}.{suffix}"] = piece.contiguous()
        for m in par:
            out[m.diffusers] = sd.pop(m.original)
    except KeyError as e:
        raise ModelFileError(f"{source}: not a complete {family} checkpoint (missing {e.args[0]})") from None
    return out


def join_original(sd: dict[str, torch.Tensor], lin: list[LinearMap], par: list[ParamMap]) -> dict[str, torch.Tensor]:
    """Diffusers-named tensors -> the original layout (fused linears concatenated)."""
    out: dict[str, torch.Tensor] = {}
    for m in lin:
        for suffix in ("weight", "bias"):
            t = torch.cat([sd[f"{p}.{suffix}"] for p in m.parts], dim=0)
            out[f"{m.original}.{suffix}"] = _swap(t) if m.swap_halves else t
    for m in par:
        out[m.original] = sd[m.diffusers]
    return out


def block_targets(denoiser: torch.nn.Module, lin: list[LinearMap]) -> list["Target"]:
    """Trainable targets named by ComfyUI's keys: every block linear of `lin`, a fused one as several members."""
    from .base import Target, TargetMember

    modules = dict(denoiser.named_modules())
    out = []
    for m in lin:
        if not m.block:
            continue
        members, row = [], 0
        parts = [modules[p] for p in m.parts]
        for mod in parts:
            members.append(TargetMember(mod, slice(row, row + mod.out_features)))
            row += mod.out_features
        out.append(Target(key=f"diffusion_model.{m.original}", in_features=parts[0].in_features, out_features=row,
                          members=members, aliases=tuple(f"transformer.{p}" for p in m.parts)))
    return out
