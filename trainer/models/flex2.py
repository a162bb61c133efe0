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
optional control image per sample.

Inpainting, as ai-toolkit trains it and the pipeline samples it: an item with a mask (`datasets[].mask_path`, same
stems, white where the model paints) trains with its own latent as the inpaint latent, zeroed under the mask, and
the mask at latent size (bilinear, as the pipeline resizes it); items without a mask train with "no inpaint". A
preview takes `inpaint_image` with `inpaint_mask`, `control_strength` (the control latent scaled) and
`control_stop` (the share of the steps that see the control; after it, zeros), as Flex2Pipeline does. The cache
keeps the mask as `inpaint_keep` = 1 - mask, so that an item without one (zeros in a mixed batch, or
`control_dropout`, which drops an item's inpaint input with its control) reads as "paint everywhere".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Conditioning
from .family import Family
from .flux import FluxVariant, load_flux


def extra_channels(latent: int) -> int:
    """Latent channels img_in reads beside the noisy latent: inpaint latent, inpaint mask, control latent."""
    return 2 * latent + 1


def flex2_inputs(noisy: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """The 49-channel (for a 16-channel latent) img_in input: noisy, inpaint latent (zeros: none), mask (ones:
    paint everywhere), control latent (zeros if absent) times the preview's control_strength."""
    b, c, h, w = noisy.shape
    control = _latent(cond, "control", noisy)
    if "control_strength" in cond:
        control = control * cond["control_strength"].to(noisy.device, noisy.dtype).reshape(-1, 1, 1, 1)
    inpaint = _latent(cond, "inpaint", noisy)
    keep = cond.get("inpaint_keep")
    mask = noisy.new_ones((b, 1, h, w)) if keep is None else 1 - _sized(keep.to(noisy.device, noisy.dtype), noisy, 1)
    return torch.cat([noisy, inpaint, mask, control], dim=1)


def _latent(cond: Conditioning, name: str, noisy: torch.Tensor) -> torch.Tensor:
    t = cond.get(name)
    if t is None:
        return torch.zeros_like(noisy)
    return _sized(t.to(noisy.device, noisy.dtype), noisy, noisy.shape[1])


def _sized(t: torch.Tensor, noisy: torch.Tensor, channels: int) -> torch.Tensor:
    b, _, h, w = noisy.shape
    if t.shape[1:] != (channels, h, w):
        raise ValueError(f"Flex.2 condition {tuple(t.shape)} does not match the latent {tuple(noisy.shape)}")
    return t.expand(b, channels, h, w)


def flex2_conditions(model, pixels: torch.Tensor, control: torch.Tensor | None,
                     mask: torch.Tensor | None) -> Conditioning | None:
    """An item's (or a preview's) cached conditions: the control latent, and with a mask (1, h, w) in [0, 1] the
    inpaint latent of `pixels` zeroed under the mask and `inpaint_keep` = 1 - the mask at latent size."""
    out = {}
    if control is not None:
        out["control"] = model.encode_pixels(control[None])[0]
    if mask is not None:
        out.update({k: v[0] for k, v in inpaint_conditions(model.encode_pixels(pixels[None]), mask).items()})
    return out or None


def inpaint_conditions(latent: torch.Tensor, mask: torch.Tensor) -> Conditioning:
    """`inpaint` (the latent (b, c, h, w) zeroed under the mask) and `inpaint_keep` (1 - the mask at latent size,
    bilinear as the pipeline resizes it) from a mask (1, H, W) or (H, W) at pixel size, 1 where the model paints."""
    m = F.interpolate(mask.float().reshape(1, 1, *mask.shape[-2:]), size=latent.shape[-2:], mode="bilinear",
                      align_corners=False)
    return {"inpaint": latent * (1 - m), "inpaint_keep": 1 - m}


def flex2_conditions_at(cond: Conditioning, step: int, steps: int) -> Conditioning:
    """The pipeline's control_stop: steps from int(steps * stop) on sample without the control."""
    stop = cond.get("control_stop")
    if stop is None or "control" not in cond or step < int(steps * float(stop.reshape(-1)[0])):
        return cond
    return {k: v for k, v in cond.items() if k != "control"}


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
    takes_inpaint=True,
    encode_conditions=flex2_conditions,
    conditions_at=flex2_conditions_at,
    metadata={"ss_base_model_version": "flex2", "modelspec.architecture": "Flex.2/lora"},
)

FAMILIES = [
    Family("flex2", "Flex.2 (Flux layout, img_in fed noisy + inpaint + mask + control latents): control images"
           " from datasets[].control_path, inpaint masks from datasets[].mask_path, guidance embedding bypassed in"
           " training",
           lambda mc, device, dtype: load_flux(mc, device, dtype, FLEX2), takes_control=True, takes_masks=True,
           takes_inpaint=True,
           model_defaults={"bypass_guidance_embedding": True}, comfy_clip_type="flux",
           tokenizers=(("clip", 0, "tokenizer"), ("t5", 1, "tokenizer_2"))),
]


def comfy_flex2_model(patcher, control: torch.Tensor | None, inpaint: torch.Tensor | None, mask: torch.Tensor | None,
                      strength: float = 1.0, stop: float = 1.0):
    """A clone of ComfyUI's MODEL of a Flex.2 file that samples with Flex.2's 33 extra input channels.

    ComfyUI loads Flex.2 as Flux, whose concat for an img_in wider than the latent is Flux Fill's (an image and an
    8x8-unshuffled mask: 384 features against Flex.2's 196). The clone's model wrapper gives the model this
    family's channels instead (`flex2_inputs`: inpaint latent under the mask, the mask, the control latent times
    `strength`) as its c_concat. `control` / `inpaint`: VAE latents as ComfyUI's VAE.encode returns them (raw,
    normalized here by the model's latent format), (1, 16, h, w); `mask`: (1, H, W) or (H, W) at pixel size,
    1 where the model paints. `stop`: the control is given while sigma is above the model's sigma at that share of
    the schedule (ComfyUI's percent_to_sigma, as a ControlNet's end_percent; 1: every step, 0: none), zeros after;
    Flex2Pipeline counts steps instead (the first int(steps * stop)), which agrees where the schedule is even."""
    diffusion = patcher.model.diffusion_model
    latent = patcher.model.latent_format.latent_channels
    features = diffusion.img_in.weight.shape[1]
    why = flex2_input_check(features, latent)
    if why:
        raise ValueError(f"Flex.2 conditioning: {why}")
    if (inpaint is None) != (mask is None):
        raise ValueError("Flex.2 conditioning: inpaint_image and inpaint_mask go together (the image to inpaint and"
                         " the mask of where to paint)")
    given = next((t for t in (control, inpaint) if t is not None), None)
    cond: Conditioning = {}
    if control is not None:
        cond["control"] = patcher.model.process_latent_in(control.float())
    if inpaint is not None:
        cond.update(inpaint_conditions(patcher.model.process_latent_in(inpaint.float()), mask))
    cond["control_strength"] = torch.tensor([float(strength)])
    stop_sigma = float(patcher.model.model_sampling.percent_to_sigma(float(stop)))

    def extras(x: torch.Tensor, with_control: bool) -> torch.Tensor:
        c = cond if with_control else {k: v for k, v in cond.items() if k != "control"}
        if given is not None and tuple(given.shape[-2:]) != tuple(x.shape[-2:]):
            raise ValueError(f"Flex.2 conditioning: its images make a {given.shape[-1]}x{given.shape[-2]} latent, the"
                             f" latent sampled is {x.shape[-1]}x{x.shape[-2]}: give the empty latent the images'"
                             " size (or scale the images to it)")
        zeros = torch.zeros(x.shape[0], latent, *x.shape[-2:], dtype=torch.float32)
        return flex2_inputs(zeros, {k: v.float() for k, v in c.items()})[:, latent:]

    def wrapper(apply_model, args: dict):
        x, sigma = args["input"], args["timestep"]
        c = dict(args["c"])
        c["c_concat"] = extras(x, stop >= 1.0 or float(sigma.max()) > stop_sigma).to(x.device, x.dtype)
        return apply_model(x, sigma, **c)

    clone = patcher.clone()
    clone.set_model_unet_function_wrapper(wrapper)
    return clone
