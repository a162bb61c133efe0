"""HiDream-I1's checkpoint layout: the transformer config from a file's shapes, and the trainable layers by name.

ComfyUI's module names for HiDream (comfy/ldm/hidream/model.py) are the original repository's, and diffusers'
HiDreamImageTransformer2DModel keeps them too (`double_stream_blocks.N.block.attn1.to_q`,
`...ff_i.experts.K.w1`, `caption_projection.N.linear`): a `diffusion_models` file loads into the diffusers module
as it is, and LoRA keys are `diffusion_model.` + the module path. No renaming table is needed.

What the shapes cannot say is fixed as ComfyUI fixes it (comfy/model_detection.py): heads of 128 with rope axes
(64, 32, 32), patch 2, two experts active per token, and block i reading Llama layer min(i, layers - 1) (for
Llama-3.1-8B's 32 layers: 0..31, then 31 for the last 16 blocks).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelFileError
from .base import Target, TargetMember
from .layout import count_blocks

HEAD_DIM = 128
ROPE_AXES = (64, 32, 32)
PATCH = 2
ACTIVE_EXPERTS = 2
MAX_RESOLUTION = (128, 128)  # latent cells; only diffusers' own padding of non-square inputs reads it

DOUBLE_ATTN = ("to_q", "to_k", "to_v", "to_out", "to_q_t", "to_k_t", "to_v_t", "to_out_t")
SINGLE_ATTN = ("to_q", "to_k", "to_v", "to_out")
SWIGLU = ("w1", "w2", "w3")


def llama_layer_of_blocks(blocks: int, llama_layers: int) -> list[int]:
    """Which Llama layer each block reads: the first blocks one layer each, the rest the last layer."""
    return [min(i, llama_layers - 1) for i in range(blocks)]


def transformer_config(shapes: dict[str, tuple[int, ...]], llama_layers: int, source: str) -> dict:
    """HiDreamImageTransformer2DModel's config from a checkpoint's shapes (prefix removed) and the number of hidden
    layers of the Llama encoder that feeds it."""
    try:
        inner, patch_in = shapes["x_embedder.proj.weight"]
        out = shapes["final_layer.linear.weight"][0]
        double = count_blocks(shapes, "double_stream_blocks.")
        single = count_blocks(shapes, "single_stream_blocks.")
        projections = count_blocks(shapes, "caption_projection.")
        llama_dim = shapes["caption_projection.0.linear.weight"][1]
        t5_dim = shapes[f"caption_projection.{projections - 1}.linear.weight"][1]
        pooled = shapes["p_embedder.pooled_embedder.linear_1.weight"][1]
    except KeyError as e:
        raise ModelFileError(f"{source}: not a complete HiDream checkpoint (missing {e.args[0]})") from None
    first = "double_stream_blocks.0.block" if double else "single_stream_blocks.0.block"
    experts = count_blocks(shapes, f"{first}.ff_i.experts.")
    if inner % HEAD_DIM:
        raise ModelFileError(f"{source}: HiDream width {inner} is not a multiple of its 128-wide heads")
    if projections != double + single + 1:
        raise ModelFileError(f"{source}: {projections} caption projections for {double + single} blocks (HiDream has"
                             " one per block and one for T5)")
    return dict(patch_size=PATCH, in_channels=patch_in // PATCH**2, out_channels=out // PATCH**2, num_layers=double,
                num_single_layers=single, attention_head_dim=HEAD_DIM, num_attention_heads=inner // HEAD_DIM,
                caption_channels=[t5_dim, llama_dim], text_emb_dim=pooled, num_routed_experts=experts,
                num_activated_experts=ACTIVE_EXPERTS, axes_dims_rope=ROPE_AXES, max_resolution=MAX_RESOLUTION,
                llama_layers=llama_layer_of_blocks(double + single, llama_layers))


def block_linears(cfg) -> list[tuple[str, bool]]:
    """(module path, is a routed expert) of every linear inside the blocks, in depth order. The MoE router
    (`ff_i.gate`) is a bare weight read by F.linear, not a linear layer: it is not trainable here."""
    def feed_forward(b: str) -> list[tuple[str, bool]]:
        if not cfg["num_routed_experts"]:
            return [(f"{b}.ff_i.{w}", False) for w in SWIGLU]
        out = [(f"{b}.ff_i.shared_experts.{w}", False) for w in SWIGLU]
        return out + [(f"{b}.ff_i.experts.{k}.{w}", True) for k in range(cfg["num_routed_experts"]) for w in SWIGLU]

    out: list[tuple[str, bool]] = []
    for i in range(cfg["num_layers"]):
        b = f"double_stream_blocks.{i}.block"
        out += [(f"{b}.attn1.{a}", False) for a in DOUBLE_ATTN] + feed_forward(b)
        out += [(f"{b}.ff_t.{w}", False) for w in SWIGLU] + [(f"{b}.adaLN_modulation.1", False)]
    for i in range(cfg["num_single_layers"]):
        b = f"single_stream_blocks.{i}.block"
        out += [(f"{b}.attn1.{a}", False) for a in SINGLE_ATTN] + feed_forward(b) + [(f"{b}.adaLN_modulation.1", False)]
    return out


def block_targets(denoiser: nn.Module) -> list[Target]:
    """Every block linear named by its ComfyUI key; the routed experts opt in (peers leave them out: ai-toolkit,
    diffusers' HiDream LoRA script), so `network_kwargs.only_if_contains: [experts]` adds them."""
    modules = dict(denoiser.named_modules())
    out = []
    for name, expert in block_linears(denoiser.config):
        m = modules[name]
        out.append(Target(key=f"diffusion_model.{name}", in_features=m.in_features, out_features=m.out_features,
                          members=[TargetMember(m, slice(0, m.out_features))], aliases=(f"transformer.{name}",),
                          opt_in=expert))
    return out


def patchify(x: torch.Tensor, p: int = PATCH) -> torch.Tensor:
    """(b, c, h, w) latents -> (b, h/p * w/p, p*p*c) tokens, features ordered (p_h, p_w, c) as HiDream's."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify_training(x: torch.Tensor, h: int, w: int, p: int = PATCH) -> torch.Tensor:
    """diffusers' training-mode output (b, c, tokens, p*p) -> (b, c, h, w)."""
    b, c = x.shape[:2]
    return x.reshape(b, c, h // p, w // p, p, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, batch: int, device, p: int = PATCH) -> torch.Tensor:
    """Rope positions (0, row, column) of the latent's tokens, (b, tokens, 3) in float32."""
    ids = torch.zeros(h // p, w // p, 3, device=device)
    ids[..., 1] = torch.arange(h // p, device=device)[:, None]
    ids[..., 2] = torch.arange(w // p, device=device)[None, :]
    return ids.reshape(1, -1, 3).expand(batch, -1, -1)
