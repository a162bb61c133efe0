"""Latent and text-embedding caches.

Latents are keyed by image content, bucket, flip and the VAE's fingerprint, so a disk cache written by
one run is reused by the next and never confused with another VAE's.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Callable

import torch

from ..errors import DatasetError
from ..fileio import save_safetensors_atomic
from ..models.base import Conditioning, TrainingModel, split_conditioning
from .dataset import (BatchItem, Dataset, Entry, control_dropped, fit_pixels, image_pixels, load_control_pixels,
                      load_mask_pixels, load_pixels, load_reference_pixels, mask_of_pixels)
from .media import WHITE, clip_indices, probe, read_frames

log = logging.getLogger("trainer")

CACHE_DIR = "_latent_cache"


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class LatentCache:
    """Latents of the training entries (images and clips), and the per-item conditions of families that take more
    than a caption (a control latent, an I2V start image's inputs: TrainingModel.encode_conditions), cached together.
    On disk (`cache_latents_to_disk`) each entry is one checksummed file in the dataset's `_latent_cache/`, or in the
    run folder's when the dataset folder cannot be written; the key is stable across processes."""

    def __init__(self, datasets: list[Dataset], vae_id: str, fallback_dir: Path | None = None) -> None:
        self.datasets = datasets
        self.vae_id = vae_id
        self.fallback_dir = fallback_dir
        self.mem: dict[str, torch.Tensor] = {}
        self.conds: dict[str, Conditioning] = {}
        self.encoded = 0  # entries encoded by the VAE in this process (the rest came from disk)

    def key(self, ds: Dataset, e: Entry) -> str:
        m = ds.media[e.item]
        ctrl = f"_c{m.control_digest}" if m.control is not None else ("_i2v" if ds.cfg.do_i2v else "")
        ctrl += f"_m{m.mask_digest}" if m.mask is not None else ""
        ctrl += f"_r{m.reference_digest}" if m.reference is not None else ""
        ctrl += "_bg%02x%02x%02x" % m.background if m.background != WHITE else ""  # white: the keys of before
        clip = ""
        if m.info.is_video:
            clip = "_f" + hashlib.sha1(repr(e.indices).encode()).hexdigest()[:12] + f"x{e.frames}"
        return f"{m.digest}{ctrl}{clip}_{e.bucket[0]}x{e.bucket[1]}_{int(e.flip)}_{self.vae_id}"

    def check_model(self, model: TrainingModel) -> None:
        """Condition images need a family that takes them, and families that need one get one: said before anything
        is encoded."""
        need = model.requires_conditions()
        for ds in self.datasets:
            key = f"config.process[0].datasets[{ds.index}]"
            if ds.cfg.mask_path is not None and not model.takes_masks:
                raise DatasetError(f"{key}.mask_path: model.arch {model.arch!r} takes no masks (flex2, wan21_vace do)")
            if ds.cfg.reference_path is not None and not model.takes_references:
                raise DatasetError(f"{key}.reference_path: model.arch {model.arch!r} takes no reference images"
                                   " (wan21_vace does)")
            if ds.cfg.control_path is not None and not model.takes_control:
                if model.backend == "comfyui":
                    raise DatasetError(f"{key}.control_path: ComfyUI's {type(model.base).__name__} MODEL takes no"
                                       " reference images (ComfyUI's OmniGen2, Flux.2 and Qwen-Image models take them"
                                       " as reference_latents); remove control_path or use a model that takes them")
                raise DatasetError(f"{key}.control_path: model.arch {model.arch!r} takes no control images (flex2,"
                                   " wan21_i2v do); remove control_path or use a family that takes them")
            if need and ds.cfg.control_path is None and not ds.cfg.do_i2v and ds.cfg.reference_path is None:
                raise DatasetError(f"{key}: {need}")

    def _condition_image(self, ds: Dataset, e: Entry, pixels: torch.Tensor) -> torch.Tensor | None:
        m = ds.media[e.item]
        if m.control is not None:
            return load_control_pixels(m, e)
        if ds.cfg.do_i2v:
            return pixels[:, 0] if pixels.dim() == 4 else pixels
        return None

    def _encode(self, ds: Dataset, e: Entry, model: TrainingModel) -> tuple[torch.Tensor, Conditioning | None]:
        self.encoded += 1
        m = ds.media[e.item]
        pixels = load_pixels(m, e)
        lat = model.encode_pixels(pixels[None])[0].contiguous()
        cond = model.encode_conditions(pixels, self._condition_image(ds, e, pixels), load_mask_pixels(m, e),
                                       load_reference_pixels(m, e))
        return lat, ({k: v.contiguous() for k, v in cond.items()} if cond else None)

    def _disk_dir(self, ds: Dataset) -> Path:
        folder = Path(ds.cfg.folder_path).expanduser() / CACHE_DIR
        if _writable(folder) or self.fallback_dir is None:
            return folder
        return self.fallback_dir / CACHE_DIR / f"dataset_{ds.index}"

    def disk_path(self, ds: Dataset, e: Entry) -> Path:
        return self._disk_dir(ds) / f"{self.key(ds, e)}.safetensors"

    def get(self, dataset: int, e: Entry, model: TrainingModel) -> torch.Tensor:
        ds = self.datasets[dataset]
        k = self.key(ds, e)
        if k in self.mem:
            return self.mem[k]
        lat, cond = self._encode(ds, e, model)
        if ds.cfg.cache_latents or ds.cfg.cache_latents_to_disk:
            self.mem[k] = lat
            if cond is not None:
                self.conds[k] = cond
        return lat

    def get_conditions(self, dataset: int, e: Entry, model: TrainingModel) -> Conditioning | None:
        """The entry's cached conditions, or None if it has none."""
        ds = self.datasets[dataset]
        k = self.key(ds, e)
        if k in self.conds:
            return self.conds[k]
        if k in self.mem:
            return None
        return self._encode(ds, e, model)[1]

    def get_control(self, dataset: int, e: Entry, model: TrainingModel) -> torch.Tensor | None:
        """The control latent of an entry (families that take one), or None."""
        cond = self.get_conditions(dataset, e, model)
        return None if cond is None else cond.get("control")

    def text_image_keys(self, batch: list[BatchItem], seed: int, index: int, first: int = 0) -> list[str | None]:
        """For a text encoder that reads images: per item of the `index`-th batch, its latent key where its caption is
        read with its control image (it has one, and control_dropout kept it this step), else None; `first` as in
        conditions_for_batch."""
        out = []
        for it, drop in zip(batch, control_dropped(self.datasets, batch, seed, index, first)):
            ds = self.datasets[it.dataset]
            out.append(None if drop or ds.media[it.entry.item].control is None else self.key(ds, it.entry))
        return out

    def control_pixels(self, item: BatchItem) -> torch.Tensor:
        ds = self.datasets[item.dataset]
        return load_control_pixels(ds.media[item.entry.item], item.entry)

    def conditions_for_batch(self, batch: list[BatchItem], model: TrainingModel, seed: int, index: int,
                             first: int = 0) -> Conditioning:
        """The conditions of the `index`-th batch (or of its part from item `first` on: a rank's share), stacked;
        empty when no item has any.

        An item without them (its dataset has none, or control_dropout chose it) gets zeros: the "no control" input
        of the families that take control latents (Flex.2's reference pipeline). Dropout never zeroes the leading
        frames (VACE's reference): they are part of what the item trains on, not a condition."""
        conds = [self.get_conditions(it.dataset, it.entry, model) for it in batch]
        if all(c is None for c in conds):
            return {}
        like: dict[str, torch.Tensor] = {}
        for c in conds:  # items may carry different conditions (Flex.2: a mask for some): each name's shape
            for name, t in (c or {}).items():
                like.setdefault(name, t)
        dropped = control_dropped(self.datasets, batch, seed, index, first)
        out = {}
        for name, t in like.items():
            keep = name == model.leading_frames_key
            out[name] = torch.stack([torch.zeros_like(t) if c is None or name not in c or (drop and not keep)
                                     else c[name] for c, drop in zip(conds, dropped)]).float()
        return out

    def _read(self, path: Path, wants_cond: bool, like: tuple[int, ...] | None) -> tuple | None:
        """A cache file's (latent, conditions), or None (with a warning) when it is damaged or of another shape."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                md = f.metadata() or {}
                saved = {k: f.get_tensor(k) for k in f.keys()}
            if md.get("checksum") != _tensor_digest(saved):
                raise ValueError("checksum mismatch")
            lat = saved["latent"]
            cond = {k[len("cond."):]: v for k, v in saved.items() if k.startswith("cond.")}
            if wants_cond and not cond:
                raise ValueError("no conditions")
            if like is not None and tuple(lat.shape) != like:
                raise ValueError(f"latent {tuple(lat.shape)} where this model makes {like}")
            return lat, cond or None
        except Exception as err:  # safetensors raises its own error types; a damaged file is rebuilt
            log.warning("rebuilding latent cache file %s (%s)", path, err)
            return None

    def prepare(self, model: TrainingModel, progress: Callable[[int, int], None] | None = None) -> None:
        """Fill the cache for every dataset that caches (from disk where present)."""
        self.check_model(model)
        todo: list[tuple[Dataset, Entry, str]] = []
        seen = set()
        for ds in self.datasets:
            if not (ds.cfg.cache_latents or ds.cfg.cache_latents_to_disk):
                continue
            for e in ds.entries:
                k = self.key(ds, e)
                if k in seen:
                    continue
                seen.add(k)
                todo.append((ds, e, k))
        for n, (ds, e, k) in enumerate(todo):
            path = self.disk_path(ds, e)
            wants_cond = ds.media[e.item].control is not None or (ds.cfg.do_i2v and model.takes_control)
            found = None
            if ds.cfg.cache_latents_to_disk and path.exists():
                found = self._read(path, wants_cond, _expected_shape(model, e))
            if found is None:
                lat, cond = self._encode(ds, e, model)
                if ds.cfg.cache_latents_to_disk:
                    tensors = {"latent": lat, **{f"cond.{k2}": v for k2, v in (cond or {}).items()}}
                    save_safetensors_atomic(tensors, path, {"checksum": _tensor_digest(tensors)})
            else:
                lat, cond = found
            self.mem[k] = lat
            if cond is not None:
                self.conds[k] = cond
            if progress:
                progress(n + 1, len(todo))


def _expected_shape(model: TrainingModel, e: Entry) -> tuple[int, ...]:
    return tuple(model.latent_shape(e.bucket[0], e.bucket[1], e.frames)[1:])


def _writable(folder: Path) -> bool:
    """Whether cache files can be written in `folder` (created if missing)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


class TextCache:
    """Embeddings of fixed captions, so the text encoders can leave memory; for families whose text encoder reads
    images (text_takes_images), also each caption encoded with an item's control image, by the item's latent key."""

    def __init__(self) -> None:
        self.mem: dict[str, Conditioning] = {}

    def prepare(self, model: TrainingModel, captions: list[str], batch_size: int = 8) -> None:
        todo = sorted({c for c in captions if c not in self.mem})
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            for c, cond in zip(chunk, split_conditioning(model.encode_text(chunk))):
                self.mem[c] = cond

    @staticmethod
    def image_key(caption: str, item_key: str) -> str:
        return f"{caption}\x00{item_key}"

    def prepare_with_images(self, model: TrainingModel, pairs: list[tuple[str, str, torch.Tensor]]) -> None:
        """`pairs`: (item key, caption, control image) to encode together (text_image_pairs), one at a time."""
        for item_key, caption, image in pairs:
            key = self.image_key(caption, item_key)
            if key not in self.mem:
                self.mem[key] = split_conditioning(model.encode_text_with_images([caption], [image]))[0]

    def get(self, caption: str, item_key: str | None = None) -> Conditioning:
        """The caption's embedding; with `item_key`, the caption's encoded with that item's control image."""
        return self.mem[caption if item_key is None else self.image_key(caption, item_key)]


def text_image_pairs(latents: LatentCache, captions_of: Callable[[Dataset, str], list[str]]) -> list:
    """What a text encoder that reads images encodes per item: (the item's latent key, caption, control image) for
    every entry with a control image, for each caption it may train with (`captions_of(dataset, its caption)`)."""
    pairs = []
    for ds in latents.datasets:
        for e in ds.entries:
            m = ds.media[e.item]
            if m.control is None:
                continue
            control = load_control_pixels(m, e)
            pairs.extend((latents.key(ds, e), caption, control) for caption in captions_of(ds, m.caption))
    return pairs


def sample_conditions(model: TrainingModel, control_path: str | None, width: int, height: int, frames: int, key: str,
                      reference_path: str | None = None, inpaint: tuple[str, str] | None = None) -> Conditioning:
    """A preview's conditions from its control file and reference image (scaled and center-cropped to the sample's
    size, rounded as the sampler rounds it), encoded as the training items' are: batch of one, on the CPU. `key`
    names the sample (errors name its control_image or reference_image)."""
    from ..errors import ConfigError
    from .dataset import image_pixels

    size = model.snap_size(width, height)
    control = reference = None
    if control_path:
        if not model.takes_control:
            raise ConfigError(f"{key}.control_image: model.arch {model.arch!r} takes no control image (flex2,"
                              " wan21_i2v do)")
        p = _preview_file(control_path, f"{key}.control_image", "control image")
        try:
            info = probe(p)
            if info.is_video:  # a control video (VACE): its first frames at the model's rate
                idx = clip_indices(info, model.native_fps, model.snap_frames(frames), False, 0, 1)
                control = torch.stack([fit_pixels(f, size, False) for f in read_frames(p, idx)], dim=1)
            else:
                control = image_pixels(p, size)
        except Exception as e:  # PIL and PyAV raise many kinds for broken files
            raise ConfigError(f"{key}.control_image: control file {p} cannot be read ({e})") from None
    if reference_path:
        if not model.takes_references:
            raise ConfigError(f"{key}.reference_image: model.arch {model.arch!r} takes no reference image"
                              " (wan21_vace does)")
        reference = _preview_image(reference_path, size, f"{key}.reference_image", "reference image")
    pixels = mask = None
    if inpaint is not None:  # Flex.2: the image to inpaint and its mask (white: paint), read as training masks are
        pixels, mask = (_preview_image(v, size, f"{key}.{name}", what) for v, name, what in
                        ((inpaint[0], "inpaint_image", "inpaint image"), (inpaint[1], "inpaint_mask", "mask")))
        mask = mask_of_pixels(mask)
    return conditions_of_image(model, control, frames, reference, size, pixels, mask)


def _preview_image(path: str, size: tuple[int, int], key: str, what: str) -> torch.Tensor:
    """A preview's image file at the sample's size, in [-1, 1]; a missing or unreadable file names `key`."""
    from ..errors import ConfigError

    p = _preview_file(path, key, what)
    try:
        return image_pixels(p, size)
    except Exception as e:  # PIL raises many kinds for broken files
        raise ConfigError(f"{key}: {what} {p} cannot be read ({e})") from None


def _preview_file(path: str, key: str, what: str) -> Path:
    from ..errors import ConfigError

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{key}: {what} {str(p)!r} does not exist")
    return p


def conditions_of_image(model: TrainingModel, control: torch.Tensor | None, frames: int,
                        reference: torch.Tensor | None = None, size: tuple[int, int] | None = None,
                        pixels: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> Conditioning:
    """A preview's conditions from a control image (3, h, w) or video (3, f, h, w), a reference image (3, h, w),
    and / or an image to inpaint (3, h, w) with its mask (1, h, w) in [0, 1], in [-1, 1] at the sample's size
    (width, height)."""
    frames = model.snap_frames(frames)
    given = next((t for t in (control, reference, pixels) if t is not None), None)
    h, w = given.shape[-2:] if given is not None else size[::-1]
    if pixels is None:
        pixels = torch.zeros(3, frames, h, w) if frames > 1 else torch.zeros(3, h, w)
    with torch.no_grad():
        cond = model.encode_conditions(pixels, control, mask, reference) or {}
    return {k: v[None].float().cpu() for k, v in cond.items()}
