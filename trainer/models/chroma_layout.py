"""Chroma in two layouts: the original (lodestone / ComfyUI `diffusion_models`) and diffusers'.

Chroma is Flux's double / single blocks without per-block modulation linears, no CLIP vector or guidance
embedding, and a `distilled_guidance_layer` (the approximator) that computes every block's modulation from
the timestep and a modulation index. The block mapping is Flux's (flux_layout.block_layout); this file adds
the rest and derives the diffusers config from the checkpoint's shapes, so pruned and tiny models load
(diffusers' own converter hard-codes a 3072 width).
"""

from __future__ import annotations

import torch

from ..errors import ModelFileError
from .flux_layout import block_layout, rope_axes
from .layout import LinearMap, ParamMap, count_blocks, join_original, split_original

# The original model (and ComfyUI) always computes 344 modulation vectors (Chroma's 19 double + 38 single
# blocks: 3 * 38 + 12 * 19 + 2) and takes the final layer's from the last two, whatever the depth.
ORIGINAL_MOD_INDEX_LENGTH = 344


def chroma_layout(num_double: int, num_single: int, approximator_layers: int) -> tuple[list[LinearMap], list[ParamMap]]:
    g = "distilled_guidance_layer"
    lin: list[LinearMap] = [
        LinearMap("img_in", ("x_embedder",)),
        LinearMap("txt_in", ("context_embedder",)),
        LinearMap("final_layer.linear", ("proj_out",)),
        LinearMap(f"{g}.in_proj", (f"{g}.in_proj",)),
        LinearMap(f"{g}.out_proj", (f"{g}.out_proj",)),
    ]
    par: list[ParamMap] = []
    for i in range(approximator_layers):
        lin += [
            LinearMap(f"{g}.layers.{i}.in_layer", (f"{g}.layers.{i}.linear_1",)),
            LinearMap(f"{g}.layers.{i}.out_layer", (f"{g}.layers.{i}.linear_2",)),
        ]
        par.append(ParamMap(f"{g}.norms.{i}.scale", f"{g}.norms.{i}.weight"))
    blin, bpar = block_layout(num_double, num_single, modulation=False)
    return lin + blin, par + bpar


def layout_for(cfg: dict) -> tuple[list[LinearMap], list[ParamMap]]:
    return chroma_layout(cfg["num_layers"], cfg["num_single_layers"], cfg["approximator_layers"])


def diffusers_config_from_original(shapes: dict[str, tuple[int, ...]], source: str) -> dict:
    """ChromaTransformer2DModel config from the shapes of an original-layout state dict (prefix removed)."""
    g = "distilled_guidance_layer"
    try:
        hidden, in_ch = shapes["img_in.weight"]
        norm_key = ("double_blocks.0.img_attn.norm.query_norm.scale" if "double_blocks.0.img_attn.norm.query_norm.scale"
                    in shapes else "single_blocks.0.norm.query_norm.scale")
        head_dim = shapes[norm_key][0]
        approx_hidden, approx_in = shapes[f"{g}.in_proj.weight"]
        cfg = dict(
            patch_size=1,
            in_channels=in_ch,
            out_channels=shapes["final_layer.linear.weight"][0],
            num_layers=count_blocks(shapes, "double_blocks."),
            num_single_layers=count_blocks(shapes, "single_blocks."),
            attention_head_dim=head_dim,
            num_attention_heads=hidden // head_dim,
            joint_attention_dim=shapes["txt_in.weight"][1],
            axes_dims_rope=rope_axes(head_dim),
            approximator_num_channels=approx_in,
            approximator_hidden_dim=approx_hidden,
            approximator_layers=count_blocks(shapes, f"{g}.layers."),
        )
        approx_out = shapes[f"{g}.out_proj.weight"][0]
        mlp = (shapes["double_blocks.0.img_mlp.0.weight"][0] if cfg["num_layers"]
               else shapes["single_blocks.0.linear1.weight"][0] - 3 * hidden)
    except KeyError as e:
        raise ModelFileError(f"{source}: not a complete Chroma checkpoint (missing {e.args[0]})") from None
    if approx_out != hidden:
        raise ModelFileError(f"{source}: Chroma approximator width {approx_out} does not match the model width {hidden}")
    if approx_in % 4:
        raise ModelFileError(f"{source}: Chroma approximator input {approx_in} is not a multiple of 4")
    if mlp != 4 * hidden:
        raise ModelFileError(f"{source}: Chroma MLP ratio {mlp / hidden:g} is not supported (diffusers' Chroma uses 4)")
    return cfg


def original_to_diffusers(sd: dict[str, torch.Tensor], model_shapes: dict[str, tuple[int, ...]], cfg: dict,
                          source: str) -> dict[str, torch.Tensor]:
    lin, par = layout_for(cfg)
    return split_original(sd, lin, par, model_shapes, source, "Chroma")


def diffusers_to_original(sd: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    lin, par = layout_for(cfg)
    return join_original(sd, lin, par)


def match_original_modulation_index(model: torch.nn.Module) -> None:
    """Make diffusers' Chroma compute what the original and ComfyUI compute at any depth.

    Both run the approximator on a list of modulation indices: the original always on 0..343 (Chroma's 19 double
    + 38 single blocks), taking block i's vectors at fixed offsets and the final layer's at 342, 343; diffusers on
    0..(3 * single + 12 * double + 1), with the same block offsets but the final layer's at the end of its list.
    They agree at Chroma's own depth; for shallower (pruned, tiny) models the final layer's modulation differs.
    The index list becomes diffusers' own with its last two replaced by 342, 343: the approximator works on each
    index alone, so this is exactly the original's output at the indices the model uses, without computing the
    ones it never reads (most of them, for a small model).
    """
    from diffusers.models.embeddings import get_timestep_embedding

    emb = model.time_text_embed
    n, width = emb.mod_proj.shape
    index = torch.arange(n)
    if n < ORIGINAL_MOD_INDEX_LENGTH:
        index[-2:] = torch.tensor([ORIGINAL_MOD_INDEX_LENGTH - 2, ORIGINAL_MOD_INDEX_LENGTH - 1])
    # rebuilt in any case: a model built on the meta device has no values for this non-persistent buffer
    proj = get_timestep_embedding(index * 1000, width, flip_sin_to_cos=True, downscale_freq_shift=0)
    device = emb.mod_proj.device if emb.mod_proj.device.type != "meta" else torch.device("cpu")
    emb.mod_proj = proj.to(device)  # stays a non-persistent buffer; forward casts it to the input's dtype
