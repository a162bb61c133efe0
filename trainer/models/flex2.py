"""Flex.2 (ostris, e.g. Flex.2-preview) on the diffusers backend, from local files.

Flex.2 is Flux's layout (8 double blocks, 38 single blocks at full size, CLIP-L + T5-XXL, the Flux VAE)
whose img_in reads 49 latent channels per pixel (196 features after 2x2 packing) and whose output is the
usual 16-channel velocity. The channels, in the order of its reference pipeline (Flex2Pipeline):

    [ noisy latent (16) | inpaint latent (16) | inpaint mask (1) | control latent (16) ]

all at latent resolution and packed together (packing is channel-major, so packing the 49 channels at once
equals the pipeline's packing of the noisy latent and of the 33 extra channels separately, concatenated).
Latents (noisy, inpaint, control) are normalized alike: (vae(x) - shift) * scale. The mask is 1 where the
model paints and 0 where it keeps the inpaint latent, which is zeroed where the mask is 1.

"No control" is a zero control latent; "no inpaint" is a zero inpaint latent with a mask of ones (paint
everywhere). Training follows ai-toolkit's Flex.2 recipe: flow matching as Flux, the guidance embedding
bypassed (`bypass_guidance_embedding`, default true), the control latent from the dataset's control image
(`datasets[].control_path`) or zeros, optionally dropped (`datasets[].control_dropout`). Sampling runs the
guidance embedding at the sample's guidance_scale, with Flux's resolution-dependent shift, and takes an
optional control image per sample. Inpainting inputs are not trained or sampled here: they stay at
"no inpaint".
"""

from __future__ import annotations

import torch

from .base import Conditioning
from .family import Family
from .flux import FluxVariant, load_flux


def extra_channels(latent: int) -> int:
    """Latent channels img_in reads beside the noisy latent: inpaint latent, inpaint mask, control latent."""
    return 2 * latent + 1


def flex2_inputs(noisy: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """The 49-channel (for a 16-channel latent) img_in input: noisy, no-inpaint, control (zeros if absent)."""
    b, c, h, w = noisy.shape
    control = cond.get("control")
    if control is None:
        control = noisy.new_zeros((b, c, h, w))
    else:
        control = control.to(noisy.device, noisy.dtype)
        if control.shape[1:] != (c, h, w):
            raise ValueError(f"control latent {tuple(control.shape)} does not match the latent {tuple(noisy.shape)}")
        control = control.expand(b, c, h, w)
    inpaint = noisy.new_zeros((b, c, h, w))  # no inpaint image ...
    mask = noisy.new_ones((b, 1, h, w))  # ... so the model paints everywhere
    return torch.cat([noisy, inpaint, mask, control], dim=1)


def flex2_input_check(in_features: int, latent: int) -> str | None:
    want = (latent + extra_channels(latent)) * 4
    if in_features == want:
        return None
    what = "a Flux-style checkpoint" if in_features == latent * 4 else f"img_in of {in_features} features"
    return (f"not a Flex.2 checkpoint ({what}; Flex.2's img_in takes {want} features: noisy, inpaint and control"
            " latents and a mask); for Flux / Flex.1 files use model.arch flux or flex1")


FLEX2 = FluxVariant(
    "flex2",
    bypass_guidance_default=True,  # ai-toolkit trains Flex.2 with the guidance embedding bypassed
    takes_control=True,
    compose_input=flex2_inputs,
    check_input=flex2_input_check,
    metadata={"ss_base_model_version": "flex2", "modelspec.architecture": "Flex.2/lora"},
)

FAMILIES = [
    Family("flex2", "Flex.2 (Flux layout, img_in fed noisy + inpaint + mask + control latents): control images"
           " from datasets[].control_path, guidance embedding bypassed in training",
           lambda mc, device, dtype: load_flux(mc, device, dtype, FLEX2), takes_control=True,
           model_defaults={"bypass_guidance_embedding": True}, comfy_clip_type="flux",
           tokenizers=(("clip", 0, "tokenizer"), ("t5", 1, "tokenizer_2"))),
]
