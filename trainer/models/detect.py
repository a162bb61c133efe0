"""Which family a checkpoint belongs to, from its tensor names alone."""

from __future__ import annotations

UNET_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")

# (family, keys that must all be present under one prefix); first match wins, most specific first
SIGNATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("chroma", ("distilled_guidance_layer.norms.0.scale",)),
    ("flux2", ("double_stream_modulation_img.lin.weight",)),
    # ComfyUI's own test: in the original layout and in the names ComfyUI renames it to
    ("hunyuan_video", ("txt_in.individual_token_refiner.blocks.0.norm1.weight",)),
    ("flux", ("double_blocks.0.img_attn.norm.key_norm.scale", "img_in.weight")),
    ("sd3", ("joint_blocks.0.x_block.attn.qkv.weight",)),
    ("kolors", ("encoder_hid_proj.weight", "label_emb.0.0.weight")),  # an SDXL UNet with a text projection
    ("kolors", ("encoder_hid_proj.weight", "add_embedding.linear_1.weight")),  # the same in diffusers' names
    ("sdxl", ("input_blocks.0.0.weight", "label_emb.0.0.weight")),
    ("sd1", ("input_blocks.0.0.weight",)),
    ("omnigen2", ("time_caption_embed.timestep_embedder.linear_1.bias", "ref_image_patch_embedder.weight")),
    ("sana", ("blocks.0.mlp.inverted_conv.conv.weight", "t_block.1.weight")),  # the original (ExtraModels' SanaMS)
    ("sana", ("transformer_blocks.0.ff.conv_inverted.weight", "caption_projection.linear_1.weight")),  # diffusers'
    ("wan", ("blocks.0.self_attn.q.weight", "patch_embedding.weight")),
    ("hidream", ("caption_projection.0.linear.weight", "x_embedder.proj.weight")),
    ("ltxav", ("audio_adaln_single.linear.weight", "patchify_proj.weight")),
    ("ltxv", ("adaln_single.emb.timestep_embedder.linear_1.bias", "patchify_proj.weight")),
    ("flux_diffusers", ("transformer_blocks.0.attn.add_q_proj.weight", "x_embedder.weight")),
    ("vae", ("encoder.conv_in.weight", "decoder.conv_out.weight")),
    ("clip", ("text_model.embeddings.token_embedding.weight",)),
    ("t5", ("encoder.block.0.layer.0.SelfAttention.q.weight",)),
)


def guess_family(keys) -> str | None:
    keys = set(keys)
    for family, needed in SIGNATURES:
        for p in UNET_PREFIXES:
            if all(f"{p}{k}" in keys for k in needed):
                return family
    return None


def require_family(path, shapes: dict, family: str, arch: str) -> None:
    """One clear error when a checkpoint is not of the family `model.arch` asks for (derivatives in the same
    layout, Flex.1 or Flux.1-lite, detect as their base family)."""
    from ..errors import ModelFileError

    found = guess_family(shapes)
    if found != family:
        what = f"a {found} checkpoint" if found else "not a diffusion model checkpoint this trainer knows"
        raise ModelFileError(f"{path}: this is {what}, but model.arch is {arch!r}")
