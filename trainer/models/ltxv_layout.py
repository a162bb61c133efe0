"""LTX-Video 0.9.x in two layouts: the original (Lightricks' single checkpoints, as ComfyUI loads them from
`models/checkpoints`: `model.diffusion_model.*` and `vae.*`, a `config` JSON in the file's metadata) and diffusers'.

The transformer differs from diffusers' by a few names only. The VAE is described in the original by a list of
blocks (`res_x`, `compress_all_res` ...: the metadata's `vae` config, or, without one, the layout ComfyUI guesses
from the shapes), which this module turns into an AutoencoderKLLTXVideo config and a key table; a layout that
class cannot express is refused by name. LoRA targets are ComfyUI's keys (`diffusion_model.transformer_blocks.0.
attn1.to_q`), which are the original names; ComfyUI does not accept diffusers' `transformer.` prefix for LTX-Video.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from ..errors import ModelFileError
from .layout import LinearMap, ParamMap, count_blocks, join_original, split_original

COMFY_HEADS = 32  # ComfyUI assumes 32 heads unless the file's metadata says otherwise
LINEAR_KEYS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
               "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


# --- the transformer ---------------------------------------------------------------------------------------

def transformer_layout(num_layers: int) -> tuple[list[LinearMap], list[ParamMap]]:
    lin = [LinearMap("patchify_proj", ("proj_in",)), LinearMap("proj_out", ("proj_out",)),
           LinearMap("adaln_single.emb.timestep_embedder.linear_1", ("time_embed.emb.timestep_embedder.linear_1",)),
           LinearMap("adaln_single.emb.timestep_embedder.linear_2", ("time_embed.emb.timestep_embedder.linear_2",)),
           LinearMap("adaln_single.linear", ("time_embed.linear",)),
           LinearMap("caption_projection.linear_1", ("caption_projection.linear_1",)),
           LinearMap("caption_projection.linear_2", ("caption_projection.linear_2",))]
    par = [ParamMap("scale_shift_table", "scale_shift_table")]
    for i in range(num_layers):
        b = f"transformer_blocks.{i}"
        lin += [LinearMap(f"{b}.{k}", (f"{b}.{k}",), True) for k in LINEAR_KEYS]
        par += [ParamMap(f"{b}.{a}.{o}.weight", f"{b}.{a}.{d}.weight")
                for a in ("attn1", "attn2") for o, d in (("q_norm", "norm_q"), ("k_norm", "norm_k"))]
        par.append(ParamMap(f"{b}.scale_shift_table", f"{b}.scale_shift_table"))
    return lin, par


@dataclass(frozen=True)
class Positions:
    """What ComfyUI's LTXV model reads from the file's config beyond the shapes: how token positions and the
    timestep are scaled (LTX-Video 0.9.5 and later count the first frame causally)."""

    causal: bool = False
    max_pos: tuple[float, float, float] = (20.0, 2048.0, 2048.0)
    theta: float = 10000.0
    timestep_multiplier: float = 1000.0
    vae_factors: tuple[int, int, int] = (8, 32, 32)


def file_config(metadata: dict[str, str], source: str) -> dict:
    """The `config` JSON a Lightricks file carries in its metadata ({"transformer": ..., "vae": ...}), or {}."""
    raw = metadata.get("config")
    if not raw:
        return {}
    try:
        cfg = json.loads(raw)
    except ValueError as e:
        raise ModelFileError(f"{source}: the `config` in the file's metadata is not JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelFileError(f"{source}: the `config` in the file's metadata is not a JSON object")
    return cfg


def transformer_config(shapes: dict[str, tuple[int, ...]], meta: dict, source: str) -> tuple[dict, Positions]:
    """LTXVideoTransformer3DModel config from the original layout's shapes and the metadata's `transformer`
    section (heads: the metadata's, else ComfyUI's 32), and the position settings ComfyUI reads from it."""
    try:
        inner, in_ch = shapes["patchify_proj.weight"]
        cfg = dict(in_channels=in_ch, out_channels=shapes["proj_out.weight"][0],
                   caption_channels=shapes["caption_projection.linear_1.weight"][1],
                   cross_attention_dim=shapes["transformer_blocks.0.attn2.to_k.weight"][1],
                   num_layers=count_blocks(shapes, "transformer_blocks."), patch_size=1, patch_size_t=1,
                   activation_fn="gelu-approximate", qk_norm="rms_norm_across_heads", norm_elementwise_affine=False,
                   norm_eps=1e-6, attention_bias=True, attention_out_bias=True)
    except KeyError as e:
        raise ModelFileError(f"{source}: not a complete LTX-Video checkpoint (missing {e.args[0]})") from None
    heads = int(meta.get("num_attention_heads", COMFY_HEADS))
    if heads <= 0 or inner % heads:
        raise ModelFileError(f"{source}: width {inner} does not split into {heads} attention heads")
    if "attention_head_dim" in meta and int(meta["attention_head_dim"]) * heads != inner:
        raise ModelFileError(f"{source}: the metadata's {heads} heads of {meta['attention_head_dim']} do not make the"
                             f" checkpoint's width {inner}")
    if meta.get("rope_type", "interleaved") != "interleaved" or meta.get("use_middle_indices_grid"):
        raise ModelFileError(f"{source}: an LTX-2 style position embedding (rope_type {meta.get('rope_type')!r});"
                             " this trainer reads LTX-Video 0.9.x checkpoints")
    cfg.update(num_attention_heads=heads, attention_head_dim=inner // heads)
    pos = Positions(causal=bool(meta.get("causal_temporal_positioning", False)),
                    max_pos=tuple(float(v) for v in meta.get("positional_embedding_max_pos", (20, 2048, 2048))),
                    theta=float(meta.get("positional_embedding_theta", 10000.0)),
                    timestep_multiplier=float(meta.get("timestep_scale_multiplier", 1000.0)),
                    vae_factors=tuple(int(v) for v in meta.get("vae_scale_factors", (8, 32, 32))))
    return cfg, pos


def original_to_diffusers(sd: dict[str, torch.Tensor], model_shapes: dict, num_layers: int, source: str) -> dict:
    lin, par = transformer_layout(num_layers)
    return split_original(sd, lin, par, model_shapes, source, "LTX-Video")


def diffusers_to_original(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    lin, par = transformer_layout(num_layers)
    return join_original(sd, lin, par)


def transformer_metadata(cfg: dict, pos: Positions = Positions()) -> dict:
    """The metadata `transformer` section of a file with this diffusers config, in the original's names (what
    ComfyUI merges into its detected config)."""
    return {"_class_name": "Transformer3DModel", "num_attention_heads": cfg["num_attention_heads"],
            "attention_head_dim": cfg["attention_head_dim"], "in_channels": cfg["in_channels"],
            "out_channels": cfg["out_channels"], "num_layers": cfg["num_layers"],
            "cross_attention_dim": cfg["cross_attention_dim"], "caption_channels": cfg["caption_channels"],
            "causal_temporal_positioning": pos.causal, "positional_embedding_max_pos": list(pos.max_pos),
            "positional_embedding_theta": pos.theta, "timestep_scale_multiplier": pos.timestep_multiplier}


# --- the VAE -----------------------------------------------------------------------------------------------

# The layouts ComfyUI assumes for a VAE without a `config` in its metadata (0.9.0; 0.9.1; 0.9.5 and later),
# as (block, parameters) lists in the original's encoder order.
_ENC_090 = [("res_x", 4), ("compress_all", 1), ("res_x_y", 1), ("res_x", 3), ("compress_all", 1), ("res_x_y", 1),
            ("res_x", 3), ("compress_all", 1), ("res_x", 3), ("res_x", 4)]
_COMMON = {"dims": 3, "in_channels": 3, "out_channels": 3, "latent_channels": 128, "norm_layer": "pixel_norm",
           "patch_size": 4, "latent_log_var": "uniform", "causal_decoder": False}
GUESSED_VAES = {
    "0.9.0": {**_COMMON, "blocks": _ENC_090},
    "0.9.1": {**_COMMON, "timestep_conditioning": True,
              "encoder_blocks": [(n, {"num_layers": p} if n == "res_x" else ({} if n == "compress_all" else p))
                                 for n, p in _ENC_090],
              "decoder_blocks": [("res_x", {"num_layers": 5, "inject_noise": True}),
                                 ("compress_all", {"residual": True, "multiplier": 2}),
                                 ("res_x", {"num_layers": 6, "inject_noise": True}),
                                 ("compress_all", {"residual": True, "multiplier": 2}),
                                 ("res_x", {"num_layers": 7, "inject_noise": True}),
                                 ("compress_all", {"residual": True, "multiplier": 2}),
                                 ("res_x", {"num_layers": 8, "inject_noise": False})]},
    "0.9.5": {**_COMMON, "timestep_conditioning": True,
              "encoder_blocks": [("res_x", {"num_layers": 4}), ("compress_space_res", {"multiplier": 2}),
                                 ("res_x", {"num_layers": 6}), ("compress_time_res", {"multiplier": 2}),
                                 ("res_x", {"num_layers": 6}), ("compress_all_res", {"multiplier": 2}),
                                 ("res_x", {"num_layers": 2}), ("compress_all_res", {"multiplier": 2}),
                                 ("res_x", {"num_layers": 2})],
              "decoder_blocks": [("res_x", {"num_layers": 5, "inject_noise": False}),
                                 ("compress_all", {"residual": True, "multiplier": 2})] * 3
              + [("res_x", {"num_layers": 5, "inject_noise": False})]},
}

# encoder downsamplers diffusers' class can express: block -> (downsample_type, stride)
_DOWN = {"compress_all": ("conv", (2, 2, 2)), "compress_all_res": ("spatiotemporal", (2, 2, 2)),
         "compress_space_res": ("spatial", (1, 2, 2)), "compress_time_res": ("temporal", (2, 1, 1))}


def guess_vae_version(shapes: dict[str, tuple[int, ...]]) -> str:
    """As ComfyUI tells the LTX VAEs apart without metadata: the decoder's first width, then a 0.9.5 key."""
    width = shapes["decoder.up_blocks.0.res_blocks.0.conv1.conv.weight"][0]
    if width == 1024:
        return "0.9.5" if "encoder.down_blocks.1.conv.conv.bias" in shapes else "0.9.1"
    return "0.9.0"


