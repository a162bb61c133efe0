"""Chroma on ComfyUI's MODEL, small: ComfyUI's Chroma entry (Flux's double and single stream blocks without their own
modulation, driven by the distilled-guidance Approximator) at hidden 64, 2 heads of 32 (RoPE axes 8 + 12 + 12 = the
head width), 2 double and 2 single blocks; the Approximator at hidden 32, 2 layers. Its in_dim stays 64 and its
out_dim is the hidden size, as ComfyUI's forward fixes them: the input is the 16 + 16 wide timestep and guidance
embeddings and the 32 wide embedding of the 344 modulation indices; in_channels 64 is a 2x2 patch of the 16-channel
latent. Its T5-XXL text encoder (ComfyUI's PixArt T5, which Chroma's CLIPLoader type loads: no padding, no attention
mask) at d_model 32, 2 layers, 2 heads of 16 (ComfyUI does not pad T5's output to a fixed width here, so the model's
context_in_dim is the encoder's width); the 16-channel Flux VAE.

ComfyUI's Chroma conditioning has no attention mask: each caption is its T5 tokens alone, unpadded. It trains with
batch size 2 on two captions of different token lengths: each goes to the model at its own length (the trainer's
padding cut back), so ComfyUI's conds of the two do not concatenate and every training forward runs one sample.
Training shift: Flux.1's resolution formula (ComfyUI samples Chroma on its Flux schedule), mu at the 4x4 tokens of
the 8x8 test latent."""

from __future__ import annotations

from pathlib import Path

from comfy_small import SmallFamily, flux_vae, small_clip, small_model

T5_WIDTH = 32  # the text encoder's width, the model's context_in_dim
UNET = {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "in_dim": 64, "out_dim": 64, "hidden_dim": 32,
        "n_layers": 2, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 4.0, "axes_dim": [8, 12, 12], "theta": 10000,
        "qkv_bias": True, "txt_ids_dims": [], "patch_size": 2, "context_in_dim": T5_WIDTH, "vec_in_dim": None,
        "depth": 2, "depth_single_blocks": 2}
T5 = {"d_model": T5_WIDTH, "d_kv": 16, "num_heads": 2, "d_ff": 64, "num_layers": 2}

EXPECT = {"detected": "Chroma", "model_class": "Chroma", "stacks": ["double_blocks", "single_blocks"],
          "text_keys": ["cross_attn", "cross_attn__shape"],
          "model_cond_keys": ["c_crossattn", "guidance"],  # no pooled y; guidance at Chroma's default, 0
          "train_forward_batches": [1] * 6,  # batch 2 of two lengths, one sample a forward: 3 steps x 2
          "train_shift_mu": 0.5 + (1.15 - 0.5) * (4 * 4 - 256) / (4096 - 256)}  # Flux.1's mu at 4x4 tokens
CAPTIONS = ["a photo of a red cat", "a small sketch of a big blue house with a dark tree on the bright sky"]


def build(cache: Path, comfyui: str) -> SmallFamily:
    patcher = small_model("Chroma", UNET)
    clip = small_clip(patcher, {"t5xxl": T5})
    return SmallFamily(patcher, clip, flux_vae(cache), latent_shape=(1, 16, 8, 8), captions=CAPTIONS,
                       settings={"batch_size": 2})
