"""SD 3.5 on ComfyUI's MODEL, small: ComfyUI's SD3 entry (it detects SD 3.5 Medium and Large as SD3: an MMDiT with RMS
q/k norms, Medium also with a second image self-attention in its first blocks) built as its detection configures
SD 3.5 Medium, at depth 2 (ComfyUI's MMDiT fixes hidden = 64 x depth and heads = depth: 2 heads of 64, and its
last joint block is context pre-only, so 2 is the least with one full block), with the x-block self-attention in
block 0 and a position table of 8 x 8 patches (the checkpoint's buffer, which ComfyUI's constructor leaves empty: filled
with seeded values as a file would fill it).

Its text encoders are the entry's own clip_target for a checkpoint holding CLIP-L, CLIP-G and T5-XXL (ComfyUI's
SD3ClipModel: CLIP-L and CLIP-G hidden states side by side, zero-padded to 4096 wide, then T5's tokens after them on
the token axis; the pooled vector CLIP-L's pooled beside CLIP-G's projected one). All three are kept: T5 can be made
small in depth, heads and feed-forward, but not in width, since ComfyUI pads the CLIP output to 4096 wide before it
concatenates the T5 tokens to it (sd3_clip.py), so T5 stays d_model 4096 (1 layer, 2 heads of 16, d_ff 32; its
32128 x 4096 token embedding is most of its 0.5 GB in fp32) and the model's context embedder takes 4096. CLIP-L at
hidden 32 and CLIP-G at hidden 64 (3 layers each: both take the second-to-last hidden state), so the pooled vector,
ComfyUI's `pooled_output` that SD3's extra_conds turn into `y`, is 32 + 64 = 96 wide (adm_in_channels). The 16-channel
VAE (SD3's latent format scales and shifts it).

Training shift: ComfyUI samples SD3 on its discrete flow schedule with its config's shift 3.0 (no resolution shift).
"""

from __future__ import annotations

from pathlib import Path

import torch

from comfy_small import SmallFamily, flux_vae, small_clip, small_model

DEPTH = 2  # hidden 64 * depth
CLIP_L = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2}
CLIP_G = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 2}
T5 = {"d_model": 4096, "d_kv": 16, "num_heads": 2, "d_ff": 32, "num_layers": 1}  # 4096: ComfyUI's CLIP padding width
POS_SIDE = 8  # pos_embed_max_size: the 4 x 4 patches of the 8 x 8 test latent fit
UNET = {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": DEPTH, "input_size": None,
        "adm_in_channels": CLIP_L["hidden_size"] + CLIP_G["hidden_size"],
        "context_embedder_config": {"target": "torch.nn.Linear",
                                    "params": {"in_features": 4096, "out_features": 64 * DEPTH}},
        "num_patches": POS_SIDE * POS_SIDE, "pos_embed_max_size": POS_SIDE, "qk_norm": "rms",
        "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [0]}

EXPECT = {"detected": "SD3", "model_class": "SD3", "stacks": ["joint_blocks"],
          "text_keys": ["cross_attn", "cross_attn__shape", "pooled_output", "pooled_output__shape"],
          "model_cond_keys": ["c_crossattn", "y"],  # SD3's extra_conds: the context and the pooled vector as y
          "pooled": True, "train_shift_mu": None, "train_shift": 3.0}


def _checkpoint_text_encoders() -> dict[str, torch.Tensor]:
    """The keys by which the entry's clip_target finds CLIP-L, CLIP-G and T5-XXL in a checkpoint (and T5's dtype)."""
    pref = "text_encoders."
    return {f"{pref}clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(1),
            f"{pref}clip_g.transformer.text_model.final_layer_norm.weight": torch.ones(1),
            f"{pref}t5xxl.transformer.encoder.final_layer_norm.weight": torch.ones(1, dtype=torch.float32)}


def build(cache: Path, comfyui: str) -> SmallFamily:
    patcher = small_model("SD3", UNET)
    pos = patcher.model.diffusion_model.pos_embed
    with torch.no_grad():
        pos.copy_(0.02 * torch.randn(pos.shape, generator=torch.Generator().manual_seed(2)))
    target = patcher.model.model_config.clip_target(_checkpoint_text_encoders())
    clip = small_clip(patcher, {"clip_l": CLIP_L, "clip_g": CLIP_G, "t5xxl": T5}, clip_target=target)
    return SmallFamily(patcher, clip, flux_vae(cache), latent_shape=(1, 16, 8, 8))
