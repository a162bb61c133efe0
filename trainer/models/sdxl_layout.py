"""SDXL in two layouts: the original (LDM / SGM, ComfyUI `checkpoints` and `diffusion_models`) and diffusers'.

One module table drives everything that crosses the two: loading a single-file UNet into diffusers'
UNet2DConditionModel, writing one back, and naming trainable layers by ComfyUI's keys. Inside a
spatial transformer the names agree (`transformer_blocks.0.attn1.to_q`), so a transformer is one
subtree entry; resnets rename their leaves (`in_layers.2` -> `conv1`).

The UNet config comes from the checkpoint's shapes. Two things are not in the shapes and follow
SDXL's original config (as ComfyUI's does): attention heads of 64 channels (`num_head_channels: 64`)
and 256 channels per added time id (`adm_in_channels = pooled + 6 * 256`).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import ModelFileError

UNET_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."
VAE_PREFIX = "first_stage_model."

HEAD_CHANNELS = 64  # SDXL's num_head_channels
TIME_ID_CHANNELS = 256  # SDXL's addition_time_embed_dim
NUM_TIME_IDS = 6  # (orig_h, orig_w, crop_top, crop_left, target_h, target_w)

RESNET_LEAVES = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
)


def _count(keys, pattern: str) -> int:
    n = 0
    while any(k.startswith(pattern.format(n)) for k in keys):
        n += 1
    return n


def heads_for(width: int) -> int:
    return max(1, width // HEAD_CHANNELS)


def unet_config_from_ldm(shapes: dict[str, tuple[int, ...]], source: str) -> dict:
    """UNet2DConditionModel config from the shapes of an LDM-layout SDXL UNet (prefix removed)."""

    def need(key: str) -> tuple[int, ...]:
        try:
            return shapes[key]
        except KeyError:
            raise ModelFileError(f"{source}: not a complete SDXL UNet (missing {key})") from None

    conv_in = need("input_blocks.0.0.weight")
    adm_in = need("label_emb.0.0.weight")[1]
    time_dim = need("time_embed.0.weight")[0]
    # walk the input blocks: resnets (+ a spatial transformer) per level, a downsampler between levels
    levels: list[list[tuple[int, int]]] = [[]]  # per level: (width, transformer depth) of each resnet
    n_in = _count(shapes, "input_blocks.{}.")
    for k in range(1, n_in):
        if f"input_blocks.{k}.0.op.weight" in shapes:
            levels.append([])
            continue
        width = need(f"input_blocks.{k}.0.out_layers.3.weight")[0]
        depth = _count(shapes, f"input_blocks.{k}.1.transformer_blocks.{{}}.")
        levels[-1].append((width, depth))
    if not levels[-1]:
        raise ModelFileError(f"{source}: SDXL UNet ends in a downsampler; not a UNet this trainer knows")
    layers = len(levels[0])
    widths, depths = [], []
    for i, lv in enumerate(levels):
        ws, ds = {w for w, _ in lv}, {d for _, d in lv}
        if len(lv) != layers or len(ws) != 1 or len(ds) != 1:
            raise ModelFileError(f"{source}: UNet level {i} has uneven blocks {lv}; not supported")
        widths.append(ws.pop())
        depths.append(ds.pop())
    mid_depth = _count(shapes, "middle_block.1.transformer_blocks.{}.")
    if mid_depth == 0:
        raise ModelFileError(f"{source}: SDXL UNet without a middle transformer is not supported")
    if depths[-1] not in (0, mid_depth):
        raise ModelFileError(f"{source}: middle depth {mid_depth} differs from the last level's {depths[-1]}")
    n_out = _count(shapes, "output_blocks.{}.")
    if n_out != len(levels) * (layers + 1):
        raise ModelFileError(f"{source}: {n_out} output blocks for {len(levels)} levels of {layers}; not an SDXL UNet")
    first_attn = next((f"input_blocks.{k}.1" for k in range(1, n_in) if f"input_blocks.{k}.1.proj_in.weight" in shapes), None)
    if first_attn is None:
        raise ModelFileError(f"{source}: UNet without cross-attention; not SDXL")
    context = need(f"{first_attn}.transformer_blocks.0.attn2.to_k.weight")[1]
    linear_proj = len(need(f"{first_attn}.proj_in.weight")) == 2
    pooled = adm_in - NUM_TIME_IDS * TIME_ID_CHANNELS
    if pooled <= 0:
        raise ModelFileError(f"{source}: label_emb input {adm_in} is too small for SDXL's 6 x 256 time ids")
    ff = need(f"{first_attn}.transformer_blocks.0.ff.net.0.proj.weight")
    if ff[0] != 8 * ff[1]:
        raise ModelFileError(f"{source}: feed-forward width {ff[0] // 2} is not 4x {ff[1]}; not SDXL's transformer")
    for w, d in zip(widths, depths):
        if d and w % heads_for(w):
            raise ModelFileError(f"{source}: width {w} does not split into {HEAD_CHANNELS}-channel heads")
        if w % 32:
            raise ModelFileError(f"{source}: UNet width {w} is not a multiple of 32 (group norm)")
    cfg = dict(
        sample_size=128,
        in_channels=conv_in[1],
        out_channels=need("out.2.weight")[0],
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        up_block_types=["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)],
        block_out_channels=widths,
        layers_per_block=layers,
        cross_attention_dim=context,
        # diffusers' `attention_head_dim` of UNet2DConditionModel is the number of heads
        attention_head_dim=[heads_for(w) for w in widths],
        transformer_layers_per_block=[d or (mid_depth if i == len(depths) - 1 else 1) for i, d in enumerate(depths)],
        use_linear_projection=linear_proj,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_ID_CHANNELS,
        projection_class_embeddings_input_dim=adm_in,
        norm_num_groups=32,
    )
    if time_dim != 4 * widths[0]:
        cfg["time_embedding_dim"] = time_dim
    if "encoder_hid_proj.weight" in shapes:
        # a text projection in front of every cross-attention (Kolors: ChatGLM's 4096 -> 2048)
        proj = need("encoder_hid_proj.weight")
        if proj[0] != context:
            raise ModelFileError(f"{source}: encoder_hid_proj gives {proj[0]} channels, the cross-attention takes {context}")
        cfg.update(encoder_hid_dim=proj[1], encoder_hid_dim_type="text_proj")
    if conv_in[0] != widths[0]:
        raise ModelFileError(f"{source}: conv_in width {conv_in[0]} differs from the first level's {widths[0]}")
    return cfg


def _levels(cfg) -> tuple[list[int], list[bool], int, bool]:
    get = cfg.get if isinstance(cfg, dict) else lambda k, default=None: getattr(cfg, k, default)
    widths = list(get("block_out_channels"))
    attn = [t.startswith("CrossAttn") for t in get("down_block_types")]
    return widths, attn, int(get("layers_per_block")), get("encoder_hid_dim") is not None


def module_map(cfg) -> dict[str, str]:
    """LDM module path -> diffusers module path, for every module that holds weights (transformers whole)."""
    widths, attn, layers, text_proj = _levels(cfg)
    m: dict[str, str] = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "label_emb.0.0": "add_embedding.linear_1",
        "label_emb.0.2": "add_embedding.linear_2",
        "input_blocks.0.0": "conv_in",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
    }
    if text_proj:
        m["encoder_hid_proj"] = "encoder_hid_proj"  # the same name in both layouts (ComfyUI-Kolors-MZ's UNet)

    def resnet(ldm: str, dif: str) -> None:
        for a, b in RESNET_LEAVES:
            m[f"{ldm}.{a}"] = f"{dif}.{b}"

    n = len(widths)
    k = 1
    for i in range(n):
        for j in range(layers):
            resnet(f"input_blocks.{k}.0", f"down_blocks.{i}.resnets.{j}")
            if attn[i]:
                m[f"input_blocks.{k}.1"] = f"down_blocks.{i}.attentions.{j}"
            k += 1
        if i < n - 1:
            m[f"input_blocks.{k}.0.op"] = f"down_blocks.{i}.downsamplers.0.conv"
            k += 1
    resnet("middle_block.0", "mid_block.resnets.0")
    m["middle_block.1"] = "mid_block.attentions.0"
    resnet("middle_block.2", "mid_block.resnets.1")
    k = 0
    for u, i in enumerate(reversed(range(n))):
        for j in range(layers + 1):
            resnet(f"output_blocks.{k}.0", f"up_blocks.{u}.resnets.{j}")
            if attn[i]:
                m[f"output_blocks.{k}.1"] = f"up_blocks.{u}.attentions.{j}"
            if j == layers and i > 0:
                m[f"output_blocks.{k}.{2 if attn[i] else 1}.conv"] = f"up_blocks.{u}.upsamplers.0.conv"
            k += 1
    return m


def _rename(key: str, table: dict[str, str]) -> str | None:
    """`key` (a module path or a tensor name) with its longest prefix found in `table` replaced, or None."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        head = ".".join(parts[:n])
        if head in table:
            return ".".join([table[head], *parts[n:]])
    return None


