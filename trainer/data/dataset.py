"""Dataset scanning (images, animated images and videos) and the per-step batch plan.

A dataset item is one file with its caption; an entry is one training example of it: a bucket size (width,
height), a frame count and the source frames of one clip, maybe mirrored. Entries of one (width, height, frames)
bucket batch together. Every random choice of a step (order, caption dropout, shuffled tags) derives from
(seed, step), so a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import DatasetConfig
from ..errors import DatasetError
from ..seeds import step_rng
from .buckets import bucket_for, resize_and_crop
from .captions import apply_trigger, read_caption, training_caption
from .media import (IMAGE_EXTS, MEDIA_EXTS, VIDEO_EXTS, WHITE, MediaError, MediaInfo, clip_indices, color_rgb,
                    load_rgb, probe, read_frames, resampled_length)

log = logging.getLogger("trainer")


@dataclass(frozen=True)
class Geometry:
    """What a family's latents require of the data: sides multiples of `factor`; clips of `temporal` * k + 1
    frames (temporal 1: images only); `fps`: the frame rate clips are resampled to by default."""

    factor: int
    temporal: int = 1
    fps: float | None = None

    @property
    def video(self) -> bool:
        return self.temporal > 1

    def snap(self, frames: int) -> int:
        if not self.video or frames <= 1:
            return 1
        return (frames - 1) // self.temporal * self.temporal + 1


@dataclass
class MediaFile:
    path: Path
    caption: str  # with the trigger applied
    info: MediaInfo
    digest: str  # content hash, keys the latent cache
    control: Path | None = None  # the control image or video of the same stem (datasets[].control_path)
    control_digest: str = ""
    mask: Path | None = None  # the mask image or video of the same stem (datasets[].mask_path: VACE)
    mask_digest: str = ""
    reference: Path | None = None  # the reference image of the same stem (datasets[].reference_path: VACE)
    reference_digest: str = ""
    background: tuple[int, int, int] = WHITE  # under transparent pixels (datasets[].background_color)

    @property
    def width(self) -> int:
        return self.info.width

    @property
    def height(self) -> int:
        return self.info.height


@dataclass(frozen=True)
class Entry:
    """One training example: an item at one bucket size and frame count (one clip of it), maybe mirrored."""

    item: int  # index into Dataset.media
    bucket: tuple[int, int]  # (width, height)
    flip: bool
    frames: int = 1
    indices: tuple[int, ...] = (0,)  # source frames of the clip (one for images)

    @property
    def key(self) -> tuple[int, int, int]:
        """Entries with the same key batch together."""
        return (*self.bucket, self.frames)


@dataclass
class Dataset:
    cfg: DatasetConfig
    media: list[MediaFile]
    entries: list[Entry] = field(default_factory=list)
    index: int = 0  # position in config.process[0].datasets


def _by_stem(folder: Path, exts: tuple[str, ...]) -> dict[str, Path]:
    """Files by stem; one stem in several formats: the first of `exts` wins, so the choice is stable."""
    found: dict[str, Path] = {}
    rank = {e: i for i, e in enumerate(exts)}
    for p in sorted(folder.iterdir(), key=lambda q: (q.stem, rank.get(q.suffix.lower(), 99))):
        if p.is_file() and p.suffix.lower() in rank:
            found.setdefault(p.stem, p)
    return found


def check_dataset_folder(cfg: DatasetConfig, index: int) -> list[Path]:
    """The dataset's media files; a missing or empty folder (or control folder) is an error naming the key.
    Cheap: called before any model file is opened."""
    key = f"config.process[0].datasets[{index}]"
    folder = Path(cfg.folder_path).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"{key}.folder_path: folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in MEDIA_EXTS)
    if not files:
        raise DatasetError(f"{key}.folder_path: no images ({', '.join(IMAGE_EXTS)}) or videos"
                           f" ({', '.join(VIDEO_EXTS)}) in {folder}")
    for name in ("control_path", "mask_path", "reference_path"):
        value = getattr(cfg, name)
        if value is not None and not Path(value).expanduser().is_dir():
            raise DatasetError(f"{key}.{name}: folder {value!r} does not exist")
    if cfg.default_caption is None:
        ext = cfg.caption_ext.lstrip(".")
        uncaptioned = [p.name for p in files if not p.with_suffix(f".{ext}").is_file()]
        if uncaptioned:
            raise DatasetError(f"{key}: {len(uncaptioned)} files have no .{ext} caption ({_shown(uncaptioned)}); add"
                               f" caption files or set {key}.default_caption")
    return files


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def frame_counts(cfg: DatasetConfig, geometry: Geometry, key: str) -> list[int]:
    """The dataset's frame buckets (`frames`, else `num_frames`), snapped to the family's rule with a warning."""
    wanted = sorted(set(cfg.frames or [cfg.num_frames]))
    snapped = sorted({geometry.snap(f) for f in wanted})
    if snapped != wanted:
        rule = f"{geometry.temporal}k+1" if geometry.video else "1 (an image model)"
        log.warning("%s: frame counts %s snapped to %s (the model takes %s frames)", key, wanted, snapped, rule)
    return snapped


def scan_dataset(cfg: DatasetConfig, index: int, trigger: str | None, geometry: Geometry | int) -> Dataset:
    geometry = geometry if isinstance(geometry, Geometry) else Geometry(int(geometry))
    key = f"config.process[0].datasets[{index}]"
    folder = Path(cfg.folder_path).expanduser()
    files = check_dataset_folder(cfg, index)
    controls = _by_stem(Path(cfg.control_path).expanduser(), MEDIA_EXTS) if cfg.control_path is not None else None
    masks = _by_stem(Path(cfg.mask_path).expanduser(), MEDIA_EXTS) if cfg.mask_path is not None else None
    refs = _by_stem(Path(cfg.reference_path).expanduser(), IMAGE_EXTS) if cfg.reference_path is not None else None
    background = color_rgb(cfg.background_color, f"{key}.background_color")
    media: list[MediaFile] = []
    unreadable: list[str] = []
    no_control: list[str] = []
    no_reference: list[str] = []
    videos_skipped: list[str] = []
    not_utf8: list[str] = []
    for p in files:
        try:
            info = probe(p)
        except MediaError as e:
            unreadable.append(p.name)
            log.warning("skipping unreadable %s %s (%s)", "video" if p.suffix.lower() in VIDEO_EXTS else "image", p, e)
            continue
        if info.is_video and not geometry.video:
            videos_skipped.append(p.name)
            continue
        read = read_caption(p, cfg.caption_ext)
        if read is None:  # check_dataset_folder refused uncaptioned files unless there is a default caption
            cap = cfg.default_caption or ""
        else:
            cap, guessed = read
            if guessed:
                not_utf8.append(f"{p.with_suffix('.' + cfg.caption_ext.lstrip('.')).name} (read as {guessed})")
        item = MediaFile(p, apply_trigger(cap, trigger), info, hashlib.sha256(p.read_bytes()).hexdigest()[:24],
                         background=background)
        if controls is not None:
            ctrl = controls.get(p.stem)
            if ctrl is None:
                no_control.append(p.name)
                continue
            try:
                probe(ctrl)
            except MediaError as e:
                kind = "video" if ctrl.suffix.lower() in VIDEO_EXTS else "image"
                raise DatasetError(f"{key}.control_path: control {kind} {ctrl} cannot be read ({e})") from None
            item.control = ctrl
            item.control_digest = hashlib.sha256(ctrl.read_bytes()).hexdigest()[:24]
        if masks is not None:
            mask = masks.get(p.stem)
            if mask is not None:  # an item without a mask is the whole frame (VACE's default)
                try:
                    probe(mask)
                except MediaError as e:
                    raise DatasetError(f"{key}.mask_path: mask {mask} cannot be read ({e})") from None
                item.mask = mask
                item.mask_digest = hashlib.sha256(mask.read_bytes()).hexdigest()[:24]
        if refs is not None:
            ref = refs.get(p.stem)
            if ref is None:
                no_reference.append(p.name)
                continue
            try:
                probe(ref)
            except MediaError as e:
                raise DatasetError(f"{key}.reference_path: reference image {ref} cannot be read ({e})") from None
            item.reference = ref
            item.reference_digest = hashlib.sha256(ref.read_bytes()).hexdigest()[:24]
        media.append(item)
    if not_utf8:
        log.warning("%s: %d captions are not UTF-8 and were decoded by a guess; check them, or save them as UTF-8:"
                    " %s", key, len(not_utf8), _shown(not_utf8))
    if videos_skipped:
        log.warning("%s: %d videos skipped (%s): this model trains images", key, len(videos_skipped),
                    _shown(videos_skipped))
    if no_control:
        # a control folder that misses images is more likely a naming mistake than a wish to train some
        # items without control (that is control_dropout, or a second dataset without control_path)
        raise DatasetError(
            f"{key}.control_path: {len(no_control)} images have no control image of the same name in"
            f" {cfg.control_path} ({_shown(no_control)})"
        )
    if no_reference:
        # a reference frame is part of what the item trains on: items with and without one cannot share a batch
        raise DatasetError(
            f"{key}.reference_path: {len(no_reference)} items have no reference image of the same name in"
            f" {cfg.reference_path} ({_shown(no_reference)}); put items without one in a dataset of their own"
        )
    if not media:
        raise DatasetError(f"{key}: none of the {len(files)} files in {folder} could be read ({_shown(unreadable)})")
    ds = Dataset(cfg, media, index=index)
    ds.entries = _entries(ds, geometry, key)
    if not ds.entries:
        raise DatasetError(f"{key}: no image or clip is large (or long) enough to train on")
    return ds


def _entries(ds: Dataset, geometry: Geometry, key: str) -> list[Entry]:
    cfg = ds.cfg
    counts = frame_counts(cfg, geometry, key) if geometry.video else [1]
    fps = cfg.fps if cfg.fps is not None else geometry.fps
    out: list[Entry] = []
    short: list[str] = []
    for i, m in enumerate(ds.media):
        buckets = []
        for res in sorted(set(cfg.resolution)):
            if cfg.max_pixels_per_frame:
                res = min(res, int(cfg.max_pixels_per_frame ** 0.5))
            b = bucket_for(m.width, m.height, res, geometry.factor)
            if b == (0, 0):
                log.warning("skipping %s: smaller than %d px", m.path, geometry.factor)
            elif b not in buckets:  # an image smaller than several resolutions trains once, not once per resolution
                buckets.append(b)
        clips: list[tuple[int, tuple[int, ...]]] = []
        if not m.info.is_video:
            clips = [(1, (0,))]
        else:
            have = resampled_length(m.info, fps)
            for f in counts:
                use = f if f <= have else geometry.snap(have)
                if use < f:
                    short.append(f"{m.path.name} ({have} frames at {fps or m.info.fps:g} fps < {f}; {use} used)")
                n_clips = 1 if cfg.shrink_video_to_frames or use == 1 else cfg.clips_per_video
                for c in range(n_clips):
                    idx = tuple(clip_indices(m.info, fps, use, cfg.shrink_video_to_frames, c, n_clips))
                    if (use, idx) not in clips:
                        clips.append((use, idx))
        for b in buckets:
            for frames, idx in clips:
                for flip in (False, True) if cfg.flip_x else (False,):
                    out.append(Entry(i, b, flip, frames, idx))
    if short:
        log.warning("%s: %d clips shorter than asked: %s", key, len(short), _shown(short))
    return out


def fit_pixels(img: Image.Image, size: tuple[int, int], flip: bool) -> torch.Tensor:
    """An image scaled to cover `size` (width, height), center-cropped, maybe mirrored: (3, h, w) in [-1, 1]."""
    img = resize_and_crop(img, *size)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def image_pixels(path: Path, size: tuple[int, int], flip: bool = False,
                 background: tuple[int, int, int] = WHITE) -> torch.Tensor:
    """An image file scaled to cover `size` (width, height) and center-cropped to it: (3, h, w) in [-1, 1]."""
    return fit_pixels(load_rgb(path, background), size, flip)


def load_pixels(item: MediaFile, entry: Entry) -> torch.Tensor:
    """The entry's pixels in [-1, 1]: (3, h, w) for an image, (3, f, h, w) for a clip."""
    if not item.info.is_video:
        return image_pixels(item.path, entry.bucket, entry.flip, item.background)
    frames = read_frames(item.path, list(entry.indices), item.background)
    return torch.stack([fit_pixels(f, entry.bucket, entry.flip) for f in frames], dim=1)


