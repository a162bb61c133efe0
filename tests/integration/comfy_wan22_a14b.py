"""Wan 2.2 A14B's two experts on ComfyUI's MODEL, small. Each expert is its own model file with Wan 2.1 14B's blocks,
which ComfyUI detects as WAN21_T2V: ComfyUI's WAN21_T2V entry at dim 128 (one head of 128, as its detection takes
heads), 2 blocks, with a seed per expert; UMT5-XXL at d_model 32 through `umt5xxl_model_config` with the small
SentencePiece vocabulary; the Wan 2.1 VAE at dim 16 (ComfyUI reads its widths from the file). The expert is the
node's `expert` (model.expert): the run trains only its share of the schedule (boundary 0.875, Wan 2.2 T2V's) and
is named after it."""

from __future__ import annotations

from pathlib import Path

from comfy_small import SmallFamily, small_clip, small_model, wan21_vae

TEXT = 32
UNET = {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "in_dim": 16, "out_dim": 16,
        "dim": 128, "ffn_dim": 256, "num_heads": 1, "num_layers": 2, "text_dim": TEXT, "freq_dim": 256,
        "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}
UMT5 = {"d_model": TEXT, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 2, "vocab_size": 64}
SEEDS = {"high_noise": 51, "low_noise": 52}


def expect(expert: str) -> dict:
    return {"detected": "WAN21_T2V", "model_class": "WAN21", "stacks": ["blocks"],
            "text_keys": ["cross_attn", "cross_attn__shape"], "expert": expert, "expert_boundary": 0.875}


def build_expert(cache: Path, expert: str) -> SmallFamily:
    from comfy_fixtures import _spiece_model

    patcher = small_model("WAN21_T2V", UNET, seed=SEEDS[expert])
    clip = small_clip(patcher, {"umt5xxl": UMT5}, tokenizer_data={"spiece_model": _spiece_model()})
    return SmallFamily(patcher, clip, wan21_vae(cache), latent_shape=(1, 16, 2, 8, 8), video_frames=5,
                       model_keys={"expert": expert})
