"""Wan 2.1 VACE on ComfyUI's MODEL, small: ComfyUI's WAN21_Vace entry (model_base.WAN21_Vace over its VaceWanModel) at
dim 128 with one head of 128 (ComfyUI's detection takes heads of 128), ffn 256, 2 blocks, and its VACE branch as
ComfyUI's detection reads it from a file: vace_in_dim 96 (WanVaceToVideo's inactive + reactive latents, 2 x 16, and the
8x8-folded mask, 64) and 2 vace_layers (one per block: ComfyUI maps VACE block n to block n * num_layers /
vace_layers; VACE 1.3B has 15 over 30), block 0 with its before_proj; UMT5-XXL at d_model 32 through
`umt5xxl_model_config` with the small SentencePiece vocabulary; the Wan 2.1 VAE at dim 16 (comfy_wan22_a14b.py).

Trained on clips with a control video, a mask image (generate the left half) and a reference image per clip
(control_path, mask_path, reference_path) through ComfyUI's WanVaceToVideo: vace_frames / vace_mask / vace_strength
in the conditioning, the reference image's latent frame before the clip's (trim_latent 1), trained on as a clean
frame and trimmed after sampling as TrimVideoLatent does."""

from __future__ import annotations

from pathlib import Path

from comfy_small import SmallFamily, small_clip, small_model
from comfy_wan22_a14b import UMT5, UNET, wan21_vae

VACE_UNET = {**UNET, "model_type": "vace", "vace_in_dim": 96, "vace_layers": 2}

EXPECT = {"detected": "WAN21_Vace", "model_class": "WAN21_Vace", "stacks": ["blocks", "vace_blocks"],
          "text_keys": ["cross_attn", "cross_attn__shape"],
          "node": {"name": "WanVaceToVideo", "needs": "control data", "clip_vision": False, "trim_latent": 1,
                   "cond_keys": ["leading_frames", "node.vace_frames.0", "node.vace_mask.0", "node.vace_strength.0"],
                   "comfy_cond_keys": ["c_crossattn", "vace_context", "vace_strength"]}}


def vace_folders(work: Path, clips: Path) -> dict:
    """A control video, a mask image and a reference image for every training clip, with its name."""
    import numpy as np
    from PIL import Image

    from trainer.demo.videos import make_video_dataset

    controls = make_video_dataset(work / "vace_control", n=2, size=(64, 64), frames=12, fps=16, seed=5)
    masks, refs = work / "vace_mask", work / "vace_reference"
    masks.mkdir(parents=True, exist_ok=True)
    refs.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:64, 0:64]
    for i, clip in enumerate(sorted(clips.glob("*.mp4"))):
        mask = np.where(xx < 32, 255, 0).astype(np.uint8)  # white: generate
        Image.fromarray(np.stack([mask] * 3, -1)).save(masks / f"{clip.stem}.png")
        ref = np.stack([(xx * 4 + 70 * i) % 256, (yy * 4) % 256, np.full((64, 64), 120 + 60 * i)], -1)
        Image.fromarray(ref.astype(np.uint8)).save(refs / f"{clip.stem}.png")
    return {"control_path": str(controls), "mask_path": str(masks), "reference_path": str(refs)}


def build(cache: Path, comfyui: str) -> SmallFamily:
    from comfy_fixtures import _spiece_model

    patcher = small_model("WAN21_Vace", VACE_UNET, seed=55)
    clip = small_clip(patcher, {"umt5xxl": UMT5}, tokenizer_data={"spiece_model": _spiece_model()})
    return SmallFamily(patcher, clip, wan21_vae(cache), latent_shape=(1, 16, 2, 8, 8), video_frames=5,
                       dataset=vace_folders)
