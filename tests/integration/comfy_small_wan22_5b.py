"""Wan 2.2 TI2V 5B on ComfyUI's MODEL, small: ComfyUI's WAN22_T2V entry (model_base.WAN22 over its WanModel, 48-channel
latents in and out) at dim 128 with one head of 128 (ComfyUI's detection takes heads of 128), ffn 256, 2 blocks, its
fixed freq_dim 256; its UMT5-XXL text encoder at d_model 32 (2 heads of 16, 2 layers, ComfyUI's
`umt5xxl_model_config` override) with a small SentencePiece vocabulary (comfy_fixtures._spiece_model; captions are
still padded to UMT5's 512 tokens, cheap at this width); and the Wan 2.2 VAE at its full size: ComfyUI's comfy.sd.VAE
recognises it by `decoder.upsamples.0.upsamples.0.residual.2.weight` and builds it with fixed widths (dim 160,
decoder 256, 705M parameters), reading none from the file, so it cannot be smaller. Its random weights are cached in
bf16 (1.4 GB, ~30 s to write once); on the CPU it encodes a 5-frame 64 px clip in ~8 s and decodes it in ~18 s.
16x spatial / 4x temporal: a 64 px, 5-frame clip is a (48, 2, 4, 4) latent, 2x2 patches make 32 px tokens.
Trained at lr 5e-3: at the check's 2e-3, three steps move this model's output by only ~2e-3."""

from __future__ import annotations

from pathlib import Path

import torch

from comfy_small import SmallFamily, small_clip, small_model

TEXT = 32  # the text encoder's width, the model's text_dim
UNET = {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "in_dim": 48, "out_dim": 48,
        "dim": 128, "ffn_dim": 256, "num_heads": 1, "num_layers": 2, "text_dim": TEXT, "freq_dim": 256,
        "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}
UMT5 = {"d_model": TEXT, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 2, "vocab_size": 64}

EXPECT = {"detected": "WAN22_T2V", "model_class": "WAN22", "stacks": ["blocks"], "text_keys": ["cross_attn", "cross_attn__shape"]}


def wan22_vae(cache: Path):
    """The Wan 2.2 VAE as VAELoader loads it: comfy.sd.VAE over a random state dict of ComfyUI's own WanVAE (vae2_2)
    at the widths comfy.sd.VAE builds it with; every key of the file is one ComfyUI's model has, and none is missing."""
    import comfy.ldm.wan.vae2_2 as vae2_2
    import comfy.sd
    import comfy.utils
    from comfy_fixtures import _random, _save, _shapes

    path = cache / "wan22_vae_v1.safetensors"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with torch.device("meta"):  # the class defaults are the sizes comfy.sd.VAE builds
            vae = vae2_2.WanVAE(z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                temperal_downsample=[False, True, True])
        _save(_random(_shapes(vae), 41, torch.bfloat16), path)
    sd = comfy.utils.load_torch_file(str(path))
    with torch.inference_mode():
        vae = comfy.sd.VAE(sd=sd)
    built = {k: tuple(v.shape) for k, v in vae.first_stage_model.state_dict().items()}
    if built != {k: tuple(v.shape) for k, v in sd.items()}:
        raise RuntimeError(f"{path}: not the Wan 2.2 VAE ComfyUI builds; delete it to rewrite it")
    return vae


def build(cache: Path, comfyui: str) -> SmallFamily:
    from comfy_fixtures import _spiece_model

    patcher = small_model("WAN22_T2V", UNET)
    clip = small_clip(patcher, {"umt5xxl": UMT5}, tokenizer_data={"spiece_model": _spiece_model()})
    return SmallFamily(patcher, clip, wan22_vae(cache), latent_shape=(1, 48, 2, 4, 4), video_frames=5,
                       settings={"lr": 5e-3})
