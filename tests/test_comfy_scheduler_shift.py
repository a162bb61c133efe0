"""On ComfyUI's MODEL, Flux.2 trains (and previews) at the shift of the scheduler node ComfyUI samples it with
(Flux2Scheduler), over the latent's image tokens: which configs take it (by ComfyUI's config class, subclasses too) and
the token count it is given. ComfyUI itself is not needed here: the mu values are checked inside ComfyUI
(integration/test_comfyui_targets.py)."""

from __future__ import annotations

import pytest

from trainer.models.comfy import latent_tokens, takes_scheduler_shift


class BASE:
    def __init__(self, unet_config: dict) -> None:
        self.unet_config = unet_config


class Flux(BASE):
    pass


class Flux2(Flux):
    pass


class Flux2Variant(Flux2):  # a later config deriving from Flux.2's
    pass


class LTXV(BASE):
    pass


@pytest.mark.parametrize("cls,want", [(Flux2, True), (Flux2Variant, True), (Flux, False), (LTXV, False)])
def test_scheduler_shift_configs(cls, want) -> None:
    assert takes_scheduler_shift(cls({})) is want


def test_flux2_tokens_are_flux2schedulers_seq_len() -> None:
    """1024x1024: a 64x64 latent (16x) at patch 1 is 4096 tokens, Flux2Scheduler's width * height / 16²."""
    assert latent_tokens(Flux2({"patch_size": 1}), (1, 128, 64, 64)) == 1024 * 1024 // 16 ** 2
    assert latent_tokens(Flux2({"patch_size": 1}), (1, 128, 32, 48)) == 32 * 48


def test_tokens_over_patches_rounded_up() -> None:
    """Flux.1's 2x2 patches over its 8x latent: 4096 tokens at 1024x1024; an odd side pads to a whole patch."""
    assert latent_tokens(Flux({"patch_size": 2}), (1, 16, 128, 128)) == 4096
    assert latent_tokens(Flux({"patch_size": 2}), (1, 16, 5, 7)) == 3 * 4
    assert latent_tokens(Flux({}), (1, 16, 8, 8)) == 16  # no patch_size in the config: 2, as the backend's buckets take
