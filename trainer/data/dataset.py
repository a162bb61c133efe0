"""Dataset scanning and the per-step batch plan.

Every random choice of a step (order, caption dropout, shuffled tags) derives from (seed, step), so a
resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..config import DatasetConfig
from ..errors import DatasetError
from ..seeds import step_rng
from .buckets import bucket_for, resize_and_crop
from .captions import apply_trigger, read_caption, training_caption

log = logging.getLogger("trainer")

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


@dataclass
class ImageFile:
    path: Path
    caption: str  # with the trigger applied
    width: int
    height: int
    digest: str  # content hash, keys the latent cache
    control: Path | None = None  # the control image of the same stem (datasets[].control_path)
    control_digest: str = ""


@dataclass(frozen=True)
class Entry:
    """One training example: an image at one bucket size, maybe mirrored."""

    image: int  # index into Dataset.images
    bucket: tuple[int, int]  # (width, height)
    flip: bool


@dataclass
class Dataset:
    cfg: DatasetConfig
    images: list[ImageFile]
    entries: list[Entry] = field(default_factory=list)
    index: int = 0  # position in config.process[0].datasets


def _load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        return im.convert("RGB")


def _control_images(cfg: DatasetConfig, key: str) -> dict[str, Path] | None:
    """Control images by file stem, or None without `control_path`."""
    if cfg.control_path is None:
        return None
    folder = Path(cfg.control_path).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"{key}.control_path: folder {str(folder)!r} does not exist")
    found: dict[str, Path] = {}
    # one stem may exist in several formats; the first of IMAGE_EXTS wins, so the choice is stable
    for p in sorted(folder.iterdir(), key=lambda q: (q.stem, IMAGE_EXTS.index(q.suffix.lower()) if q.suffix.lower() in IMAGE_EXTS else 99)):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            found.setdefault(p.stem, p)
    return found


def check_dataset_folder(cfg: DatasetConfig, index: int) -> list[Path]:
    """The dataset's media files; a missing or empty folder (or control folder) is an error naming the key.
    Cheap: called before any model file is opened."""
    key = f"config.process[0].datasets[{index}]"
    folder = Path(cfg.folder_path).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"{key}.folder_path: folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise DatasetError(f"{key}.folder_path: no images (.jpg, .jpeg, .png, .webp) in {folder}")
    if cfg.control_path is not None and not Path(cfg.control_path).expanduser().is_dir():
        raise DatasetError(f"{key}.control_path: folder {cfg.control_path!r} does not exist")
    return files


def scan_dataset(cfg: DatasetConfig, index: int, trigger: str | None, factor: int) -> Dataset:
    key = f"config.process[0].datasets[{index}]"
    folder = Path(cfg.folder_path).expanduser()
    files = check_dataset_folder(cfg, index)
    controls = _control_images(cfg, key)
    images: list[ImageFile] = []
    uncaptioned: list[str] = []
    corrupt: list[str] = []
    no_control: list[str] = []
    for p in files:
        try:
            im = _load_rgb(p)
        except Exception as e:  # PIL raises many kinds for broken files
            corrupt.append(p.name)
            log.warning("skipping unreadable image %s (%s)", p, e)
            continue
        cap = read_caption(p, cfg.caption_ext)
        if cap is None:
            if cfg.default_caption is None:
                uncaptioned.append(p.name)
                continue
            cap = cfg.default_caption
        digest = hashlib.sha256(p.read_bytes()).hexdigest()[:24]
        item = ImageFile(p, apply_trigger(cap, trigger), im.width, im.height, digest)
        if controls is not None:
            ctrl = controls.get(p.stem)
            if ctrl is None:
                no_control.append(p.name)
                continue
            try:
                with Image.open(ctrl) as c:
                    c.verify()
            except Exception as e:  # PIL raises many kinds for broken files
                raise DatasetError(f"{key}.control_path: control image {ctrl} cannot be read ({e})") from None
            item.control = ctrl
            item.control_digest = hashlib.sha256(ctrl.read_bytes()).hexdigest()[:24]
        images.append(item)
    if uncaptioned:
        shown = ", ".join(uncaptioned[:5]) + (f" and {len(uncaptioned) - 5} more" if len(uncaptioned) > 5 else "")
        raise DatasetError(
            f"{key}: {len(uncaptioned)} images have no .{cfg.caption_ext.lstrip('.')} caption ({shown});"
            f" add caption files or set {key}.default_caption"
        )
    if no_control:
        # a control folder that misses images is more likely a naming mistake than a wish to train some
        # items without control (that is control_dropout, or a second dataset without control_path)
        shown = ", ".join(no_control[:5]) + (f" and {len(no_control) - 5} more" if len(no_control) > 5 else "")
        raise DatasetError(
            f"{key}.control_path: {len(no_control)} images have no control image of the same name in"
            f" {cfg.control_path} ({shown})"
        )
    if not images:
        raise DatasetError(f"{key}: none of the {len(files)} images in {folder} could be read ({', '.join(corrupt[:5])})")
    ds = Dataset(cfg, images, index=index)
    for i, im in enumerate(images):
        for res in sorted(set(cfg.resolution)):
            bucket = bucket_for(im.width, im.height, res, factor)
            if bucket == (0, 0):
                log.warning("skipping %s: smaller than %d px", im.path, factor)
                continue
            for flip in (False, True) if cfg.flip_x else (False,):
                ds.entries.append(Entry(i, bucket, flip))
    if not ds.entries:
        raise DatasetError(f"{key}: no image is large enough to train on")
    return ds


def image_pixels(path: Path, size: tuple[int, int], flip: bool = False) -> torch.Tensor:
    """An image file scaled to cover `size` (width, height) and center-cropped to it: (3, h, w) in [-1, 1]."""
    img = resize_and_crop(_load_rgb(path), *size)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def load_pixels(im: ImageFile, bucket: tuple[int, int], flip: bool) -> torch.Tensor:
    """(3, h, w) in [-1, 1]."""
    return image_pixels(im.path, bucket, flip)


def load_control_pixels(im: ImageFile, bucket: tuple[int, int], flip: bool) -> torch.Tensor:
    """The item's control image in the same bucket (and mirrored with it): (3, h, w) in [-1, 1]."""
    if im.control is None:
        raise ValueError(f"{im.path} has no control image")
    return image_pixels(im.control, bucket, flip)


