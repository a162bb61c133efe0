"""The ComfyUI backend's video settings read from ComfyUI's model config and model classes, without ComfyUI (the
end-to-end run is integration/test_comfyui_train_families.py, ltxv): LTX-Video's training shift by the latent's token
count (ModelSamplingLTXV's line), its patch of one latent cell, and the frame rate taken by models whose forward
reads it."""

from __future__ import annotations

import pytest
from torch import nn

from trainer.models.comfy import latent_patch, takes_frame_rate, token_count_mu


class LTXV:  # ComfyUI's config class, by name
    pass


class LTXAV(LTXV):  # LTX-2: another sampling rule, not inherited
    pass


@pytest.mark.parametrize("tokens,mu", [(1024, 0.95), (4096, 2.05), (2560, 1.5), (8, 0.95 - 1016 * 1.1 / 3072)])
def test_ltxv_shift_by_token_count(tokens: int, mu: float) -> None:
    assert token_count_mu(LTXV(), (1, 128, tokens, 1, 1)) == pytest.approx(mu)
    assert token_count_mu(LTXV(), (1, 128, 2, tokens // 2, 1)) == pytest.approx(mu)  # every latent cell counts


def test_other_configs_have_no_token_count_shift() -> None:
    assert token_count_mu(LTXAV(), (1, 128, 2, 4, 4)) is None


class Patchifier:
    patch_size = (1, 1, 1)


class LTXLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patchifier = Patchifier()

    def forward(self, x, timestep, context, attention_mask, frame_rate=25, **kwargs):
        return x


class FluxLike(nn.Module):
    def forward(self, x, timestep, context, y=None, guidance=None, **kwargs):
        return x


def test_patch_from_config_else_model() -> None:
    assert latent_patch({}, LTXLike()) == 1
    assert latent_patch({"patch_size": [1, 2, 2]}, LTXLike()) == 2  # the config wins
    assert latent_patch({}, FluxLike()) == 2


def test_frame_rate_taken_by_models_that_read_it() -> None:
    assert takes_frame_rate(LTXLike())
    assert not takes_frame_rate(FluxLike())