def load_control_pixels(item: MediaFile, entry: Entry) -> torch.Tensor:
    """The item's control in the same bucket (and mirrored with it), in [-1, 1]: a control image (3, h, w); a control
    video (3, f, h, w) at the entry's own frames (the same clip as the training item)."""
    if item.control is None:
        raise ValueError(f"{item.path} has no control image")
    return _companion_pixels(item.control, entry, item.background)


def load_mask_pixels(item: MediaFile, entry: Entry) -> torch.Tensor | None:
    """The item's mask (VACE: 1 where the model generates) in [0, 1]: (1, [f,] h, w), or None without one."""
    if item.mask is None:
        return None
    return mask_of_pixels(_companion_pixels(item.mask, entry, WHITE))  # a mask's transparency is "generate"


def mask_of_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """A mask image's pixels (3, [f,] h, w) in [-1, 1] as a mask (1, [f,] h, w) in [0, 1]: white is 1."""
    return ((pixels.mean(dim=0, keepdim=True) + 1) / 2).clamp(0, 1)


def load_reference_pixels(item: MediaFile, entry: Entry) -> torch.Tensor | None:
    """The item's reference image (VACE) at the entry's size, scaled and center-cropped as ComfyUI's WanVaceToVideo
    frames it (and mirrored with the item), in [-1, 1]: (3, h, w), or None without one."""
    if item.reference is None:
        return None
    return image_pixels(item.reference, entry.bucket, entry.flip, item.background)