def _params(p) -> dict:
    return {"num_layers": p} if isinstance(p, int) else dict(p or {})


@dataclass
class _EncStage:
    layers: int = 0
    res: int | None = None  # index of its res_x in the original list
    down: tuple[int, str, tuple[int, int, int], int] | None = None  # (index, type, stride, channel multiplier)
    conv_out: tuple[int, int] | None = None  # res_x_y: (index, channel multiplier)


@dataclass
class _DecStage:
    layers: int = 0
    inject: bool = False
    res: int | None = None
    up: tuple[int, bool, int] | None = None  # compress_all: (index, residual, channel divisor)
    conv_in: tuple[int, int, bool] | None = None  # res_x_y: (index, channel divisor, inject_noise)


@dataclass
class VaeLayout:
    """An original LTX VAE layout as diffusers sees it: the AutoencoderKLLTXVideo config, the key table, and the
    padding ComfyUI's convolutions use (its decoder pads by reflection unless the config says otherwise)."""

    config: dict
    prefixes: dict[str, str] = field(default_factory=dict)  # diffusers key prefix -> original key prefix
    encoder_padding: str = "zeros"
    decoder_padding: str = "reflect"

    def to_original(self, key: str) -> str:
        exact = {"latents_mean": "per_channel_statistics.mean-of-means",
                 "latents_std": "per_channel_statistics.std-of-means",
                 "decoder.scale_shift_table": "decoder.last_scale_shift_table"}
        if key in exact:
            return exact[key]
        best = max((p for p in self.prefixes if key.startswith(p)), key=len, default=None)
        if best is None:
            raise KeyError(key)
        out = self.prefixes[best] + key[len(best):]
        # resnets: diffusers' shortcut is a causal conv and its norm3 a plain LayerNorm
        return out.replace(".conv_shortcut.conv.", ".conv_shortcut.").replace(".norm3.", ".norm3.norm.")


