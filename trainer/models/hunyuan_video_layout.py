"""HunyuanVideo (2024, T2V) in three layouts: the original (Tencent's checkpoint and ComfyUI's
`hunyuan_video_t2v_720p_*.safetensors`: `img_attn_qkv`, `img_mod.linear`, `img_mlp.fc1`), the names ComfyUI renames
them to on load (`img_attn.qkv`, `img_mod.lin`, `img_mlp.0`: what a file saved from ComfyUI holds, and the names its
LoRA keys use), and diffusers'. The layout table (layout.py) is written in ComfyUI's names; the original's are a
fixed renaming of those. Its double and single blocks are the Flux layout's (flux_layout.block_layout); what
differs is around them: a 3-D patch embedding, the token refiner in front of the text, and the embedders.

The VAE: ComfyUI's `hunyuan_video_vae_bf16.safetensors` is in the LDM layout with 3-D convolutions
(`encoder.down.0.block.0.conv1.conv.weight`, the mid-block attention as 1x1x1 convolutions); diffusers'
AutoencoderKLHunyuanVideo names the same tensors `encoder.down_blocks.0.resnets.0.conv1.conv.weight`.
"""

from __future__ import annotations

import re

import torch

from ..errors import ModelFileError
from .flux_layout import block_layout, rope_axes
from .layout import LinearMap, ParamMap, count_blocks, join_original, split_original

HEAD_DIM = 128  # ComfyUI derives the head count as hidden / 128
PATCH_KEY = "img_in.proj.weight"

# original fragment -> ComfyUI's; a key holds at most one, and where fragments overlap the longest one is meant
_RENAMES: tuple[tuple[str, str], ...] = (
    ("txt_in.t_embedder.mlp.0.", "txt_in.t_embedder.in_layer."),
    ("txt_in.t_embedder.mlp.2.", "txt_in.t_embedder.out_layer."),
    ("txt_in.c_embedder.linear_1.", "txt_in.c_embedder.in_layer."),
    ("txt_in.c_embedder.linear_2.", "txt_in.c_embedder.out_layer."),
    ("time_in.mlp.0.", "time_in.in_layer."),
    ("time_in.mlp.2.", "time_in.out_layer."),
    ("guidance_in.mlp.0.", "guidance_in.in_layer."),
    ("guidance_in.mlp.2.", "guidance_in.out_layer."),
    ("_attn_q_norm.weight", "_attn.norm.query_norm.scale"),
    ("_attn_k_norm.weight", "_attn.norm.key_norm.scale"),
    (".q_norm.weight", ".norm.query_norm.scale"),
    (".k_norm.weight", ".norm.key_norm.scale"),
    ("_attn_qkv.", "_attn.qkv."),
    ("_attn_proj.", "_attn.proj."),
    ("_mod.linear.", "_mod.lin."),
    (".modulation.linear.", ".modulation.lin."),
    ("mlp.fc1.", "mlp.0."),
    ("mlp.fc2.", "mlp.2."),
)


def _rename(key: str, pairs) -> str:
    found = [(a, b) for a, b in pairs if a in key]
    if not found:
        return key
    a, b = max(found, key=lambda p: len(p[0]))
    return key.replace(a, b)


def comfy_key(original: str) -> str:
    """An original-layout key under ComfyUI's name for it (what its loader renames it to)."""
    return _rename(original, _RENAMES)


def original_key(comfy: str) -> str:
    """A ComfyUI-named key under the original layout's name."""
    return _rename(comfy, [(b, a) for a, b in _RENAMES])


def is_original_layout(keys) -> bool:
    return any("_attn_qkv." in k or "_mod.linear." in k for k in keys)


def to_comfy_names(sd: dict) -> dict:
    """A state dict (or shapes) in either layout, under ComfyUI's names."""
    return {comfy_key(k): v for k, v in sd.items()} if is_original_layout(sd) else dict(sd)


