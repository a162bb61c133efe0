"""The ComfyUI backend takes reference images (datasets[].control_path) for the ComfyUI models whose extra_conds read
`reference_latents` (OmniGen2, Flux.2, Qwen-Image), and refuses them, naming ComfyUI's model, for the others.
ComfyUI itself is not needed: the checks read the class names (the end-to-end run is
integration/test_comfyui_train_families.py, omnigen2)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from trainer.data.cache import LatentCache
from trainer.errors import DatasetError
from trainer.models.comfy import takes_reference_latents


class BaseModel:
    pass


class Omnigen2(BaseModel):
    pass


class Flux(BaseModel):
    pass


class Flux2(Flux):
    pass


class QwenImage(BaseModel):
    pass


class MyQwenEdit(QwenImage):  # a subclass of one that takes them
    pass


@pytest.mark.parametrize("cls,want", [(Omnigen2, True), (Flux2, True), (QwenImage, True), (MyQwenEdit, True),
                                      (Flux, False), (BaseModel, False)])
def test_reference_latent_models(cls, want) -> None:
    assert takes_reference_latents(cls()) is want


def _model(base, takes: bool):
    return SimpleNamespace(backend="comfyui", base=base, arch=type(base).__name__.lower(), takes_control=takes,
                           takes_masks=False, takes_references=False, requires_conditions=lambda: None)


def _datasets():
    cfg = SimpleNamespace(mask_path=None, reference_path=None, control_path="/data/refs", do_i2v=False)
    return [SimpleNamespace(index=0, cfg=cfg)]


def test_control_path_on_comfy_models() -> None:
    cache = LatentCache(_datasets(), "vae")
    cache.check_model(_model(Omnigen2(), True))  # accepted
    with pytest.raises(DatasetError, match=r"datasets\[0\]\.control_path: ComfyUI's Flux MODEL takes no reference"
                                           r" images \(ComfyUI's OmniGen2, Flux.2 and Qwen-Image models take them"):
        cache.check_model(_model(Flux(), False))