def _unsupported(source: str, what: str) -> ModelFileError:
    return ModelFileError(f"{source}: an LTX VAE layout diffusers' AutoencoderKLLTXVideo cannot express ({what})")


def _encoder(blocks: list, base: int, source: str) -> tuple[list[_EncStage], int, int, int]:
    """Stages (res_x, then a downsampler, then a channel-changing res_x_y), the mid block's index and layers,
    and the channel count after the stages."""
    items = [(n, _params(p)) for n, p in blocks]
    if not items or items[-1][0] != "res_x":
        raise _unsupported(source, "the encoder does not end in res_x")
    stages: list[_EncStage] = []
    for k, (name, p) in enumerate(items[:-1]):
        cur = stages[-1] if stages else None
        if name == "res_x":
            if cur is None or cur.res is not None or cur.down or cur.conv_out:
                cur = _EncStage()
                stages.append(cur)
            cur.res, cur.layers = k, int(p["num_layers"])
        elif name in _DOWN:
            if cur is None or cur.down or cur.conv_out:
                cur = _EncStage()
                stages.append(cur)
            kind, stride = _DOWN[name]
            cur.down = (k, kind, stride, int(p.get("multiplier", 2)) if name.endswith("_res") else 1)
        elif name == "res_x_y":
            if cur is None or cur.conv_out:
                cur = _EncStage()
                stages.append(cur)
            cur.conv_out = (k, int(p.get("multiplier", 2)))
        else:
            raise _unsupported(source, f"encoder block {name!r}")
    return stages, len(items) - 1, int(items[-1][1]["num_layers"]), base