def hunyuan_layout(num_double: int, num_single: int, num_refiner: int,
                   guidance: bool) -> tuple[list[LinearMap], list[ParamMap]]:
    """The table in ComfyUI's names. The double / single blocks are the default LoRA targets (`block=True`); the
    token refiner's linears are targets too, trained only when network_kwargs.only_if_contains names them."""
    lin = [
        LinearMap("img_in.proj", ("x_embedder.proj",)),
        LinearMap("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
        LinearMap("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
        LinearMap("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
        LinearMap("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
        LinearMap("txt_in.input_embedder", ("context_embedder.proj_in",)),
        LinearMap("txt_in.t_embedder.in_layer", ("context_embedder.time_text_embed.timestep_embedder.linear_1",)),
        LinearMap("txt_in.t_embedder.out_layer", ("context_embedder.time_text_embed.timestep_embedder.linear_2",)),
        LinearMap("txt_in.c_embedder.in_layer", ("context_embedder.time_text_embed.text_embedder.linear_1",)),
        LinearMap("txt_in.c_embedder.out_layer", ("context_embedder.time_text_embed.text_embedder.linear_2",)),
        LinearMap("final_layer.linear", ("proj_out",)),
        # diffusers orders the final modulation (scale, shift), the original (shift, scale)
        LinearMap("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True),
    ]
    if guidance:
        lin += [LinearMap("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
                LinearMap("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",))]
    par: list[ParamMap] = []
    for i in range(num_refiner):
        lin += refiner_linears(i)
        o, d = f"txt_in.individual_token_refiner.blocks.{i}", f"context_embedder.token_refiner.refiner_blocks.{i}"
        par += [ParamMap(f"{o}.{n}.{s}", f"{d}.{n}.{s}") for n in ("norm1", "norm2") for s in ("weight", "bias")]
    blin, bpar = block_layout(num_double, num_single, modulation=True)
    return lin + blin, par + bpar


def refiner_linears(i: int) -> list[LinearMap]:
    o, d = f"txt_in.individual_token_refiner.blocks.{i}", f"context_embedder.token_refiner.refiner_blocks.{i}"
    return [
        LinearMap(f"{o}.self_attn.qkv", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v")),
        LinearMap(f"{o}.self_attn.proj", (f"{d}.attn.to_out.0",)),
        LinearMap(f"{o}.mlp.0", (f"{d}.ff.net.0.proj",)),
        LinearMap(f"{o}.mlp.2", (f"{d}.ff.net.2",)),
        LinearMap(f"{o}.adaLN_modulation.1", (f"{d}.norm_out.linear",)),
    ]


def layout_of(cfg: dict) -> tuple[list[LinearMap], list[ParamMap]]:
    return hunyuan_layout(cfg["num_layers"], cfg["num_single_layers"], cfg["num_refiner_layers"],
                          cfg["guidance_embeds"])


def unsupported_variant(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why a checkpoint ComfyUI would detect as `hunyuan_video` is not the 2024 T2V model, or None."""
    if "byt5_in.fc1.weight" in shapes or "cond_type_embedding.weight" in shapes or "vision_in.proj.0.weight" in shapes:
        return "a HunyuanVideo 1.5 checkpoint (another family, not supported yet)"
    if "time_r_in.in_layer.weight" in shapes or "time_r_in.mlp.0.weight" in shapes:
        return "a mean-flow HunyuanVideo variant (not supported)"
    if PATCH_KEY in shapes and len(shapes[PATCH_KEY]) != 5:
        return "a 2-D HunyuanImage checkpoint, not HunyuanVideo"
    if PATCH_KEY in shapes and shapes[PATCH_KEY][1] != shapes["final_layer.linear.weight"][0] // 4:
        return (f"an image-to-video HunyuanVideo ({shapes[PATCH_KEY][1]} input channels: HunyuanVideo I2V or SkyReels);"
                " only text-to-video is supported")
    return None


def diffusers_config_from_original(shapes: dict[str, tuple[int, ...]], source: str) -> dict:
    """HunyuanVideoTransformer3DModel config from the shapes of a checkpoint in either layout (prefix removed)."""
    shapes = to_comfy_names(shapes)
    try:
        hidden, in_ch, pt, ph, pw = shapes[PATCH_KEY]
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        cfg = dict(
            in_channels=in_ch, out_channels=shapes["final_layer.linear.weight"][0] // (pt * ph * pw),
            num_attention_heads=hidden // head_dim, attention_head_dim=head_dim,
            num_layers=count_blocks(shapes, "double_blocks."), num_single_layers=count_blocks(shapes, "single_blocks."),
            num_refiner_layers=count_blocks(shapes, "txt_in.individual_token_refiner.blocks."),
            mlp_ratio=shapes["double_blocks.0.img_mlp.0.weight"][0] / hidden, patch_size=ph, patch_size_t=pt,
            qk_norm="rms_norm", guidance_embeds="guidance_in.in_layer.weight" in shapes,
            text_embed_dim=shapes["txt_in.input_embedder.weight"][1],
            pooled_projection_dim=shapes["vector_in.in_layer.weight"][1],
            rope_theta=256.0, rope_axes_dim=rope_axes(head_dim),
        )
    except (KeyError, ValueError) as e:
        raise ModelFileError(f"{source}: not a complete HunyuanVideo checkpoint (missing {e.args[0]})") from None
    if ph != pw:
        raise ModelFileError(f"{source}: a HunyuanVideo patch of {ph}x{pw} is not supported (square patches only)")
    return cfg


def original_to_diffusers(sd: dict[str, torch.Tensor], model_shapes: dict, cfg: dict, source: str) -> dict:
    lin, par = layout_of(cfg)
    return split_original(to_comfy_names(sd), lin, par, model_shapes, source, "HunyuanVideo")


def diffusers_to_original(sd: dict[str, torch.Tensor], cfg: dict, comfy_names: bool = False) -> dict:
    """Diffusers-named tensors in the original layout (what users keep), or under ComfyUI's names."""
    lin, par = layout_of(cfg)
    out = join_original(sd, lin, par)
    return out if comfy_names else {original_key(k): v for k, v in out.items()}


# --- the VAE ------------------------------------------------------------------------------------------------

_VAE_RESNET = {"conv_shortcut.": "nin_shortcut."}
_VAE_ATTN = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def vae_key_to_comfy(key: str, levels: int) -> str:
    """A diffusers AutoencoderKLHunyuanVideo key -> the LDM name ComfyUI's `hunyuan_video_vae` file uses. `levels`:
    the number of down / up blocks (the decoder's are numbered from the other end)."""
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    side, rest = key.split(".", 1)
    rest = rest.replace("conv_norm_out.", "norm_out.")
    m = re.match(r"down_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0)\.(.+)$", rest)
    if m:
        tail = m.group(4)
        if m.group(3) is None:
            return f"{side}.down.{m.group(1)}.downsample.{tail}"
        return f"{side}.down.{m.group(1)}.block.{m.group(3)}.{_sub(tail, _VAE_RESNET)}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)$", rest)
    if m:
        level, tail = levels - 1 - int(m.group(1)), m.group(4)
        if m.group(3) is None:
            return f"{side}.up.{level}.upsample.{tail}"
        return f"{side}.up.{level}.block.{m.group(3)}.{_sub(tail, _VAE_RESNET)}"
    m = re.match(r"mid_block\.resnets\.(\d+)\.(.+)$", rest)
    if m:
        return f"{side}.mid.block_{int(m.group(1)) + 1}.{_sub(m.group(2), _VAE_RESNET)}"
    m = re.match(r"mid_block\.attentions\.0\.(.+)$", rest)
    if m:
        return f"{side}.mid.attn_1.{_sub(m.group(1), _VAE_ATTN)}"
    return f"{side}.{rest}"  # conv_in, conv_out, norm_out


def _sub(tail: str, table: dict[str, str]) -> str:
    for a, b in table.items():
        if tail.startswith(a):
            return b + tail[len(a):]
    return tail


def is_attention_projection(comfy_key: str) -> bool:
    """The mid-block attention projections: 1x1x1 convolutions in ComfyUI's file, linears in diffusers'."""
    return bool(re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", comfy_key))


def vae_config_from_comfy(shapes: dict[str, tuple[int, ...]], source: str) -> dict:
    """AutoencoderKLHunyuanVideo config of a file in ComfyUI's LDM layout: widths, depth and latent channels from the
    shapes; compression (8x spatial, 4x temporal with four levels) is diffusers' rule for that depth."""
    try:
        levels = count_blocks(shapes, "encoder.down.")
        widths = tuple(shapes[f"encoder.down.{i}.block.0.conv1.conv.weight"][0] for i in range(levels))
        cfg = dict(in_channels=shapes["encoder.conv_in.conv.weight"][1],
                   out_channels=shapes["decoder.conv_out.conv.weight"][0],
                   latent_channels=shapes["decoder.conv_in.conv.weight"][1], block_out_channels=widths,
                   layers_per_block=count_blocks(shapes, "encoder.down.0.block."),
                   down_block_types=("HunyuanVideoDownBlock3D",) * levels,
                   up_block_types=("HunyuanVideoUpBlock3D",) * levels)
    except KeyError as e:
        raise ModelFileError(f"{source}: not a HunyuanVideo VAE (missing {e.args[0]})") from None
    if len(shapes["decoder.conv_in.conv.weight"]) != 5:
        raise ModelFileError(f"{source}: a 2-D VAE; HunyuanVideo needs its 3-D video VAE (hunyuan_video_vae_bf16)")
    return cfg