@dataclass(frozen=True)
class BatchItem:
    dataset: int
    entry: Entry


class BatchPlan:
    """Batches of same-bucket entries; an epoch's order is a pure function of (seed, epoch)."""

    def __init__(self, datasets: list[Dataset], batch_size: int, seed: int) -> None:
        self.seed = seed
        self.batch_size = batch_size
        groups: dict[tuple[int, int], list[BatchItem]] = {}
        for di, ds in enumerate(datasets):
            for e in ds.entries:
                for _ in range(ds.cfg.num_repeats):
                    groups.setdefault(e.bucket, []).append(BatchItem(di, e))
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


def control_dropped(datasets: list[Dataset], batch: list[BatchItem], seed: int, index: int) -> list[bool]:
    """Which items of the `index`-th batch train without their control image (datasets[].control_dropout)."""
    out = []
    for j, it in enumerate(batch):
        rate = datasets[it.dataset].cfg.control_dropout
        out.append(rate > 0 and step_rng(seed, 0xC7A1, index, j).random() < rate)
    return out


def captions_for_batch(datasets: list[Dataset], batch: list[BatchItem], seed: int, index: int) -> list[str]:
    out = []
    for j, it in enumerate(batch):
        ds = datasets[it.dataset]
        rng = step_rng(seed, 0xCA9, index, j)
        cap = ds.images[it.entry.image].caption
        out.append(training_caption(cap, rng, ds.cfg.caption_dropout_rate, ds.cfg.shuffle_tokens, ds.cfg.keep_tokens))
    return out