def _decoder(blocks: list, base: int, source: str) -> tuple[list[_DecStage], int, bool, int]:
    """Stages in the order they run (the original lists them encoder-first): a channel-changing res_x_y, an
    upsampler, then res_x, which ends the stage. Returns the stages, the mid block's layers and noise, and the
    decoder's input width (base times every multiplier, as ComfyUI computes it)."""
    items = [(n, _params(p)) for n, p in reversed(blocks)]
    if not items or items[0][0] != "res_x":
        raise _unsupported(source, "the decoder does not start with res_x")
    width = base
    for name, p in items:
        if name == "res_x_y":
            width *= int(p.get("multiplier", 2))
        elif name == "compress_all":
            width *= int(p.get("multiplier", 1))
    stages: list[_DecStage] = []
    for k, (name, p) in enumerate(items[1:], start=1):
        cur = stages[-1] if stages else None
        if name == "res_x_y":
            if cur is None or cur.conv_in or cur.up or cur.res is not None:
                cur = _DecStage()
                stages.append(cur)
            cur.conv_in = (k, int(p.get("multiplier", 2)), bool(p.get("inject_noise", False)))
        elif name == "compress_all":
            if cur is None or cur.up or cur.res is not None:
                cur = _DecStage()
                stages.append(cur)
            cur.up = (k, bool(p.get("residual", False)), int(p.get("multiplier", 1)))
        elif name == "res_x":
            if cur is None or cur.res is not None:
                cur = _DecStage()
                stages.append(cur)
            cur.res, cur.layers, cur.inject = k, int(p["num_layers"]), bool(p.get("inject_noise", False))
        else:
            raise _unsupported(source, f"decoder block {name!r}")
    return stages, int(items[0][1]["num_layers"]), bool(items[0][1].get("inject_noise", False)), width


