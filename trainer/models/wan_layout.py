"""Wan 2.1 in two layouts: the original (Wan-AI / ComfyUI `diffusion_models`, `vae`) and diffusers', as layout
tables (layout.py). Targets are named by ComfyUI's keys (`diffusion_model.blocks.3.self_attn.q`), which are the
original names: ComfyUI has no diffusers-name mapping for Wan, so files must use these."""

from __future__ import annotations

import re

import torch

from ..errors import ModelFileError
from .layout import LinearMap, ParamMap, count_blocks, join_original, split_original

HEAD_DIM = 128  # Wan's attention heads (ComfyUI derives the head count as dim / 128)


def _block(o: str, d: str, i2v: bool) -> tuple[list[LinearMap], list[ParamMap]]:
    """One transformer block: original prefix `o`, diffusers prefix `d`."""
    lin = [LinearMap(f"{o}.self_attn.{a}", (f"{d}.attn1.{b}",), True)
           for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))]
    lin += [LinearMap(f"{o}.cross_attn.{a}", (f"{d}.attn2.{b}",), True)
            for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))]
    if i2v:
        lin += [LinearMap(f"{o}.cross_attn.k_img", (f"{d}.attn2.add_k_proj",), True),
                LinearMap(f"{o}.cross_attn.v_img", (f"{d}.attn2.add_v_proj",), True)]
    lin += [LinearMap(f"{o}.ffn.0", (f"{d}.ffn.net.0.proj",), True), LinearMap(f"{o}.ffn.2", (f"{d}.ffn.net.2",), True)]
    par = [ParamMap(f"{o}.self_attn.norm_q.weight", f"{d}.attn1.norm_q.weight"),
           ParamMap(f"{o}.self_attn.norm_k.weight", f"{d}.attn1.norm_k.weight"),
           ParamMap(f"{o}.cross_attn.norm_q.weight", f"{d}.attn2.norm_q.weight"),
           ParamMap(f"{o}.cross_attn.norm_k.weight", f"{d}.attn2.norm_k.weight"),
           # the original's norm3 (cross-attention input, affine) is diffusers' norm2
           ParamMap(f"{o}.norm3.weight", f"{d}.norm2.weight"), ParamMap(f"{o}.norm3.bias", f"{d}.norm2.bias"),
           ParamMap(f"{o}.modulation", f"{d}.scale_shift_table")]
    if i2v:
        par.append(ParamMap(f"{o}.cross_attn.norm_k_img.weight", f"{d}.attn2.norm_added_k.weight"))
    return lin, par


def wan_layout(num_layers: int, i2v: bool, vace_layers: int = 0) -> tuple[list[LinearMap], list[ParamMap]]:
    lin = [
        LinearMap("patch_embedding", ("patch_embedding",)),
        LinearMap("text_embedding.0", ("condition_embedder.text_embedder.linear_1",)),
        LinearMap("text_embedding.2", ("condition_embedder.text_embedder.linear_2",)),
        LinearMap("time_embedding.0", ("condition_embedder.time_embedder.linear_1",)),
        LinearMap("time_embedding.2", ("condition_embedder.time_embedder.linear_2",)),
        LinearMap("time_projection.1", ("condition_embedder.time_proj",)),
        LinearMap("head.head", ("proj_out",)),
    ]
    par = [ParamMap("head.modulation", "scale_shift_table")]
    if i2v:
        lin += [LinearMap("img_emb.proj.1", ("condition_embedder.image_embedder.ff.net.0.proj",)),
                LinearMap("img_emb.proj.3", ("condition_embedder.image_embedder.ff.net.2",))]
        par += [ParamMap(f"img_emb.proj.{a}.{s}", f"condition_embedder.image_embedder.{b}.{s}")
                for a, b in (("0", "norm1"), ("4", "norm2")) for s in ("weight", "bias")]
    for i in range(num_layers):
        bl, bp = _block(f"blocks.{i}", f"blocks.{i}", i2v)
        lin, par = lin + bl, par + bp
    if vace_layers:
        lin.append(LinearMap("vace_patch_embedding", ("vace_patch_embedding",)))
        for i in range(vace_layers):
            bl, bp = _block(f"vace_blocks.{i}", f"vace_blocks.{i}", False)
            if i == 0:
                bl.append(LinearMap("vace_blocks.0.before_proj", ("vace_blocks.0.proj_in",), True))
            bl.append(LinearMap(f"vace_blocks.{i}.after_proj", (f"vace_blocks.{i}.proj_out",), True))
            lin, par = lin + bl, par + bp
    return lin, par


def layout_of(cfg: dict) -> tuple[list[LinearMap], list[ParamMap]]:
    """The table for a diffusers config (a plain dict, or a model's FrozenDict config)."""
    return wan_layout(cfg["num_layers"], cfg.get("image_dim") is not None, len(cfg.get("vace_layers") or []))


def variant_of(shapes: dict[str, tuple[int, ...]]) -> str:
    """As ComfyUI detects it: `vace_patch_embedding` = VACE; `img_emb.proj.0.bias` = I2V; else T2V."""
    if "vace_patch_embedding.weight" in shapes:
        return "vace"
    if "img_emb.proj.0.bias" in shapes:
        return "i2v"
    return "t2v"


