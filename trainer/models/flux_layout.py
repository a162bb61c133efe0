"""The Flux layout (Flux.1, Flex.1/2, Chroma's blocks) in two forms: the original (BFL / ComfyUI
`diffusion_models`) and diffusers', as one layout table (see layout.py), and the loader of a Flux-layout
transformer from either."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..errors import ModelFileError
from .detect import require_family
from .files import diffusers_component, load_state_dict, safetensors_shapes
from .layout import ORIGINAL_PREFIXES, LinearMap, ParamMap, count_blocks, join_original, split_original


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




def load_flux_layout_transformer(
    path: Path,
    dtype: torch.dtype,
    arch: str,
    cls,
    family: str,
    config_from_shapes: Callable[[dict, str], dict],
    to_diffusers: Callable[[dict, dict, dict, str], dict],
    name: str,
):
    """A diffusers transformer of a Flux-layout family (`cls`) from an original-layout single file (config from
    its shapes) or a local diffusers folder; a checkpoint of another family is refused by name."""
    if path.is_dir():
        folder = diffusers_component(path, "transformer", name)
        return cls.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
    shapes = safetensors_shapes(path)
    require_family(path, shapes, family, arch)
    prefix = next((p for p in ORIGINAL_PREFIXES if f"{p}img_in.weight" in shapes), None)
    if prefix is None:
        raise ModelFileError(f"{path}: a {name} checkpoint without img_in (a pixel-space variant?) is not supported")
    shapes = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    cfg = config_from_shapes(shapes, str(path))
    with torch.device("meta"):
        model = cls(**cfg)
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd = to_diffusers(load_state_dict(path, dtype, prefix), model_shapes, cfg, str(path))
    missing, _ = model.load_state_dict(sd, strict=False, assign=True)
    if missing:
        raise ModelFileError(f"{path}: incomplete {name} checkpoint, missing {missing[0]}")
    return model
