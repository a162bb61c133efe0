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

from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ModelFileError
from . import registry
from .base import Conditioning
from .flux import FluxModel, latent_channels_of, load_flux, make_flux_demo

def extra_channels(latent: int) -> int:
    """Latent channels img_in reads beside the noisy latent: inpaint latent, inpaint mask, control latent."""
    return 2 * latent + 1


def flex2_inputs(noisy: torch.Tensor, control: torch.Tensor | None) -> torch.Tensor:
    """The 49-channel (for a 16-channel latent) img_in input: noisy, no-inpaint, control (zeros if None)."""
    b, c, h, w = noisy.shape
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


class Flex2Model(FluxModel):
    arch = "flex2"
    takes_control = True  # cond["control"]: a control latent, normalized like the training latents
    default_bypass_guidance = True  # ai-toolkit trains Flex.2 with the guidance embedding bypassed

    @classmethod
    def check_transformer(cls, transformer: nn.Module, source: Path, arch: str) -> None:
        cfg = transformer.config
        latent = latent_channels_of(cfg)
        want = (latent + extra_channels(latent)) * 4
        if cfg.in_channels != want:
            what = "a Flux-style checkpoint" if cfg.in_channels == latent * 4 else f"img_in of {cfg.in_channels} features"
            raise ModelFileError(
                f"{source}: not a Flex.2 checkpoint ({what}; Flex.2's img_in takes {want} features:"
                f" noisy, inpaint and control latents and a mask); for Flux / Flex.1 files use model.arch flux or flex1"
            )

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning, guidance: float | None = None) -> torch.Tensor:
        return super().predict(flex2_inputs(noisy, cond.get("control")), sigmas, cond, guidance)

    def save_metadata(self) -> dict[str, str]:
        return {
            "ss_base_model_version": "flex2",
            "modelspec.architecture": "Flex.2/lora",
            "eridiffusion.arch": self.arch,
        }


def load_flex2(mc: ModelConfig, device: str, dtype: torch.dtype) -> Flex2Model:
    model = load_flux(mc, device, dtype, arch="flex2", model_cls=Flex2Model)
    assert isinstance(model, Flex2Model)
    return model


def make_flex2_demo(folder: Path) -> dict:
    """The Flux demo's files with Flex.2's img_in (196 features in, 64 out); the demo adds control images."""
    cfg = make_flux_demo(folder, arch="flex2", config_overrides={"in_channels": 196, "out_channels": 64})
    return {**cfg, "demo_controls": True}


registry.register(
    registry.Family(
        arch="flex2",
        description="Flex.2 (Flux layout, img_in fed noisy + inpaint + mask + control latents): control images"
        " from datasets[].control_path, guidance embedding bypassed in training",
        load=load_flex2,
        make_demo=make_flex2_demo,
    )
)
