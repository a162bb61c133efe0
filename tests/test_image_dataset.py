"""A dataset from in-memory images (the "Training Dataset (from images)" node's engine side): the folder it writes
holds the pixels and captions, pairs controls and masks by index, is named by its content (the same inputs write
nothing new, other captions another folder), refuses mismatched counts by name, and trains like a folder dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import job_dict, quiet
from trainer.config import load_job_dict
from trainer.data.from_tensors import split_captions, write_image_dataset
from trainer.errors import DatasetError
from trainer.job import build_trainer


def _images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 32, 48, 3, generator=torch.Generator().manual_seed(seed))  # ComfyUI's IMAGE: b, h, w, c


def test_writes_pixels_captions_controls_and_masks(tmp_path):
    imgs, ctrl = _images(), _images(1, seed=1)
    masks = torch.zeros(3, 32, 48)
    masks[:, 8:20, 10:30] = 1.0
    out = write_image_dataset(tmp_path, imgs, ["a red cat", "a dog", ""], controls=ctrl, masks=masks)
    folder = Path(out["folder_path"])
    assert out["control_path"] == str(folder / "control") and out["mask_path"] == str(folder / "mask")
    for i in range(3):
        with Image.open(folder / f"{i:05d}.png") as im:
            px = torch.from_numpy(np.array(im)).float() / 255
        assert px.shape == (32, 48, 3) and (px - imgs[i]).abs().max() <= 0.5 / 255 + 1e-6
        with Image.open(folder / "control" / f"{i:05d}.png") as im:  # one control for all
            assert im.size == (48, 32)
        with Image.open(folder / "mask" / f"{i:05d}.png") as im:
            assert im.mode == "L" and im.getpixel((15, 10)) == 255 and im.getpixel((0, 0)) == 0
    assert (folder / "00001.txt").read_text(encoding="utf-8") == "a dog"
    assert (folder / "00002.txt").read_text(encoding="utf-8") == ""


def test_named_by_content(tmp_path):
    a = write_image_dataset(tmp_path, _images(), ["x", "y", "z"])["folder_path"]
    mtime = (Path(a) / "00000.png").stat().st_mtime_ns
    assert write_image_dataset(tmp_path, _images(), ["x", "y", "z"])["folder_path"] == a
    assert (Path(a) / "00000.png").stat().st_mtime_ns == mtime
    assert write_image_dataset(tmp_path, _images(), ["x", "y", "w"])["folder_path"] != a
    assert write_image_dataset(tmp_path, _images(seed=5), ["x", "y", "z"])["folder_path"] != a


def test_counts_are_checked_by_name(tmp_path):
    assert split_captions("one for all", 3) == ["one for all"] * 3
    assert split_captions("a\nb\nc\n", 3) == ["a", "b", "c"]
    assert split_captions("", 2) == ["", ""]
    with pytest.raises(DatasetError, match="captions: 2 lines for 3 images"):
        split_captions("a\nb", 3)
    with pytest.raises(DatasetError, match="mask: 2 mask images for 3 images"):
        write_image_dataset(tmp_path, _images(), ["a"] * 3, masks=torch.zeros(2, 32, 48))
    with pytest.raises(DatasetError, match="images: expected an image batch"):
        write_image_dataset(tmp_path, torch.zeros(3, 32), ["a"] * 3)


def test_trains_like_a_folder_dataset(tiny_flux, tmp_path):
    out = write_image_dataset(tmp_path / "ds", _images(2), ["sks a red circle", "sks a blue square"])
    d = job_dict(tiny_flux, Path(out["folder_path"]), tmp_path / "run", steps=2, disable_sampling=True)
    trainer = build_trainer(load_job_dict(d), report=quiet)
    assert len(trainer.latents.mem) == 2
    trainer.train()
    assert (tmp_path / "run" / "run" / "run.safetensors").exists()
