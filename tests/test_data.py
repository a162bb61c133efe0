from dataclasses import replace
import logging
import random

import pytest
import torch
from PIL import Image

from trainer.config import DatasetConfig
from trainer.data.buckets import bucket_for, bucket_sizes
from trainer.data.captions import apply_trigger, shuffle_tokens, training_caption
from trainer.data.dataset import BatchPlan, captions_for_batch, load_pixels, scan_dataset
from trainer.errors import DatasetError

from helpers import make_images


def test_trigger_word():
    assert apply_trigger("a photo of [trigger] smiling", "sks") == "a photo of sks smiling"
    assert apply_trigger("a photo", "sks") == "sks, a photo"
    assert apply_trigger("sks in a hat", "sks") == "sks in a hat"
    assert apply_trigger("[trigger], a hat", None) == "a hat"


def test_shuffle_keeps_leading_tokens():
    rng = random.Random(0)
    caps = {shuffle_tokens("sks, a, b, c, d, e", 1, rng) for _ in range(20)}
    assert all(c.startswith("sks, ") for c in caps) and len(caps) > 1
    assert sorted(caps.pop().split(", ")) == sorted("sks, a, b, c, d, e".split(", "))


def test_caption_dropout_rate():
    rng = random.Random(0)
    out = [training_caption("x", rng, 0.5, False, 0) for _ in range(2000)]
    assert 0.4 < out.count("") / 2000 < 0.6


def test_buckets_never_upscale_and_divisible():
    for w, h in [(1024, 1024), (1200, 800), (300, 900), (512, 512), (100, 60), (4000, 1000)]:
        bw, bh = bucket_for(w, h, 512, 16)
        assert bw % 16 == 0 and bh % 16 == 0
        assert bw <= w and bh <= h, (w, h, bw, bh)
        assert bw * bh <= 512 * 512
    assert bucket_for(1024, 1024, 512, 16) == (512, 512)
    bw, bh = bucket_for(1536, 1024, 512, 16)
    assert abs(bw / bh - 1.5) < 0.1
    assert all(w * h <= 512 * 512 for w, h in bucket_sizes(512, 16))


