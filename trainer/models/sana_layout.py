"""Sana's checkpoint layouts: the original (NVlabs/Sana, what ComfyUI_ExtraModels' SanaMS loads and names its
modules by) and diffusers' SanaTransformer2DModel, as one layout table (layout.py), and the config from shapes.

The original fuses self-attention q, k, v into `attn.qkv` and cross-attention k, v into `cross_attn.kv_linear`;
diffusers keeps them apart. The feed-forward is GLUMBConv: a 1x1 conv, a 3x3 depthwise conv, a 1x1 conv
(`mlp.inverted_conv.conv` / `mlp.depth_conv.conv` / `mlp.point_conv.conv`, diffusers `ff.conv_inverted` /
`conv_depth` / `conv_point`).

What shapes cannot say: the cross-attention heads (Sana's presets: 16 for the 1152-wide 600M model, 20 for the
2240-wide 1.6B / 4.8B models) and the linear self-attention's head width (32 in every preset).
"""

from __future__ import annotations

from ..errors import ModelFileError
from .layout import LinearMap, ParamMap, count_blocks

LINEAR_HEAD_DIM = 32
CROSS_HEADS = {1152: 16, 2240: 20}  # Sana/conf.py presets by width
SANA_DIFFUSERS_KEY = "transformer_blocks.0.ff.conv_inverted.weight"
SANA_ORIGINAL_KEY = "blocks.0.mlp.inverted_conv.conv.weight"
# the original's caption-dropout embedding (training only) and position table (unused below 2K): diffusers has no
# place for them
ORIGINAL_ONLY = ("y_embedder.y_embedding", "pos_embed")
MAX_UNUSED_POS_EMBED = 32 * 32


def sana_layout(depth: int, qk_norm: bool) -> tuple[list[LinearMap], list[ParamMap]]:
    """The original <-> diffusers table. Linears with a bias are LinearMaps; everything else (bias-free linears and
    convs, norms, tables) is a ParamMap, since a LinearMap carries a weight and a bias."""
    lin = [
        LinearMap("t_embedder.mlp.0", ("time_embed.emb.timestep_embedder.linear_1",)),
        LinearMap("t_embedder.mlp.2", ("time_embed.emb.timestep_embedder.linear_2",)),
        LinearMap("t_block.1", ("time_embed.linear",)),
        LinearMap("y_embedder.y_proj.fc1", ("caption_projection.linear_1",)),
        LinearMap("y_embedder.y_proj.fc2", ("caption_projection.linear_2",)),
        LinearMap("final_layer.linear", ("proj_out",)),
    ]
    par = [
        ParamMap("x_embedder.proj.weight", "patch_embed.proj.weight"),
        ParamMap("x_embedder.proj.bias", "patch_embed.proj.bias"),
        ParamMap("attention_y_norm.weight", "caption_norm.weight"),
        ParamMap("final_layer.scale_shift_table", "scale_shift_table"),
    ]
    for i in range(depth):
        o, d = f"blocks.{i}", f"transformer_blocks.{i}"
        lin += [
            LinearMap(f"{o}.attn.proj", (f"{d}.attn1.to_out.0",), True),
            LinearMap(f"{o}.cross_attn.q_linear", (f"{d}.attn2.to_q",), True),
            LinearMap(f"{o}.cross_attn.kv_linear", (f"{d}.attn2.to_k", f"{d}.attn2.to_v"), True),
            LinearMap(f"{o}.cross_attn.proj", (f"{d}.attn2.to_out.0",), True),
        ]
        par += [
            ParamMap(f"{o}.scale_shift_table", f"{d}.scale_shift_table"),
            ParamMap(f"{o}.mlp.inverted_conv.conv.weight", f"{d}.ff.conv_inverted.weight"),
            ParamMap(f"{o}.mlp.inverted_conv.conv.bias", f"{d}.ff.conv_inverted.bias"),
            ParamMap(f"{o}.mlp.depth_conv.conv.weight", f"{d}.ff.conv_depth.weight"),
            ParamMap(f"{o}.mlp.depth_conv.conv.bias", f"{d}.ff.conv_depth.bias"),
            ParamMap(f"{o}.mlp.point_conv.conv.weight", f"{d}.ff.conv_point.weight"),
        ]
        if qk_norm:  # Sana 1.5: RMSNorm over q and k in both attentions
            par += [ParamMap(f"{o}.attn.q_norm.weight", f"{d}.attn1.norm_q.weight"),
                    ParamMap(f"{o}.attn.k_norm.weight", f"{d}.attn1.norm_k.weight"),
                    ParamMap(f"{o}.cross_attn.q_norm.weight", f"{d}.attn2.norm_q.weight"),
                    ParamMap(f"{o}.cross_attn.k_norm.weight", f"{d}.attn2.norm_k.weight")]
    return lin, par


