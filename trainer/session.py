"""Training sessions for hosts that step a run piece by piece (the ComfyUI nodes).

A node graph and a YAML job describe the same run: the nodes hand over plain dicts holding the YAML
sections (`model`, one `datasets[]` entry, `network`, and the train/save/sample settings), and
`assemble_job` puts them together into the job dict that `python -m trainer` reads.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

from .config import JobConfig, dump_job_yaml, load_job_dict
from .errors import ConfigError
from .train.loop import Trainer

COMFY_ARCH = "comfy"  # the model comes from ComfyUI's own loaders


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
    """The job dict a node graph describes. A ComfyUI MODEL becomes `arch: comfy`."""
    s = copy.deepcopy(settings)
    name = s.pop("name", "my_lora")
    s.setdefault("training_folder", default_folder)
    s.setdefault("train", {})["steps"] = steps
    if "comfy" in model_part:
        model = {"arch": COMFY_ARCH, "name_or_path": "<ComfyUI MODEL>"}
    else:
        model = model_part["model"]
    return assemble_job(name, model, datasets, network, s)


def parts_from_job(data: dict) -> tuple[dict, list[dict], dict, dict, int]:
    """(model part, datasets, network, settings, steps) of a job dict, as the nodes pass them."""
    name, model, datasets, network, settings = split_job(data)
    settings["name"] = name
    steps = int(settings.get("train", {}).pop("steps", 1000))
    return {"model": model}, datasets, network, settings, steps


def split_job(data: dict) -> tuple[str, dict, list[dict], dict, dict]:
    """The inverse of assemble_job: (name, model, datasets, network, settings) of a job dict."""
    job = load_job_dict(data)  # validates, with key paths in the errors
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
        from .job import build_trainer

        self.job: JobConfig = load_job_dict(job_dict)
        # keep the text encoders: sample() encodes any prompt, not only the cached captions
        self.trainer: Trainer = build_trainer(self.job, report, model=model, keep_text_encoders=True)
        self.trainer.network.detach()
        self.losses: list[tuple[int, float]] = []

    @property
    def step(self) -> int:
        return self.trainer.state.step

    def advance(self, steps: int, on_step: Callable[[int, float], None] | None = None) -> int:
        """Train `steps` more steps (the run's train.steps grows to fit); returns the step reached."""
        tr = self.trainer
        target = tr.state.step + steps
        if target > tr.cfg.train.steps:
            tr.cfg.train.steps = target
            tr.scheduler = _rescheduled(tr, target)

        def cb(step: int, loss: float) -> None:
            self.losses.append((step, loss))
            if on_step is not None:
                on_step(step, loss)

        tr.on_step = cb
        tr.network.attach()
        try:
            tr.train(until=target)
        finally:
            tr.network.detach()
        return tr.state.step

    def sample(self, prompt: str, width: int, height: int, steps: int, guidance: float, seed: int, neg: str = ""):
        from .models.base import SampleRequest, split_conditioning
        from .sampling import sample_image

        m = self.trainer.model
        conds = split_conditioning(m.encode_text([prompt, neg]))
        req = SampleRequest({k: v[None] for k, v in conds[0].items()}, {k: v[None] for k, v in conds[1].items()},
                            width, height, steps, guidance, seed)
        self.trainer.network.attach()
        self.trainer.network.eval()
        try:
            return sample_image(m, req)
        finally:
            self.trainer.network.train()
            self.trainer.network.detach()

    def export(self, dtype_name: str | None = None) -> tuple[dict, dict[str, str]]:
        from .train.checkpoints import DTYPES

        tensors = self.trainer.network.export(DTYPES[dtype_name or self.job.process.save.dtype])
        return tensors, self.trainer.metadata()

    def yaml(self) -> str:
        return dump_job_yaml(self.job)


def _rescheduled(tr: Trainer, total: int):
    """The lr schedule stretched to a new total, continuing from the current step."""
    from .train.optim import build_scheduler

    tc = tr.cfg.train
    for g in tr.optimizer.param_groups:
        g.setdefault("initial_lr", tc.lr)
    sched = build_scheduler(tr.optimizer, tc.lr_scheduler, total, tc.lr_warmup_steps, dict(tc.lr_scheduler_params))
    sched.last_epoch = tr.state.step - 1
    sched.step()
    return sched
