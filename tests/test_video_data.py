"""Video datasets, family-neutral: decoding, frame-rate resampling, frame snapping, clips and buckets, the latent
cache keys of clips, and bad videos."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config import DatasetConfig
from trainer.data.dataset import Geometry, load_pixels, scan_dataset
from trainer.data.media import clip_indices, probe, read_frames, resampled_length
from trainer.demo.videos import make_video_dataset, write_video
from trainer.errors import DatasetError

WAN = Geometry(16, 4, 16.0)  # Wan's rules: sides of 16, 4k+1 frames, 16 fps


def _counter_video(path, n: int, fps: float, size=(32, 32)):
    """Frame i is a flat gray of value 8 i: decoded frames say which source frame they are."""
    return write_video(path, [Image.new("RGB", size, (8 * i,) * 3) for i in range(n)], fps)


def _frame_number(img: Image.Image) -> int:
    return int(round(np.asarray(img, dtype=np.float32).mean() / 8))


def test_probe_and_decode_exact_frames(tmp_path):
    p = _counter_video(tmp_path / "c.mp4", 30, 24)
    info = probe(p)
    assert (info.width, info.height, info.frames, info.fps) == (32, 32, 30, 24.0)
    frames = read_frames(p, [0, 5, 5, 29])
    assert [_frame_number(f) for f in frames] == [0, 5, 5, 29]


def test_fps_resampling_windows_and_shrink(tmp_path):
    info = probe(_counter_video(tmp_path / "c.mp4", 48, 24))  # 2 s at 24 fps
    assert resampled_length(info, 12) == 24 and resampled_length(info, None) == 48
    # at 12 fps every other source frame; a window of 5 starting at the beginning
    assert clip_indices(info, 12, 5, False, 0, 1) == [0, 2, 4, 6, 8]
    # three windows spread over the clip: the last ends at the clip's end
    starts = [clip_indices(info, 12, 5, False, c, 3)[0] for c in range(3)]
    assert starts == [0, 20, 38] and clip_indices(info, 12, 5, False, 2, 3)[-1] == 46
    # shrink: 5 frames over the whole clip
    assert clip_indices(info, 12, 5, True, 0, 1) == [0, 12, 23, 35, 46]


def test_entries_snap_frames_buckets_and_clips(tmp_path, caplog):
    folder = make_video_dataset(tmp_path / "v", n=2, size=(64, 48), frames=40, fps=16)
    Image.new("RGB", (48, 64), (10, 20, 30)).save(folder / "still.png")
    (folder / "still.txt").write_text("a still")
    cfg = DatasetConfig(folder_path=str(folder), resolution=[32], frames=[8, 17], shrink_video_to_frames=False,
                        clips_per_video=2)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        ds = scan_dataset(cfg, 0, None, WAN)
    assert "frame counts [8, 17] snapped to [5, 17]" in caplog.text
    videos = [e for e in ds.entries if ds.media[e.item].info.is_video]
    assert sorted({e.frames for e in videos}) == [5, 17] and len(videos) == 2 * 2 * 2  # 2 videos x 2 counts x 2 clips
    assert all(len(e.indices) == e.frames for e in videos)
    still = [e for e in ds.entries if not ds.media[e.item].info.is_video]
    assert len(still) == 1 and still[0].frames == 1 and still[0].key == (*still[0].bucket, 1)
    clip = load_pixels(ds.media[videos[0].item], videos[0])
    assert clip.shape == (3, 17 if videos[0].frames == 17 else 5, videos[0].bucket[1], videos[0].bucket[0])
    assert load_pixels(ds.media[still[0].item], still[0]).dim() == 3


def test_short_clips_use_what_they_have(tmp_path, caplog):
    folder = tmp_path / "v"
    _counter_video(folder / "short.mp4", 10, 16)
    (folder / "short.txt").write_text("short")
    cfg = DatasetConfig(folder_path=str(folder), resolution=[32], num_frames=33)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        ds = scan_dataset(cfg, 0, None, WAN)
    assert [e.frames for e in ds.entries] == [9] and "shorter than asked" in caplog.text


def test_bad_videos_are_skipped_by_name_and_all_bad_is_an_error(tmp_path, caplog):
    folder = make_video_dataset(tmp_path / "v", n=1, frames=12)
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "empty.txt").write_text("x")
    (folder / "junk.webm").write_bytes(b"not a video at all")
    (folder / "junk.txt").write_text("x")
    with caplog.at_level(logging.WARNING, logger="trainer"):
        ds = scan_dataset(DatasetConfig(folder_path=str(folder), resolution=[32], num_frames=5), 0, None, WAN)
    assert len(ds.media) == 1
    assert "empty.mp4" in caplog.text and "junk.webm" in caplog.text
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.mp4").write_bytes(b"\x00" * 100)
    (bad / "a.txt").write_text("x")
    with pytest.raises(DatasetError, match="none of the 1 files"):
        scan_dataset(DatasetConfig(folder_path=str(bad)), 0, None, WAN)


def test_image_models_skip_videos_with_a_warning(tmp_path, caplog):
    folder = make_video_dataset(tmp_path / "v", n=1, frames=8)
    Image.new("RGB", (32, 32)).save(folder / "a.png")
    (folder / "a.txt").write_text("a")
    with caplog.at_level(logging.WARNING, logger="trainer"):
        ds = scan_dataset(DatasetConfig(folder_path=str(folder), resolution=[32]), 0, None, Geometry(16))
    assert [m.path.name for m in ds.media] == ["a.png"] and "1 videos skipped" in caplog.text


def test_animated_gif_is_a_clip(tmp_path):
    folder = tmp_path / "g"
    folder.mkdir()
    frames = [Image.new("RGB", (32, 32), (8 * i,) * 3) for i in range(9)]
    frames[0].save(folder / "a.gif", save_all=True, append_images=frames[1:], duration=62, loop=0)
    (folder / "a.txt").write_text("gif")
    ds = scan_dataset(DatasetConfig(folder_path=str(folder), resolution=[32], num_frames=5, fps=16), 0, None, WAN)
    assert ds.media[0].info.is_video and ds.entries[0].frames == 5
    clip = load_pixels(ds.media[0], ds.entries[0])
    assert clip.shape == (3, 5, 32, 32) and clip[:, 0].mean() < clip[:, -1].mean()


def test_clip_cache_keys_differ_by_clip_and_frames(tmp_path):
    from trainer.data.cache import LatentCache

    folder = make_video_dataset(tmp_path / "v", n=1, frames=40)
    cfg = DatasetConfig(folder_path=str(folder), resolution=[32], frames=[5, 9], shrink_video_to_frames=False,
                        clips_per_video=2, flip_x=True)
    ds = scan_dataset(cfg, 0, None, WAN)
    cache = LatentCache([ds], "vae")
    keys = {cache.key(ds, e) for e in ds.entries}
    assert len(keys) == len(ds.entries) == 2 * 2 * 2
    assert torch.equal(load_pixels(ds.media[0], ds.entries[0]), load_pixels(ds.media[0], ds.entries[0]))