# the bias-free self-attention qkv: split by rows like a LinearMap, but weight only
def qkv_parts(i: int) -> tuple[str, tuple[str, str, str]]:
    d = f"transformer_blocks.{i}.attn1"
    return f"blocks.{i}.attn.qkv", (f"{d}.to_q", f"{d}.to_k", f"{d}.to_v")


# the feed-forward's 1x1 convs: conv targets (LoCon); the depthwise 3x3 is left out, as grouped convs are elsewhere
FF_CONVS = (("mlp.inverted_conv.conv", "ff.conv_inverted"), ("mlp.point_conv.conv", "ff.conv_point"))


def _refuse_unsupported(shapes: dict[str, tuple[int, ...]], source: str) -> None:
    if any(k.startswith(("cfg_embedder.", "time_embed.guidance_embedder.", "logvar_linear.")) for k in shapes):
        raise ModelFileError(f"{source}: a Sana Sprint checkpoint. Sprint is a consistency model (TrigFlow sCM), not"
                             " flow matching, and this trainer does not train it; use Sana 1.0 / 1.5 (600M, 1.6B,"
                             " 4.8B)")
    # every original file holds its `pos_embed` table, read only by the 2K / 4K models (Sana/conf.py use_pe), whose
    # tables cover 64x64 / 128x128 latent cells; the 512 / 1024 px models' cover 16x16 / 32x32
    if "patch_embed.pos_embed" in shapes or shapes.get("pos_embed", (1, 0))[1] > MAX_UNUSED_POS_EMBED:
        raise ModelFileError(f"{source}: a Sana 2K / 4K checkpoint (it reads positional embeddings), which this"
                             " trainer does not train yet; use a 512 / 1024 px Sana 1.0 / 1.5 model")


def diffusers_config(shapes: dict[str, tuple[int, ...]], source: str, cross_heads: int | None = None) -> dict:
    """SanaTransformer2DModel's config from a checkpoint's shapes, in either layout (prefix removed); `cross_heads`
    where the file says them (else the preset of its width)."""
    _refuse_unsupported(shapes, source)
    original = SANA_ORIGINAL_KEY in shapes
    try:
        if original:
            hidden, in_ch, patch, _ = shapes["x_embedder.proj.weight"]
            depth = count_blocks(shapes, "blocks.")
            caption = shapes["y_embedder.y_proj.fc1.weight"][1]
            out = shapes["final_layer.linear.weight"][0]
            ff = shapes[SANA_ORIGINAL_KEY][0] // 2
            qk_norm = "blocks.0.attn.q_norm.weight" in shapes
            cross_norm = "blocks.0.cross_attn.q_norm.weight" in shapes
        else:
            hidden, in_ch, patch, _ = shapes["patch_embed.proj.weight"]
            depth = count_blocks(shapes, "transformer_blocks.")
            caption = shapes["caption_projection.linear_1.weight"][1]
            out = shapes["proj_out.weight"][0]
            ff = shapes[SANA_DIFFUSERS_KEY][0] // 2
            qk_norm = cross_norm = "transformer_blocks.0.attn1.norm_q.weight" in shapes
    except KeyError as e:
        raise ModelFileError(f"{source}: not a complete Sana checkpoint (missing {e.args[0]})") from None
    if qk_norm != cross_norm:
        raise ModelFileError(f"{source}: q/k norms in one attention only; Sana 1.5 has them in both")
    if cross_heads is None and hidden not in CROSS_HEADS:
        raise ModelFileError(f"{source}: Sana width {hidden} matches no Sana preset ({', '.join(map(str, CROSS_HEADS))});"
                             " its cross-attention heads are unknown")
    if hidden % LINEAR_HEAD_DIM:
        raise ModelFileError(f"{source}: Sana width {hidden} is not a multiple of its 32-wide linear-attention heads")
    heads = cross_heads or CROSS_HEADS[hidden]
    if hidden % heads:
        raise ModelFileError(f"{source}: Sana width {hidden} does not split into {heads} cross-attention heads")
    return dict(in_channels=in_ch, out_channels=out // patch**2, num_attention_heads=hidden // LINEAR_HEAD_DIM,
                attention_head_dim=LINEAR_HEAD_DIM, num_layers=depth, num_cross_attention_heads=heads,
                cross_attention_head_dim=hidden // heads, cross_attention_dim=hidden, caption_channels=caption,
                mlp_ratio=ff / hidden, patch_size=patch, sample_size=32,
                qk_norm="rms_norm_across_heads" if qk_norm else None)


def is_original(shapes: dict) -> bool:
    return SANA_ORIGINAL_KEY in shapes