def _companion_pixels(path: Path, entry: Entry, background: tuple[int, int, int]) -> torch.Tensor:
    """A file that goes with a training item (control, mask): an image as it is, a video at the entry's frames."""
    info = probe(path)
    if not info.is_video:
        return image_pixels(path, entry.bucket, entry.flip, background)
    indices = [min(i, info.frames - 1) for i in entry.indices]
    frames = read_frames(path, indices, background)
    return torch.stack([fit_pixels(f, entry.bucket, entry.flip) for f in frames], dim=1)


@dataclass(frozen=True)
class BatchItem:
    dataset: int
    entry: Entry


class BatchPlan:
    """Batches of same-bucket entries; an epoch's order is a pure function of (seed, epoch)."""

    def __init__(self, datasets: list[Dataset], batch_size: int, seed: int) -> None:
        self.seed = seed
        self.batch_size = batch_size
        groups: dict[tuple, list[BatchItem]] = {}
        for di, ds in enumerate(datasets):
            # items with a reference frame (VACE) train on one latent frame more: they batch only with their kind
            kind = (ds.cfg.reference_path is not None,)
            for e in ds.entries:
                for _ in range(ds.cfg.num_repeats):
                    groups.setdefault((*e.key, *kind), []).append(BatchItem(di, e))
        self.groups = [groups[k] for k in sorted(groups)]
        self.batches_per_epoch = sum((len(g) + batch_size - 1) // batch_size for g in self.groups)

    def epoch(self, epoch: int) -> list[list[BatchItem]]:
        rng = step_rng(self.seed, 0xE90C, epoch)
        batches = []
        for g in self.groups:
            items = list(g)
            rng.shuffle(items)
            batches += [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def batch(self, index: int) -> list[BatchItem]:
        """The `index`-th batch of the run (counting micro-batches across epochs)."""
        e, i = divmod(index, self.batches_per_epoch)
        if getattr(self, "_cached_epoch", None) != e:
            self._cached = self.epoch(e)
            self._cached_epoch = e
        return self._cached[i]


def control_dropped(datasets: list[Dataset], batch: list[BatchItem], seed: int, index: int,
                    first: int = 0) -> list[bool]:
    """Which items of the `index`-th batch train without their control image (datasets[].control_dropout).
    `first`: where `batch` starts in the whole batch (a rank's share: its draws are the whole batch's)."""
    out = []
    for j, it in enumerate(batch, first):
        rate = datasets[it.dataset].cfg.control_dropout
        out.append(rate > 0 and step_rng(seed, 0xC7A1, index, j).random() < rate)
    return out


def captions_for_batch(datasets: list[Dataset], batch: list[BatchItem], seed: int, index: int,
                       first: int = 0) -> list[str]:
    """The training captions of the `index`-th batch (dropout, shuffling); `first` as in control_dropped."""
    out = []
    for j, it in enumerate(batch, first):
        ds = datasets[it.dataset]
        rng = step_rng(seed, 0xCA9, index, j)
        cap = ds.media[it.entry.item].caption
        out.append(training_caption(cap, rng, ds.cfg.caption_dropout_rate, ds.cfg.shuffle_tokens, ds.cfg.keep_tokens))
    return out
