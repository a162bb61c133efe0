"""Wan 2.1 I2V on ComfyUI's MODEL, small: ComfyUI's WAN21_I2V entry (model_base.WAN21 with image_to_video, its WanModel
with model_type i2v: 36 input channels, 16 latent + WAN21.concat_cond's 4 mask + 16 start-image channels, and the
CLIP-vision projection img_emb with the k_img / v_img cross-attention) at dim 128 with one head of 128 (ComfyUI's
detection takes heads of 128), ffn 256, 2 blocks; UMT5-XXL at d_model 32 through `umt5xxl_model_config` with the
small SentencePiece vocabulary; the Wan 2.1 VAE at dim 16 (ComfyUI reads its widths from the file).

CLIP vision: ComfyUI's own ClipVisionModel over clip_vision_h's config (ComfyUI's clip_vision_config_h.json) with
2 layers, ffn 256 and 56 px images (4x4 patches of 14 and the class token: 17 tokens) instead of 32 layers, 5120 and
224 px. Its width stays 1280: ComfyUI's WanModel projects CLIP features with MLPProj(1280, dim), a fixed input width,
so a narrower encoder cannot feed it. ComfyUI's CLIP vision loader picks its config by layer count (31+ layers: H),
so the small one is built from the config file as the loader builds a detected one (ClipVisionModel(json)), random.

Trained with start images (do_i2v: each clip's first frame) through ComfyUI's WanImageToVideo, fed
CLIPVisionEncode's output of the start image."""

from __future__ import annotations

import json
from pathlib import Path

from comfy_small import SmallFamily, fill_random, small_clip, small_model
from comfy_wan22_a14b import UMT5, wan21_vae

TEXT = 32
UNET = {"image_model": "wan2.1", "model_type": "i2v", "patch_size": (1, 2, 2), "in_dim": 36, "out_dim": 16,
        "dim": 128, "ffn_dim": 256, "num_heads": 1, "num_layers": 2, "text_dim": TEXT, "freq_dim": 256,
        "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}
# clip_vision_h's sizes changed (its width, 1280, is what the Wan model reads)
CLIP_VISION_H_SMALL = {"num_hidden_layers": 2, "intermediate_size": 256, "image_size": 56}

EXPECT = {"detected": "WAN21_I2V", "model_class": "WAN21", "stacks": ["blocks"],
          "text_keys": ["cross_attn", "cross_attn__shape"],
          "node": {"name": "WanImageToVideo", "needs": "start image", "clip_vision": True,
                   "cond_keys": ["node.clip_vision_output.penultimate_hidden_states", "node.concat_latent_image",
                                 "node.concat_mask"],
                   "comfy_cond_keys": ["c_concat", "c_crossattn", "clip_fea"]}}


def small_clip_vision(cache: Path, seed: int = 61):
    """ComfyUI's ClipVisionModel over its own clip_vision_h config, made small (CLIP_VISION_H_SMALL), random."""
    import comfy.clip_vision

    h = Path(comfy.clip_vision.__file__).parent / "clip_vision_config_h.json"
    config = {**json.loads(h.read_text()), **CLIP_VISION_H_SMALL}
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / "clip_vision_h_small.json"
    path.write_text(json.dumps(config, indent=1))
    vision = comfy.clip_vision.ClipVisionModel(str(path))
    fill_random(vision.model, seed)
    return vision


def start_images(work: Path, clips: Path) -> dict:
    return {"do_i2v": True}  # each clip's first frame is its start image


def build(cache: Path, comfyui: str) -> SmallFamily:
    from comfy_fixtures import _spiece_model

    patcher = small_model("WAN21_I2V", UNET, seed=53)
    clip = small_clip(patcher, {"umt5xxl": UMT5}, tokenizer_data={"spiece_model": _spiece_model()})
    return SmallFamily(patcher, clip, wan21_vae(cache), latent_shape=(1, 16, 2, 8, 8), video_frames=5,
                       clip_vision=small_clip_vision(cache), dataset=start_images)
