"""Preview samples: requests built once from the job (trigger word applied, prompts encoded, control images
encoded), for the loop's scheduled samples and for a host's one-off sample alike."""

from __future__ import annotations

from dataclasses import dataclass

from .config import JobConfig, SampleItem
from .data.cache import sample_control_latent
from .data.captions import apply_trigger
from .models.base import SampleRequest, TrainingModel, batch_of_one, split_conditioning


@dataclass
class PreparedSample:
    index: int
    prompt: str  # with the trigger word applied
    request: SampleRequest
    neg: str = ""  # the negative prompt, re-encoded with the prompt where the text encoders train
    control_image: str | None = None


def sample_items(job: JobConfig) -> list[SampleItem]:
    """The job's samples (`sample.samples` or `sample.prompts`) with the defaults filled in."""
    return job.process.sample.items()


def prepare_samples(job: JobConfig, model: TrainingModel, items: list[SampleItem] | None = None,
                    steps: int | None = None, key: str = "config.process[0].sample.samples") -> list[PreparedSample]:
    """Requests for `items` (complete SampleItems; default: the job's): prompts with the trigger word, encoded with
    the text encoders brought onto the training device for the encoding, and the control latents of items that
    name one."""
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
        req = SampleRequest(cond=batch_of_one(conds[i]), neg_cond=batch_of_one(neg_conds[i]), width=it.width,
                            height=it.height, steps=steps or job.process.sample.sample_steps,
                            guidance_scale=it.guidance_scale, seed=it.seed)
        if it.control_image:
            req.cond["control"] = sample_control_latent(model, it.control_image, it.width, it.height,
                                                        f"{key}[{i}].control_image")
        out.append(PreparedSample(i, prompts[i], req, negs[i], it.control_image))
    return out
