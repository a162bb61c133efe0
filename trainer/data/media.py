"""Reading the files of a dataset: still images, animated images and videos (PyAV, which ComfyUI itself depends on),
one clip at a time: only the frames a clip uses are kept in memory.

A clip is a list of frame times at the training frame rate: the source is resampled to `fps` first (the nearest
source frame for each target time), then either spread over the whole clip (`shrink_video_to_frames`) or cut
into windows of consecutive frames (`clips_per_video` of them, spread over the clip).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, ImageSequence

log = logging.getLogger("trainer")

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
VIDEO_EXTS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v")
MEDIA_EXTS = IMAGE_EXTS + VIDEO_EXTS
# pixels beyond which an image is downscaled on load (it never trains at that size anyway), and PIL's own
# "decompression bomb" limit lifted so such images load instead of failing
MAX_LOAD_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = None
_said_downscaled: list[Path] = []  # the downscale is said once per process


class MediaError(ValueError):
    """A file that cannot be read as an image or a video."""


@dataclass(frozen=True)
class MediaInfo:
    width: int
    height: int
    frames: int  # 1 for a still image
    fps: float | None  # None for a still image

    @property
    def is_video(self) -> bool:
        return self.frames > 1


def probe(path: Path) -> MediaInfo:
    """Size, frame count and rate, read from the header (videos) or the image itself."""
    if path.suffix.lower() in VIDEO_EXTS:
        return _probe_video(path)
    try:
        with Image.open(path) as im:
            n = getattr(im, "n_frames", 1)
            w, h = im.size
            if n > 1:  # an animated GIF / WebP: its frame durations give the rate
                ms = [max(1, fr.info.get("duration", 100)) for fr in ImageSequence.Iterator(im)]
                return MediaInfo(w, h, n, 1000.0 * n / sum(ms))
            im.load()
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by its EXIF orientation
                w, h = h, w
            return MediaInfo(w, h, 1, None)
    except Exception as e:  # PIL raises many kinds for broken files
        raise MediaError(str(e)) from None


def _probe_video(path: Path) -> MediaInfo:
    import av

    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise MediaError("no video stream")
            v = c.streams.video[0]
            rate = float(v.average_rate or v.guessed_rate or 0)
            frames = v.frames
            if not frames and v.duration and rate:
                frames = int(round(float(v.duration * v.time_base) * rate))
            if not frames:  # no count in the header: count by decoding (small files only reach here)
                frames = sum(1 for _ in c.decode(video=0))
            w, h = v.codec_context.width, v.codec_context.height
    except MediaError:
        raise
    except Exception as e:  # PyAV raises its own error types
        raise MediaError(str(e)) from None
    if not frames or not w or not h or rate <= 0:
        raise MediaError(f"an empty or unreadable video ({frames} frames, {w}x{h}, {rate} fps)")
    return MediaInfo(w, h, int(frames), rate)


def resampled_length(info: MediaInfo, fps: float | None) -> int:
    """Frames of the clip after resampling to `fps` (the source's own rate when None)."""
    if not info.is_video or fps is None or info.fps is None:
        return info.frames
    return max(1, int(info.frames * fps / info.fps + 1e-6))


def clip_indices(info: MediaInfo, fps: float | None, frames: int, shrink: bool, clip: int, clips: int) -> list[int]:
    """Source frame indices of clip `clip` (of `clips`) with `frames` frames."""
    n = resampled_length(info, fps)
    if shrink:
        pos = np.linspace(0, n - 1, frames) if frames > 1 else np.zeros(1)
    else:
        last_start = max(0, n - frames)
        start = round(clip * last_start / (clips - 1)) if clips > 1 else 0
        pos = np.arange(start, start + frames)
    scale = info.fps / fps if (fps and info.fps) else 1.0
    return [min(info.frames - 1, int(np.floor(p * scale + 0.5))) for p in pos]  # half up, not half to even


WHITE = (255, 255, 255)


def color_rgb(value: str, key: str) -> tuple[int, int, int]:
    """A colour name (`white`, `black`, `gray` ...) or `#rrggbb` as an RGB triple."""
    from PIL import ImageColor

    from ..errors import ConfigError

    try:
        return ImageColor.getrgb(str(value).strip())[:3]
    except ValueError:
        raise ConfigError(f"{key}: {value!r} is not a colour (a name like white or black, or #rrggbb)") from None


def load_rgb(path: Path, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """A still image as RGB, EXIF-rotated, transparency composited on `background`, 16-bit converted by its real
    depth, and very large images downscaled (they never train at full size)."""
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.width * im.height > MAX_LOAD_PIXELS:
            if not _said_downscaled:
                _said_downscaled.append(path)
                log.warning("%s (%dx%d) and other images over %d MP are downscaled as they load (no bucket trains"
                            " that large)", path, im.width, im.height, MAX_LOAD_PIXELS // 1_000_000)
            scale = (MAX_LOAD_PIXELS / (im.width * im.height)) ** 0.5
            im = im.resize((max(1, int(im.width * scale)), max(1, int(im.height * scale))), Image.Resampling.LANCZOS)
        return to_rgb(im, background)


def to_rgb(im: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray((arr / top * 255.0).round().clip(0, 255).astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        under = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(under, rgba).convert("RGB")
    return im.convert("RGB")


def read_frames(path: Path, indices: list[int], background: tuple[int, int, int] = WHITE) -> list[Image.Image]:
    """The frames at `indices` (source frame numbers, repeats allowed) as RGB images, decoding once in order."""
    wanted = sorted(set(indices))
    got: dict[int, Image.Image] = {}
    if path.suffix.lower() in VIDEO_EXTS:
        import av

        try:
            with av.open(str(path)) as c:
                for i, frame in enumerate(c.decode(video=0)):
                    if i in wanted:
                        got[i] = frame.to_image().convert("RGB")
                    if i >= wanted[-1]:
                        break
        except Exception as e:  # PyAV raises its own error types
            raise MediaError(str(e)) from None
    else:
        with Image.open(path) as im:
            for i, frame in enumerate(ImageSequence.Iterator(im)):
                if i in wanted:
                    got[i] = to_rgb(frame.copy(), background)
                if i >= wanted[-1]:
                    break
    if len(got) < len(wanted):  # the header promised more frames than the file holds: repeat the last one
        if not got:
            raise MediaError("no frames could be decoded")
        last = got[max(got)]
        for i in wanted:
            got.setdefault(i, last)
    return [got[i] for i in indices]


def write_video(path: Path, frames: list[Image.Image], fps: float) -> Path:
    """Frames as an .mp4 (H.264, yuv420p; sides rounded down to even, as the codec needs)."""
    import av

    w, h = frames[0].size
    w, h = w // 2 * 2, h // 2 * 2
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=int(round(fps)))
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"crf": "12", "preset": "ultrafast"}
        for im in frames:
            arr = np.asarray(im.convert("RGB").crop((0, 0, w, h)))
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path
