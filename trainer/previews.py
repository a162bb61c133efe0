"""Preview samples: requests built once from the job (trigger word applied, prompts encoded, control images
encoded), for the loop's scheduled samples and for a host's one-off sample alike."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import JobConfig, SampleItem
from .errors import ConfigError
from .data.cache import _preview_image, sample_conditions
from .data.captions import apply_trigger
from .fileio import atomic_path
from .models.base import SampleRequest, TrainingModel, batch_of_one, split_conditioning
from .sampling import to_pil

log = logging.getLogger("trainer")


@dataclass
class PreparedSample:
    index: int
    prompt: str  # with the trigger word applied
    request: SampleRequest
    neg: str = ""  # the negative prompt, re-encoded with the prompt where the text encoders train
    control_image: str | None = None
    reference_image: str | None = None


def sample_items(job: JobConfig) -> list[SampleItem]:
    """The job's samples (`sample.samples` or `sample.prompts`) with the defaults filled in."""
    return job.process.sample.items()


def prepare_samples(job: JobConfig, model: TrainingModel, items: list[SampleItem] | None = None,
                    steps: int | None = None, key: str = "config.process[0].sample.samples",
                    conditioned: bool = False) -> list[PreparedSample]:
    """Requests for `items` (complete SampleItems; default: the job's): prompts with the trigger word, encoded with
    the text encoders brought onto the training device for the encoding, and the control latents of items that
    name one. `conditioned`: the caller adds the conditions itself (an image from the graph)."""
    items = sample_items(job) if items is None else items
    if not items:
        return []
    trigger = job.process.trigger_word
    prompts = [apply_trigger(it.prompt, trigger) if "[trigger]" in it.prompt else it.prompt for it in items]
    negs = [it.neg or "" for it in items]
    with model.text_encoders_on_device():
        conds = split_conditioning(model.encode_text(prompts))
        neg_conds = split_conditioning(model.encode_text(negs))
    out = []
    for i, it in enumerate(items):
        frames = model.snap_frames(it.num_frames or 1)
        width, height = model.snap_size(it.width, it.height)
        if (width, height) != (it.width, it.height) or frames != (it.num_frames or 1):
            log.warning("%s[%d]: %dx%d%s rounded to %dx%d%s, the sizes the model takes (sides a multiple of %d%s)",
                        key, i, it.width, it.height, f"x{it.num_frames or 1} frames" if model.is_video else "",
                        width, height, f"x{frames} frames" if model.is_video else "", model.pixel_factor,
                        f", {model.vae_temporal}k+1 frames" if model.is_video else "")
        cond, neg_cond = batch_of_one(conds[i]), batch_of_one(neg_conds[i])
        if model.text_takes_images and it.control_image:  # the prompts read with the control image
            image = _preview_image(it.control_image, (width, height), f"{key}[{i}].control_image", "control_image")
            cond, neg_cond = text_with_image(model, prompts[i], negs[i], image)
        req = SampleRequest(cond=cond, neg_cond=neg_cond, width=width,
                            height=height, steps=steps or job.process.sample.sample_steps,
                            guidance_scale=it.guidance_scale, seed=it.seed, frames=frames)
        if model.conditions_on_fps:  # the preview plays at sample.fps: its positions are at that rate
            fps = torch.tensor([job.process.sample.fps or model.native_fps or 16.0])
            req.cond["fps"], req.neg_cond["fps"] = fps, fps
        if it.control_image or it.reference_image or it.inpaint_image:
            inpaint = (it.inpaint_image, it.inpaint_mask) if it.inpaint_image else None
            extra = sample_conditions(model, it.control_image, width, height, frames, f"{key}[{i}]",
                                      it.reference_image, inpaint)
            req.cond.update(extra)
            req.neg_cond.update(extra)  # the condition is not what guidance contrasts
        elif model.requires_conditions() and not conditioned:
            raise ConfigError(f"{key}[{i}].control_image: {model.requires_conditions()}; previews need a start image"
                              " (sample.samples[].control_image)")
        for name in ("control_strength", "control_stop"):  # Flex.2's pipeline inputs, read by its model
            if getattr(it, name) is not None:
                req.cond[name] = req.neg_cond[name] = torch.tensor([float(getattr(it, name))])
        out.append(PreparedSample(i, prompts[i], req, negs[i], it.control_image, it.reference_image))
    return out


def text_with_image(model: TrainingModel, prompt: str, neg: str, image: torch.Tensor) -> tuple[dict, dict]:
    """A preview's prompt and negative prompt (batches of one) each encoded with its control image (3, h, w) in
    [-1, 1], for a text encoder that reads images: as a graph feeds the image to the positive and negative encoders."""
    with model.text_encoders_on_device():
        pos, neg_cond = split_conditioning(model.encode_text_with_images([prompt, neg], [image, image]))
    return batch_of_one(pos), batch_of_one(neg_cond)


def save_preview(sample: torch.Tensor, path: Path, fps: float) -> list[Path]:
    """Write a preview: an image (3, h, w) as `path`.png; a clip (3, f, h, w) as `path`.mp4 with its first frame
    as `path`.png beside it (a one-frame clip is an image). Returns the files written."""
    from .data.media import write_video

    if sample.dim() == 4 and sample.shape[1] == 1:
        sample = sample[:, 0]
    png = path.with_suffix(".png")
    first = to_pil(sample if sample.dim() == 3 else sample[:, 0])
    with atomic_path(png) as tmp:
        first.save(tmp, format="PNG")
    if sample.dim() == 3:
        return [png]
    mp4 = path.with_suffix(".mp4")
    with atomic_path(mp4) as tmp:
        write_video(tmp, [to_pil(sample[:, i]) for i in range(sample.shape[1])], fps)
    return [png, mp4]
