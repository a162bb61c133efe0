"""Training sessions for hosts that step a run piece by piece (the ComfyUI nodes).

A node graph and a YAML job describe the same run: the nodes hand over plain dicts holding the YAML
sections (`model`, one `datasets[]` entry, `network`, and the train/save/sample settings), and
`assemble_job` puts them together into the job dict that `python -m trainer` reads.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import torch

from .config import JobConfig, SampleItem, dump_job_yaml, load_job_dict
from .errors import ConfigError
from .job import build_trainer
from .data.cache import conditions_of_image
from .data.dataset import fit_pixels
from .previews import prepare_samples, text_with_image
from .sampling import sample, to_pil
from .train.checkpoints import DTYPES
from .train.distributed import require_single_process
from .train.loop import Trainer

# the model section of a job whose model a host (ComfyUI) loaded: no file to name
HOST_MODEL = {"backend": "comfyui", "name_or_path": "<ComfyUI MODEL>"}


def assemble_job(name: str, model: dict, datasets: list[dict], network: dict, settings: dict) -> dict:
    """The ai-toolkit job dict for these parts. `settings` holds train/save/sample and process keys."""
    s = copy.deepcopy(settings)
    proc: dict[str, Any] = {
        "type": "sd_trainer",
        "training_folder": s.pop("training_folder", "output"),
        "network": copy.deepcopy(network),
        "datasets": [],
        "model": copy.deepcopy(model),
        "train": s.pop("train", {}),
        "save": s.pop("save", {}),
        "sample": s.pop("sample", {}),
    }
    trigger = None
    for d in datasets:
        d = copy.deepcopy(d)
        t = d.pop("trigger_word", None)
        if t:
            if trigger and t != trigger:
                raise ConfigError(f"datasets: two trigger words ({trigger!r}, {t!r}); a run has one")
            trigger = t
        proc["datasets"].append(d)
    if trigger:
        proc["trigger_word"] = trigger
    proc.update(s)
    return {"job": "extension", "config": {"name": name, "process": [proc]}, "meta": {"name": name}}


def job_from_parts(model_part: dict, datasets: list[dict], network: dict, settings: dict, steps: int,
                   default_folder: str) -> dict:
    """The job dict a node graph describes. A ComfyUI MODEL becomes `backend: comfyui` (no file to name)."""
    s = copy.deepcopy(settings)
    name = s.pop("name", "my_lora")
    s.setdefault("training_folder", default_folder)
    s.setdefault("train", {})["steps"] = steps
    if "comfy" in model_part:
        model = {**HOST_MODEL, **model_part.get("model_keys", {})}
    else:
        model = model_part["model"]
    return assemble_job(name, model, datasets, network, s)


def parts_from_job(data: dict, base_dir: Path | None = None) -> tuple[dict, list[dict], dict, dict, int]:
    """(model part, datasets, network, settings, steps) of a job dict, as the nodes pass them. `base_dir`: the job
    file's folder, which its relative paths are read from."""
    name, model, datasets, network, settings = split_job(data, base_dir)
    settings["name"] = name
    steps = int(settings.get("train", {}).pop("steps", 1000))
    return {"model": model}, datasets, network, settings, steps


def split_job(data: dict, base_dir: Path | None = None) -> tuple[str, dict, list[dict], dict, dict]:
    """The inverse of assemble_job: (name, model, datasets, network, settings) of a job dict."""
    job = load_job_dict(data, base_dir=base_dir)  # validates, with key paths in the errors
    proc = copy.deepcopy(job.raw["config"]["process"][0])
    trigger = proc.pop("trigger_word", None)
    datasets = proc.pop("datasets", [])
    if trigger:
        for d in datasets:
            d["trigger_word"] = trigger
    model = proc.pop("model")
    network = proc.pop("network", {})
    proc.pop("type", None)
    return job.name, model, datasets, network, proc


class TrainingSession:
    """One run, advanced N steps at a time; the network is attached only while it works."""

    def __init__(self, job_dict: dict, model=None, report: Callable[[str], None] = print) -> None:
        require_single_process("a training session (the ComfyUI nodes)")
        self.job: JobConfig = load_job_dict(job_dict)
        # keep the text encoders (off the card): sample() encodes any prompt, not only the cached captions
        self.trainer: Trainer = build_trainer(self.job, report, model=model, keep_text_encoders=True, extendable=True)
        self.trainer.network.detach()
        self.resumed_from = self.trainer.state.step  # > 0: this continues an earlier run of the same name
        self.losses: list[tuple[int, float]] = []

    @property
    def step(self) -> int:
        return self.trainer.state.step

    def advance(self, steps: int, on_step: Callable[[int, float], None] | None = None) -> int:
        """Train `steps` more steps (the run grows to fit); returns the step reached."""
        tr = self.trainer
        target = tr.state.step + steps
        tr.extend_to(target)

        def cb(step: int, loss: float) -> None:
            self.losses.append((step, loss))
            if on_step is not None:
                on_step(step, loss)

        tr.network.attach()
        try:
            tr.train(until=target, on_step=cb)
        finally:
            tr.network.detach()
        return tr.state.step

    def sample(self, prompt: str, width: int, height: int, steps: int, guidance: float, seed: int, neg: str = "",
               frames: int = 1, control: torch.Tensor | None = None, reference: torch.Tensor | None = None):
        """One preview from the network as trained so far: (3, h, w), or (3, f, h, w) for a clip, in [-1, 1].
        `control`: an image (3, h, w) in [-1, 1] the model is conditioned on (Flex.2's control, Wan I2V's start);
        `reference`: a reference image (3, h, w) in [-1, 1] (VACE: WanVaceToVideo's reference_image)."""
        model = self.trainer.model
        if reference is not None and not model.takes_references:
            raise ConfigError(f"reference_image: model.arch {model.arch!r} takes no reference image (wan21_vace does)")
        item = SampleItem(prompt=prompt, width=width, height=height, seed=seed, neg=neg, guidance_scale=guidance,
                          num_frames=frames)
        given = control is not None or reference is not None
        (prepared,) = prepare_samples(self.job, model, [item], steps=steps, key="sample", conditioned=given)
        if given:
            size = model.snap_size(width, height)
            pixels = None if control is None else fit_pixels(to_pil(control), size, False)
            ref = None if reference is None else fit_pixels(to_pil(reference), size, False)
            extra = conditions_of_image(model, pixels, prepared.request.frames, ref, size)
            prepared.request.cond.update(extra)
            prepared.request.neg_cond.update(extra)
            if model.text_takes_images and pixels is not None:  # the prompts read with the control image
                pos, neg_cond = text_with_image(model, prepared.prompt, prepared.neg, pixels)
                prepared.request.cond.update(pos)
                prepared.request.neg_cond.update(neg_cond)
        net = self.trainer.network
        net.attach()
        net.eval()
        try:
            return sample(self.trainer.model, prepared.request)
        finally:
            net.train()
            net.detach()

    def export(self, dtype_name: str | None = None) -> tuple[dict, dict[str, str]]:
        self.trainer.check_finite()
        tensors = self.trainer.network.export(DTYPES[dtype_name or self.job.process.save.dtype])
        return tensors, self.trainer.metadata()

    def yaml(self) -> str:
        return dump_job_yaml(self.job)
