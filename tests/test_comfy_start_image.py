"""The ComfyUI backend's start images (image-to-video) for the ComfyUI models whose start image a latent node of
ComfyUI's builds (Wan 2.2 TI2V 5B: Wan22ImageToVideoLatent): which models, and the conditions cached from the node's
LATENT. ComfyUI itself is not needed (the end-to-end run, the node included, is
integration/test_comfyui_train_families.py, wan22_5b)."""

from __future__ import annotations

import pytest
import torch

from trainer.models.comfy import start_conditions, start_image_node_name


class BaseModel:
    pass


class WAN21(BaseModel):
    pass


class WAN22(WAN21):
    pass


class MyWan22(WAN22):  # a subclass of one that takes them
    pass


@pytest.mark.parametrize("cls,want", [(WAN22, ("comfy_extras.nodes_wan", "Wan22ImageToVideoLatent")),
                                      (MyWan22, ("comfy_extras.nodes_wan", "Wan22ImageToVideoLatent")),
                                      (WAN21, None), (BaseModel, None)])
def test_start_image_models(cls, want) -> None:
    assert start_image_node_name(cls()) == want


MEAN, SCALE = 0.5, 2.0  # a latent format: process_in(z) = (z - MEAN) * SCALE


def _process_in(z: torch.Tensor) -> torch.Tensor:
    return (z - MEAN) * SCALE


def _node_latent(frames: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A LATENT as the node returns it: the start image's raw latent in the first frame, the raw value of a
    normalized 0 (process_out(0)) in the frames to generate, and its noise_mask (0 on the start frame)."""
    raw = torch.arange(4 * 2 * 2, dtype=torch.float32).reshape(1, 4, 1, 2, 2)
    samples = torch.full((1, 4, frames, 2, 2), MEAN)
    samples[:, :, :1] = raw
    mask = torch.ones(1, 1, frames, 2, 2)
    mask[:, :, :1] = 0
    return samples, mask, raw


def test_start_conditions_from_the_node_latent() -> None:
    samples, mask, raw = _node_latent()
    c = start_conditions(samples, mask, _process_in, one_frame=False)
    assert c["start_latent"].shape == (4, 3, 2, 2) and c["start_given"].shape == (1, 3, 2, 2)
    assert torch.equal(c["start_latent"][:, :1], _process_in(raw)[0])  # the start frame, normalized
    assert torch.count_nonzero(c["start_latent"][:, 1:]) == 0  # the frames to generate: a normalized 0
    assert c["start_given"][0, :, 0, 0].tolist() == [1.0, 0.0, 0.0]  # given on the start frame only


def test_one_frame_item_is_not_given() -> None:
    """An image item (one frame) is all start image: nothing to generate, so it trains as without one."""
    samples, mask, _ = _node_latent(frames=1)
    c = start_conditions(samples, mask, _process_in, one_frame=True)
    assert torch.count_nonzero(c["start_given"]) == 0