def diffusers_config_from_original(shapes: dict[str, tuple[int, ...]], source: str) -> dict:
    """WanTransformer3DModel / WanVACETransformer3DModel config from the original layout's shapes."""
    try:
        dim = shapes["head.modulation"][-1]
        cfg = dict(
            patch_size=(1, 2, 2), num_attention_heads=dim // HEAD_DIM, attention_head_dim=HEAD_DIM,
            in_channels=shapes["patch_embedding.weight"][1], out_channels=shapes["head.head.weight"][0] // 4,
            text_dim=shapes["text_embedding.0.weight"][1], freq_dim=shapes["time_embedding.0.weight"][1],
            ffn_dim=shapes["blocks.0.ffn.0.weight"][0], num_layers=count_blocks(shapes, "blocks."),
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
        )
    except KeyError as e:
        raise ModelFileError(f"{source}: not a complete Wan checkpoint (missing {e.args[0]})") from None
    if dim % HEAD_DIM:
        raise ModelFileError(f"{source}: Wan width {dim} is not a multiple of its 128-wide heads")
    if "img_emb.emb_pos" in shapes:
        raise ModelFileError(f"{source}: a Wan first-last-frame (FLF2V) checkpoint; not supported yet")
    if "img_emb.proj.0.bias" in shapes:
        cfg.update(image_dim=shapes["img_emb.proj.0.bias"][0], added_kv_proj_dim=dim)
    if "vace_patch_embedding.weight" in shapes:
        n = count_blocks(shapes, "vace_blocks.")
        stride = cfg["num_layers"] // n
        cfg.update(vace_in_channels=shapes["vace_patch_embedding.weight"][1], vace_layers=[i * stride for i in range(n)])
    return cfg


def original_to_diffusers(sd: dict[str, torch.Tensor], model_shapes: dict, cfg: dict, source: str) -> dict:
    lin, par = layout_of(cfg)
    return split_original(sd, lin, par, model_shapes, source, "Wan")


def diffusers_to_original(sd: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    lin, par = layout_of(cfg)
    return join_original(sd, lin, par)


# --- the VAE ------------------------------------------------------------------------------------------------

_RESNET = {"norm1.gamma": "residual.0.gamma", "conv1.weight": "residual.2.weight", "conv1.bias": "residual.2.bias",
           "norm2.gamma": "residual.3.gamma", "conv2.weight": "residual.6.weight", "conv2.bias": "residual.6.bias",
           "conv_shortcut.weight": "shortcut.weight", "conv_shortcut.bias": "shortcut.bias"}


def vae_key_to_original(key: str) -> str:
    """A diffusers AutoencoderKLWan key -> the original Wan 2.1 VAE's (what ComfyUI's models/vae file holds)."""
    fixed = {"quant_conv.weight": "conv1.weight", "quant_conv.bias": "conv1.bias",
             "post_quant_conv.weight": "conv2.weight", "post_quant_conv.bias": "conv2.bias"}
    if key in fixed:
        return fixed[key]
    side, rest = key.split(".", 1)
    for d, o in (("conv_in.", "conv1."), ("norm_out.", "head.0."), ("conv_out.", "head.2.")):
        if rest.startswith(d):
            return f"{side}.{o}{rest[len(d):]}"
    m = re.match(r"mid_block\.resnets\.(\d+)\.(.+)$", rest)
    if m:
        return f"{side}.middle.{2 * int(m.group(1))}.{_RESNET[m.group(2)]}"
    m = re.match(r"mid_block\.attentions\.0\.(.+)$", rest)
    if m:
        return f"{side}.middle.1.{m.group(1)}"
    m = re.match(r"down_blocks\.(\d+)\.(.+)$", rest)
    if m:
        return f"{side}.downsamples.{m.group(1)}.{_RESNET.get(m.group(2), m.group(2))}"
    m = re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", rest)
    if m:
        return f"{side}.upsamples.{4 * int(m.group(1)) + int(m.group(2))}.{_RESNET[m.group(3)]}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)$", rest)
    if m:
        return f"{side}.upsamples.{4 * int(m.group(1)) + 3}.{m.group(2)}"
    raise KeyError(key)  # a layout this table does not know: a programming error


def vae_config_from_original(shapes: dict[str, tuple[int, ...]], source: str) -> dict:
    """AutoencoderKLWan config of a Wan 2.1 VAE file: base width and latent channels from the shapes; the
    structure (4 levels x2 widths 1,2,4,4, 2 resnets, temporal downsampling in the last two) is Wan 2.1's."""
    try:
        base = shapes["encoder.conv1.weight"][0]
        z = shapes["decoder.conv1.weight"][1]
    except KeyError as e:
        raise ModelFileError(f"{source}: not a Wan 2.1 VAE (missing {e.args[0]})") from None
    if z != 16:
        raise ModelFileError(f"{source}: a VAE with {z} latent channels; Wan 2.1 models use the 16-channel Wan 2.1"
                             " VAE (wan_2.1_vae.safetensors; Wan 2.2 5B's 48-channel VAE is another family)")
    return dict(base_dim=base, z_dim=z, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                temperal_downsample=[False, True, True])