def vae_layout(orig: dict, base: int, source: str) -> VaeLayout:
    """The diffusers config and key table of an original LTX VAE config (the metadata's `vae` section, or one
    of GUESSED_VAES); `base`: the encoder's first width (ComfyUI always builds 128)."""
    if orig.get("dims", 3) != 3 or orig.get("norm_layer", "group_norm") != "pixel_norm":
        raise _unsupported(source, f"dims {orig.get('dims')}, norm {orig.get('norm_layer')!r}")
    log_var = orig.get("latent_log_var", "per_channel" if orig.get("double_z", True) else "none")
    if log_var != "uniform":
        raise _unsupported(source, f"latent_log_var {log_var!r}")
    enc_blocks = orig.get("encoder_blocks", orig.get("blocks"))
    dec_blocks = orig.get("decoder_blocks", orig.get("blocks"))
    if not enc_blocks or not dec_blocks:
        raise ModelFileError(f"{source}: the VAE config names no blocks")
    enc, mid_k, mid_layers, ch = _encoder(enc_blocks, base, source)
    v095 = any(s.down and s.down[1] != "conv" for s in enc)
    outs = []
    for s in enc:
        if v095 and (s.conv_out or (s.down and s.down[1] == "conv")):
            raise _unsupported(source, "plain and space-to-depth downsamplers mixed in one encoder")
        ch *= (s.down[3] if s.down else 1) * (s.conv_out[1] if s.conv_out else 1)
        outs.append(ch)
    if v095:
        block_out = [base, *outs]
    else:
        if len(outs) > 1 and outs[-1] != outs[-2] or len(outs) == 1 and outs[0] != base:
            raise _unsupported(source, "the last encoder stage changes the width")
        block_out = [base, *outs[:-1]]
    spatial = int(orig.get("patch_size", 1))
    temporal = 1
    for s in enc:
        if s.down:
            temporal *= s.down[2][0]
            spatial *= s.down[2][1]
    dec, dmid_layers, dmid_inject, width = _decoder(dec_blocks, base, source)
    rev_out, ch = [], width
    for i, s in enumerate(dec):
        f = s.up[2] if s.up else 1
        if s.conv_in:
            if i == 0 or f != 1:
                raise _unsupported(source, "a width change in the decoder's first stage or beside a channel-reducing"
                                           " upsampler")
            ch //= s.conv_in[1]
        ch //= f
        rev_out.append(ch * f)
    timestep = bool(orig.get("timestep_conditioning", False))
    cfg = dict(
        in_channels=int(orig.get("in_channels", 3)), out_channels=int(orig.get("out_channels", 3)),
        latent_channels=int(orig.get("latent_channels", 128)), block_out_channels=tuple(block_out),
        down_block_types=tuple(("LTXVideo095DownBlock3D" if v095 else "LTXVideoDownBlock3D") for _ in enc),
        layers_per_block=tuple([s.layers for s in enc] + [mid_layers]),
        spatio_temporal_scaling=tuple(s.down is not None for s in enc),
        downsample_type=tuple(s.down[1] if s.down else "conv" for s in enc),
        decoder_block_out_channels=tuple(reversed(rev_out)),
        decoder_layers_per_block=tuple(reversed([dmid_layers] + [s.layers for s in dec])),
        decoder_spatio_temporal_scaling=tuple(reversed([s.up is not None for s in dec])),
        decoder_inject_noise=tuple(reversed([dmid_inject] + [s.inject for s in dec])),
        upsample_residual=tuple(reversed([bool(s.up and s.up[1]) for s in dec])),
        upsample_factor=tuple(reversed([s.up[2] if s.up else 1 for s in dec])),
        timestep_conditioning=timestep, patch_size=int(orig.get("patch_size", 1)), patch_size_t=1,
        resnet_norm_eps=1e-6, scaling_factor=1.0, encoder_causal=True,
        decoder_causal=bool(orig.get("causal_decoder", False)),
        spatial_compression_ratio=spatial, temporal_compression_ratio=temporal,
    )
    p: dict[str, str] = {"encoder.conv_in.": "encoder.conv_in.", "encoder.conv_out.": "encoder.conv_out.",
                         "decoder.conv_in.": "decoder.conv_in.", "decoder.conv_out.": "decoder.conv_out.",
                         "decoder.timestep_scale_multiplier": "decoder.timestep_scale_multiplier",
                         "decoder.time_embedder.": "decoder.last_time_embedder.",
                         "encoder.mid_block.resnets.": f"encoder.down_blocks.{mid_k}.res_blocks.",
                         "decoder.mid_block.resnets.": "decoder.up_blocks.0.res_blocks.",
                         "decoder.mid_block.time_embedder.": "decoder.up_blocks.0.time_embedder."}
    for i, s in enumerate(enc):
        if s.res is not None:
            p[f"encoder.down_blocks.{i}.resnets."] = f"encoder.down_blocks.{s.res}.res_blocks."
        if s.down:
            p[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down_blocks.{s.down[0]}."
        if s.conv_out:
            p[f"encoder.down_blocks.{i}.conv_out."] = f"encoder.down_blocks.{s.conv_out[0]}."
    for i, s in enumerate(dec):
        if s.conv_in:
            p[f"decoder.up_blocks.{i}.conv_in."] = f"decoder.up_blocks.{s.conv_in[0]}."
        if s.up:
            p[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up_blocks.{s.up[0]}."
        if s.res is not None:
            p[f"decoder.up_blocks.{i}.resnets."] = f"decoder.up_blocks.{s.res}.res_blocks."
            p[f"decoder.up_blocks.{i}.time_embedder."] = f"decoder.up_blocks.{s.res}.time_embedder."
    pad = orig.get("spatial_padding_mode")
    return VaeLayout(cfg, p, pad or "zeros", pad or "reflect")


def vae_original_config(shapes: dict[str, tuple[int, ...]], meta: dict) -> dict:
    """The original VAE config: the metadata's `vae` section, else the layout ComfyUI guesses from the shapes."""
    return dict(meta) if meta else dict(GUESSED_VAES[guess_vae_version(shapes)])


def per_channel_statistics(mean: torch.Tensor, std: torch.Tensor) -> dict[str, torch.Tensor]:
    """The statistics buffers an original LTX VAE carries (ComfyUI's loader expects all five; it reads two)."""
    n = mean.shape[0]
    return {"per_channel_statistics.mean-of-means": mean, "per_channel_statistics.std-of-means": std,
            "per_channel_statistics.mean-of-stds": torch.ones(n, dtype=mean.dtype),
            "per_channel_statistics.mean-of-stds_over_std-of-means": (1 / std).to(mean.dtype),
            "per_channel_statistics.channel": torch.arange(n, dtype=mean.dtype)}
