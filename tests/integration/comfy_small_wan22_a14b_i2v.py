"""Wan 2.2 I2V A14B's low-noise expert on ComfyUI's MODEL, small. Its files have Wan 2.1 I2V's 36 input channels (16
latent + WAN21.concat_cond's 4 mask + 16 start-image channels) but no CLIP-vision projection (img_emb), so ComfyUI
detects them as WAN21_T2V (model_type t2v: no k_img / v_img) and samples them with WanImageToVideo without a
clip_vision_output, which is optional in the node and in the model. ComfyUI's WAN21_T2V entry at Wan 2.1 I2V's input
width, dim 128 (one head of 128), 2 blocks; UMT5-XXL at d_model 32; the Wan 2.1 VAE at dim 16 (comfy_wan22_a14b.py).
Trained with start images (do_i2v) as the low-noise expert at Wan 2.2 I2V's boundary, 0.9 (model.expert_boundary:
this path's default is T2V's 0.875)."""

from __future__ import annotations

from pathlib import Path

from comfy_small import SmallFamily, small_clip, small_model
from comfy_small_wan21_i2v import start_images
from comfy_wan22_a14b import UMT5, UNET, wan21_vae

I2V_UNET = {**UNET, "in_dim": 36}  # model_type stays t2v: no img_emb in these files
BOUNDARY = 0.9

EXPECT = {"detected": "WAN21_T2V", "model_class": "WAN21", "stacks": ["blocks"],
          "text_keys": ["cross_attn", "cross_attn__shape"], "expert": "low_noise", "expert_boundary": BOUNDARY,
          "node": {"name": "WanImageToVideo", "needs": "start image", "clip_vision": False,
                   "cond_keys": ["node.concat_latent_image", "node.concat_mask"],
                   "comfy_cond_keys": ["c_concat", "c_crossattn"]}}


def build(cache: Path, comfyui: str) -> SmallFamily:
    from comfy_fixtures import _spiece_model

    patcher = small_model("WAN21_T2V", I2V_UNET, seed=54)
    clip = small_clip(patcher, {"umt5xxl": UMT5}, tokenizer_data={"spiece_model": _spiece_model()})
    return SmallFamily(patcher, clip, wan21_vae(cache), latent_shape=(1, 16, 2, 8, 8), video_frames=5,
                       model_keys={"expert": "low_noise", "expert_boundary": BOUNDARY}, dataset=start_images)
