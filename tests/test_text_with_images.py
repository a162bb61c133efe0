"""Families whose text encoder reads the item's control image with its caption (text_takes_images: Qwen-Image-Edit on
ComfyUI's MODEL) get, at every step, each caption encoded with its own item's control image: cached per item (and per
caption it may train with: its own, the empty one under caption dropout), the caption alone where control_dropout
drops the control or the item has none; uncached, the same encodings each step; previews read the prompts with
their control image. The text encoder here is the tiny Flex.2's (a family that takes control images) with the image's
mean added to its pooled vector, so which image went in (or none) shows; the end-to-end run on ComfyUI's own
Qwen-Image-Edit is integration/test_comfyui_train_families.py (qwen_image_edit)."""

from __future__ import annotations

import types

import pytest
import torch

from helpers import job_dict, make_images, quiet
from test_flex2 import _control_image, _controls_for, tiny_flex2  # noqa: F401  (the fixture)
from trainer.config import load_job_dict
from trainer.errors import ConfigError
from trainer.data.cache import TextCache
from trainer.data.dataset import captions_for_batch, control_dropped
from trainer.job import build_trainer
from trainer.config import ModelConfig
from trainer.models import registry


def image_mark(image: torch.Tensor | None) -> float:
    return 0.0 if image is None else 10.0 + float(image.mean())


def _reading_images(cfg: dict):
    """The tiny Flex.2 with a text encoder that reads images: the pooled vector shifted by image_mark."""
    mc = ModelConfig(**{k: v for k, v in cfg.items() if k != "arch"})
    model = registry.get_family("flex2").load(mc, "cpu", torch.float32)

    def encode_text_with_images(self, captions, images):
        out = self.encode_text(captions)
        out["pooled"] = out["pooled"] + torch.tensor([image_mark(i) for i in images])[:, None]
        return out

    model.text_takes_images = True
    model.encode_text_with_images = types.MethodType(encode_text_with_images, model)
    return model


def _trainer(cfg, tmp_path, cached: bool):
    """Two items with control images (control and caption dropout at 0.5) and a dataset of one without."""
    images = make_images(tmp_path / "data", n=2, size=(32, 32))
    controls = _controls_for(images, tmp_path / "ctrl")
    plain = make_images(tmp_path / "plain", n=1, size=(32, 32), seed=3)
    d = job_dict(cfg, images, tmp_path / f"out_{cached}", steps=1, cache_text_embeddings=cached, disable_sampling=True)
    datasets = d["config"]["process"][0]["datasets"]
    datasets[0].update(control_path=str(controls), control_dropout=0.5, caption_dropout_rate=0.5)
    datasets.append({"folder_path": str(plain), "caption_ext": "txt", "resolution": [32], "caption_dropout_rate": 0.5})
    return build_trainer(load_job_dict(d), report=quiet, model=_reading_images(cfg), keep_text_encoders=True)


@pytest.mark.parametrize("cached", [True, False])
def test_each_caption_reads_its_items_control_image(tiny_flex2, tmp_path, cached):  # noqa: F811
    trainer = _trainer(tiny_flex2, tmp_path, cached)
    if cached:  # per item with a control image: its caption and the empty one (caption dropout), with the image
        assert len([k for k in trainer.texts.mem if "\x00" in k]) == 2 * 2
    seen = set()
    for micro in range(24):
        batch = trainer.plan.batch(micro)
        captions = captions_for_batch(trainer.datasets, batch, 7, micro)
        cond = trainer._conditioning(captions, batch, micro)
        dropped = control_dropped(trainer.datasets, batch, 7, micro)
        for j, (it, caption, drop) in enumerate(zip(batch, captions, dropped)):
            m = trainer.datasets[it.dataset].media[it.entry.item]
            image = None if drop or m.control is None else trainer.latents.control_pixels(it)
            plain = trainer.model.encode_text([caption])["pooled"][0]
            shift = cond["pooled"][j] - plain
            assert torch.allclose(shift, torch.full_like(shift, image_mark(image)), atol=1e-4), (micro, j)
            seen.add((m.control is not None, image is not None, caption == ""))
    # every case came up: kept and dropped controls, items without one, captions and dropped captions
    assert {(c, i) for c, i, _ in seen} == {(True, True), (True, False), (False, False)}
    assert {e for _, _, e in seen} == {True, False}


def test_image_key_is_per_item_and_caption() -> None:
    assert TextCache.image_key("a cat", "k1") != TextCache.image_key("a cat", "k2")
    assert TextCache.image_key("", "k1") != TextCache.image_key("a cat", "k1")


def test_previews_read_their_prompts_with_the_control_image(tiny_flex2, tmp_path):  # noqa: F811
    images = make_images(tmp_path / "data", n=1, size=(32, 32))
    c = _control_image(tmp_path / "c.png", (64, 64), 3)
    d = job_dict(tiny_flex2, images, tmp_path / "out", steps=1)
    d["config"]["process"][0]["sample"] = {"width": 32, "height": 32, "sample_steps": 2, "samples": [
        {"prompt": "a cat", "neg": "blurry", "ctrl_img": str(c)}, {"prompt": "a dog"}]}
    trainer = build_trainer(load_job_dict(d), report=quiet, model=_reading_images(tiny_flex2), keep_text_encoders=True)
    with_ctrl, without = trainer.samples
    assert "control" in with_ctrl.request.cond and "control" not in without.request.cond
    from trainer.data.cache import _preview_image

    mark = image_mark(_preview_image(str(c), (32, 32), "k", "control_image"))
    for cond, prompt in ((with_ctrl.request.cond, "a cat"), (with_ctrl.request.neg_cond, "blurry")):
        shift = cond["pooled"][0] - trainer.model.encode_text([prompt])["pooled"][0]
        assert torch.allclose(shift, torch.full_like(shift, mark), atol=1e-4)  # positive and negative read it
    shift = without.request.cond["pooled"][0] - trainer.model.encode_text(["a dog"])["pooled"][0]
    assert torch.allclose(shift, torch.zeros_like(shift), atol=1e-5)


def test_text_image_node_is_refused_off_comfyuis_model(tiny_flex2, tmp_path):  # noqa: F811
    """model.text_image_node names a ComfyUI node: an engine family refuses it from the job, before any file opens,
    and a name that is not one of those nodes is refused with the choices."""
    folder = make_images(tmp_path / "data", n=1)
    d = job_dict(dict(tiny_flex2, text_image_node="TextEncodeQwenImageEdit"), folder, tmp_path)
    with pytest.raises(ConfigError, match="model.text_image_node: not used by model.arch 'flex2'"):
        load_job_dict(d)
    d = job_dict(dict(tiny_flex2, text_image_node="CLIPTextEncode"), folder, tmp_path)
    with pytest.raises(ConfigError, match="text_image_node.*TextEncodeQwenImageEditPlus"):
        load_job_dict(d)