def ldm_names(cfg) -> Callable[[str], str | None]:
    """diffusers UNet module path -> its LDM (ComfyUI) module path, or None."""
    inv = {v: k for k, v in module_map(cfg).items()}
    return lambda diffusers_module: _rename(diffusers_module, inv)


def ldm_to_diffusers(sd: dict[str, torch.Tensor], cfg, model_keys: set[str], source: str) -> dict[str, torch.Tensor]:
    table = module_map(cfg)
    out, unknown = {}, []
    for k, v in sd.items():
        nk = _rename(k, table)
        if nk is None or nk not in model_keys:
            unknown.append(k)
            continue
        out[nk] = v
    missing = sorted(model_keys - set(out))
    if missing:
        raise ModelFileError(f"{source}: incomplete SDXL UNet, missing {len(missing)} tensors (e.g. {missing[0]})")
    if unknown:
        raise ModelFileError(f"{source}: {len(unknown)} UNet tensors this SDXL layout does not have (e.g. {unknown[0]})")
    return out


def unet_config_from_diffusers(shapes: dict[str, tuple[int, ...]], source: str) -> dict:
    """UNet2DConditionModel config from the shapes of a diffusers-layout SDXL UNet file (a pipeline's
    `unet/diffusion_pytorch_model.safetensors`, without its config.json): the levels are read from diffusers'
    names, the shapes renamed to the LDM layout by the same module table, and the config read from those."""
    levels = _count(shapes, "down_blocks.{}.")
    try:
        outline = dict(
            block_out_channels=[shapes[f"down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(levels)],
            down_block_types=["CrossAttnDownBlock2D" if f"down_blocks.{i}.attentions.0.proj_in.weight" in shapes
                              else "DownBlock2D" for i in range(levels)],
            layers_per_block=_count(shapes, "down_blocks.0.resnets.{}."),
            encoder_hid_dim=shapes["encoder_hid_proj.weight"][1] if "encoder_hid_proj.weight" in shapes else None,
        )
    except KeyError as e:
        raise ModelFileError(f"{source}: not a complete SDXL-layout UNet (missing {e.args[0]})") from None
    if not levels:
        raise ModelFileError(f"{source}: no down_blocks; not a diffusers-layout UNet")
    inv = {v: k for k, v in module_map(outline).items()}
    ldm_shapes = {}
    for k, v in shapes.items():
        nk = _rename(k, inv)
        if nk is None:
            raise ModelFileError(f"{source}: UNet tensor {k} is not part of an SDXL-layout UNet")
        ldm_shapes[nk] = v
    return unet_config_from_ldm(ldm_shapes, source)


def diffusers_to_ldm(sd: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    inv = {v: k for k, v in module_map(cfg).items()}
    out = {}
    for k, v in sd.items():
        nk = _rename(k, inv)
        if nk is None:
            raise KeyError(f"no LDM name for {k}")
        out[nk] = v
    return out


# --- OpenCLIP (CLIP-G in full SDXL checkpoints) <-> transformers -------------------------------

def is_open_clip(keys, prefix: str = "") -> bool:
    return f"{prefix}transformer.resblocks.0.attn.in_proj_weight" in keys


def open_clip_to_transformers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP text tower (prefix removed) -> CLIPTextModelWithProjection keys, by diffusers' converter."""
    from types import SimpleNamespace

    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    width = sd["token_embedding.weight"].shape[1]
    stub = SimpleNamespace(config=SimpleNamespace(hidden_size=width))
    out = convert_open_clip_checkpoint(stub, sd, prefix="")
    return {k: v for k, v in out.items() if not k.endswith("position_ids")}


def transformers_to_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection state dict -> the OpenCLIP layout of SDXL checkpoints (for writing files)."""
    sd = {(k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v for k, v in sd.items()}
    out = {
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].T.contiguous(),
    }
    n = _count(sd, "text_model.encoder.layers.{}.")
    for i in range(n):
        s, o = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for t in ("weight", "bias"):
            out[f"{o}attn.in_proj_{t}"] = torch.cat([sd[f"{s}self_attn.{p}_proj.{t}"] for p in "qkv"], dim=0)
            out[f"{o}attn.out_proj.{t}"] = sd[f"{s}self_attn.out_proj.{t}"]
            out[f"{o}ln_1.{t}"] = sd[f"{s}layer_norm1.{t}"]
            out[f"{o}ln_2.{t}"] = sd[f"{s}layer_norm2.{t}"]
            out[f"{o}mlp.c_fc.{t}"] = sd[f"{s}mlp.fc1.{t}"]
            out[f"{o}mlp.c_proj.{t}"] = sd[f"{s}mlp.fc2.{t}"]
    return out