def test_scan_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"datasets\[0\].folder_path: folder .* does not exist"):
        scan_dataset(DatasetConfig(folder_path=str(tmp_path / "nope")), 0, None, 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        scan_dataset(DatasetConfig(folder_path=str(tmp_path / "empty")), 0, None, 16)
    make_images(tmp_path / "nocap", n=2, captions=False)
    with pytest.raises(DatasetError, match=r"2 files have no .txt caption \(img_0.png, img_1.png\)"):
        scan_dataset(DatasetConfig(folder_path=str(tmp_path / "nocap")), 0, None, 16)
    ds = scan_dataset(DatasetConfig(folder_path=str(tmp_path / "nocap"), default_caption="a thing"), 0, "sks", 16)
    assert [m.caption for m in ds.media] == ["sks, a thing"] * 2


def test_corrupt_images_skipped_with_warning(tmp_path, caplog):
    folder = make_images(tmp_path / "d", n=2)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (folder / "broken.txt").write_text("x")
    good = folder / "img_0.png"
    (folder / "trunc.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (folder / "trunc.txt").write_text("x")
    with caplog.at_level(logging.WARNING, logger="trainer"):
        ds = scan_dataset(DatasetConfig(folder_path=str(folder)), 0, None, 16)
    assert len(ds.media) == 2
    assert "broken.png" in caplog.text and "trunc.png" in caplog.text
    for f in folder.glob("img_*.png"):
        f.write_bytes(b"junk")
    with pytest.raises(DatasetError, match="could be read"):
        scan_dataset(DatasetConfig(folder_path=str(folder)), 0, None, 16)


def test_entries_repeats_flip_and_multi_resolution(tmp_path):
    folder = make_images(tmp_path / "d", n=2, size=(64, 48))
    cfg = DatasetConfig(folder_path=str(folder), resolution=[32, 64], flip_x=True, num_repeats=3)
    ds = scan_dataset(cfg, 0, None, 16)
    assert len(ds.entries) == 2 * 2 * 2
    assert {e.bucket for e in ds.entries} == {(32, 32), (64, 48)}
    plan = BatchPlan([ds], batch_size=2, seed=1)
    assert plan.batches_per_epoch == sum((len(g) + 1) // 2 for g in plan.groups)
    for b in plan.epoch(0):
        assert len({it.entry.bucket for it in b}) == 1  # batches stay within a bucket
    assert plan.epoch(3) == BatchPlan([ds], 2, 1).epoch(3)  # pure function of (seed, epoch)
    assert plan.epoch(0) != plan.epoch(1)
    e = next(x for x in ds.entries if x.flip)
    a = load_pixels(ds.media[e.item], replace(e, flip=False))
    b = load_pixels(ds.media[e.item], e)
    assert torch.equal(a.flip(-1), b) and a.min() >= -1 and a.max() <= 1


def test_captions_for_batch_deterministic(tmp_path):
    folder = make_images(tmp_path / "d", n=3)
    cfg = DatasetConfig(folder_path=str(folder), caption_dropout_rate=0.5, shuffle_tokens=True)
    ds = scan_dataset(cfg, 0, "sks", 16)
    plan = BatchPlan([ds], 1, 0)
    a = [captions_for_batch([ds], plan.batch(i), 0, i) for i in range(10)]
    b = [captions_for_batch([ds], plan.batch(i), 0, i) for i in range(10)]
    assert a == b and any(c == [""] for c in a)


def test_exif_orientation_respected(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    img = Image.new("RGB", (48, 32), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(folder / "r.jpg", exif=exif)
    (folder / "r.txt").write_text("x")
    ds = scan_dataset(DatasetConfig(folder_path=str(folder), resolution=[64]), 0, None, 16)
    assert (ds.media[0].width, ds.media[0].height) == (32, 48)


def _one_image_folder(tmp_path, img: Image.Image, name: str = "a.png", caption: bytes = b"x") -> "Path":
    folder = tmp_path / "d"
    folder.mkdir(exist_ok=True)
    img.save(folder / name)
    (folder / name).with_suffix(".txt").write_bytes(caption)
    return folder


def test_16_bit_png_converted_by_its_depth(tmp_path):
    import numpy as np

    from trainer.data.media import load_rgb

    ramp = (np.arange(64, dtype=np.uint32).reshape(1, 64).repeat(8, 0) * 1040).astype(np.uint16)  # 0 .. 65520
    im = Image.fromarray(ramp)
    im.save(tmp_path / "depth.png")
    assert Image.open(tmp_path / "depth.png").mode.startswith("I")
    got = np.asarray(load_rgb(tmp_path / "depth.png"))[0, :, 0].astype(int)
    want = np.round(ramp[0] / 65535 * 255).astype(int)
    assert np.abs(got - want).max() <= 1  # not clipped white: 8-bit by the real depth
    assert got[0] == 0 and 120 < got[32] < 140 and got[-1] > 250


def test_transparent_pixels_composited_on_white(tmp_path):
    import numpy as np

    from trainer.data.media import load_rgb

    im = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # red under full transparency
    im.paste((0, 0, 255, 255), (0, 0, 8, 16))  # opaque blue on the left
    im.save(tmp_path / "a.png")
    arr = np.asarray(load_rgb(tmp_path / "a.png"))
    assert (arr[:, :8] == [0, 0, 255]).all() and (arr[:, 8:] == 255).all()


def test_caption_encodings(tmp_path, caplog):
    texts = {"bom": ("a café, ümlaut".encode("utf-8-sig"), "a café, ümlaut"),
             "utf16": ("a café".encode("utf-16"), "a café"),
             "utf16_nobom": ("a café, two".encode("utf-16-le"), "a café, two"),
             "latin": ("a café – naïve".encode("cp1252"), "a café – naïve"),
             "plain": ("a dog".encode(), "a dog")}
    folder = tmp_path / "d"
    for name, (raw, _) in texts.items():
        _one_image_folder(tmp_path, Image.new("RGB", (32, 32)), f"{name}.png", raw)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        ds = scan_dataset(DatasetConfig(folder_path=str(folder), resolution=[32]), 0, None, 16)
    got = {m.path.stem: m.caption for m in ds.media}
    assert got == {k: v for k, (_, v) in texts.items()}
    assert "2 captions are not UTF-8" in caplog.text
    assert "latin.txt (read as cp1252)" in caplog.text and "utf16_nobom.txt (read as utf-16-le)" in caplog.text
    assert " bom.txt" not in caplog.text and "plain.txt" not in caplog.text


def test_small_image_trains_once_across_resolutions(tmp_path):
    folder = make_images(tmp_path / "d", n=1, size=(40, 40))
    make_images(tmp_path / "big", n=1, size=(160, 160))
    cfg = DatasetConfig(folder_path=str(folder), resolution=[32, 64, 128])
    small = scan_dataset(cfg, 0, None, 16)
    big = scan_dataset(replace(cfg, folder_path=str(tmp_path / "big")), 0, None, 16)
    assert [e.bucket for e in small.entries] == [(32, 32)]  # 64 and 128 would not upscale it: the same bucket
    assert sorted(e.bucket for e in big.entries) == [(32, 32), (64, 64), (128, 128)]


def test_huge_images_downscaled_on_load_and_said_once(tmp_path, monkeypatch, caplog):
    import trainer.data.media as media

    monkeypatch.setattr(media, "MAX_LOAD_PIXELS", 100 * 100)
    monkeypatch.setattr(media, "_said_downscaled", [])
    for name in ("a", "b"):
        Image.new("RGB", (400, 100), (10, 20, 30)).save(tmp_path / f"{name}.png")
    with caplog.at_level(logging.WARNING, logger="trainer"):
        a, b = media.load_rgb(tmp_path / "a.png"), media.load_rgb(tmp_path / "b.png")
    assert a.size == b.size == (200, 50)  # the aspect kept, the pixel count at the cap
    assert caplog.text.count("downscaled as they load") == 1
    assert Image.MAX_IMAGE_PIXELS is None  # PIL's decompression-bomb refusal is lifted: big photos load


def test_background_color_goes_under_transparency_and_keys_the_cache(tmp_path):
    from trainer.config import load_job_dict
    from trainer.data.cache import LatentCache
    from trainer.errors import ConfigError

    im = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    folder = _one_image_folder(tmp_path, im)
    white = scan_dataset(DatasetConfig(folder_path=str(folder), resolution=[32]), 0, None, 16)
    black = scan_dataset(DatasetConfig(folder_path=str(folder), resolution=[32], background_color="#000000"), 0, None, 16)
    assert (load_pixels(white.media[0], white.entries[0]) == 1).all()
    assert (load_pixels(black.media[0], black.entries[0]) == -1).all()
    cache = LatentCache([white, black], "vae")
    assert cache.key(white, white.entries[0]) != cache.key(black, black.entries[0])
    with pytest.raises(ConfigError, match=r"datasets\[0\].background_color: 'blak' is not a colour"):
        load_job_dict({"config": {"name": "n", "process": [{"model": {"name_or_path": "/x", "arch": "flux"},
                                                            "datasets": [{"folder_path": "/d",
                                                                          "background_color": "blak"}]}]}})
