"""The stage graph of a job: model -> datasets -> caches -> network -> train (sample, save).

The CLI and the ComfyUI nodes call these same stages.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from .config import JobConfig, dump_job_yaml
from .data.cache import LatentCache, TextCache, sample_control_latent
from .data.captions import apply_trigger
from .data.dataset import Dataset, scan_dataset
from .fileio import write_text_atomic
from .models import registry
from .models.base import SampleRequest, TrainingModel, split_conditioning
from .networks.network import Network, build_network, read_network_file
from .train.checkpoints import DTYPES, RunFolder
from .train.loop import PreparedSample, Trainer, TrainState

log = logging.getLogger("trainer")


def pick_device(requested: str | None) -> torch.device:
    if requested:
        dev = torch.device(requested)
        if dev.type == "cuda" and not torch.cuda.is_available():
            from .errors import ConfigError

            raise ConfigError(f"config.process[0].device: {requested!r} asked for, but no CUDA device is available")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype == torch.float16:
        log.warning("train.dtype fp16 is not supported on CPU; training in fp32")
        return torch.float32
    return dtype


def load_model(job: JobConfig, device: torch.device, dtype: torch.dtype) -> TrainingModel:
    mc = job.process.model
    family = registry.get_family(job.arch)
    model = family.load(mc, str(device), dtype)
    if mc.quantize:
        from .models.quantize import quantize_blocks

        # the loaders leave the denoiser on the CPU: quantized there, it moves to the card at fp8 size
        n, saved = quantize_blocks(model.repeated_blocks())
        log.info("model.quantize: %d block linears stored in float8 e4m3 (%.1f GB less)", n, saved / 1e9)
    if device.type == "cuda":
        # cuDNN's SDPA backward fails on Flux-sized attention on H100 (see DESIGN.md); use flash/efficient
        torch.backends.cuda.enable_cudnn_sdp(False)
    gc = job.process.train.gradient_checkpointing
    model.set_gradient_checkpointing(1.0 if gc is True else float(gc or 0.0))
    return model


def load_datasets(job: JobConfig, model: TrainingModel) -> list[Dataset]:
    return [
        scan_dataset(d, i, job.process.trigger_word, model.pixel_factor) for i, d in enumerate(job.process.datasets)
    ]


def prepare_caches(job: JobConfig, model: TrainingModel, datasets: list[Dataset], report: Callable[[str], None]) -> tuple[LatentCache, TextCache | None]:
    latents = LatentCache(datasets, model.latent_cache_id())
    n = sum(len(d.entries) for d in datasets)
    report(f"encoding {n} training latents")
    latents.prepare(model)
    texts = None
    if job.process.train.cache_text_embeddings:
        captions = set()
        for d in datasets:
            if d.cfg.shuffle_tokens:
                log.warning("datasets[%d].shuffle_tokens is ignored with train.cache_text_embeddings", d.index)
                d.cfg.shuffle_tokens = False
            captions.update(im.caption for im in d.images)
            if d.cfg.caption_dropout_rate > 0:
                captions.add("")
        texts = TextCache()
        report(f"encoding {len(captions)} captions")
        texts.prepare(model, sorted(captions))
    return latents, texts


def prepare_samples(job: JobConfig, model: TrainingModel) -> list[PreparedSample]:
    sc = job.process.sample
    if job.process.train.disable_sampling:
        return []
    items = sc.items()
    if not items:
        return []
    trigger = job.process.trigger_word
    prompts = [apply_trigger(it.prompt, trigger) if "[trigger]" in it.prompt else it.prompt for it in items]
    negs = [it.neg or "" for it in items]
    conds = split_conditioning(model.encode_text(prompts))
    neg_conds = split_conditioning(model.encode_text(negs))
    out = []
    for i, it in enumerate(items):
        req = SampleRequest(
            cond={k: v[None] for k, v in conds[i].items()},
            neg_cond={k: v[None] for k, v in neg_conds[i].items()},
            width=it.width, height=it.height, steps=sc.sample_steps, guidance_scale=it.guidance_scale, seed=it.seed,
        )
        if it.control_image:
            req.cond["control"] = sample_control_latent(model, it.control_image, it.width, it.height,
                                                        f"config.process[0].sample.samples[{i}].control_image")
        out.append(PreparedSample(i, prompts[i], req, negs[i]))
    return out


def make_network(job: JobConfig, model: TrainingModel) -> Network:
    model.denoiser.requires_grad_(False)  # only the network trains: no gradients for the base weights
    targets = model.targets()
    if job.process.train.train_text_encoder:
        targets = targets + model.text_encoder_targets()
    # the initial weights are a function of train.seed, so runs are reproducible
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.process.train.seed)
        net = build_network(targets, job.process.network)
    path = job.process.network.pretrained_lora_path
    if path:
        from .models.files import local_path

        net.import_(read_network_file(local_path(path, "network.pretrained_lora_path")), str(path))
    return net.to(model.device).attach()


def build_trainer(job: JobConfig, report: Callable[[str], None] = print, model: TrainingModel | None = None,
                  keep_text_encoders: bool = False) -> Trainer:
    """Every stage up to a ready Trainer. `model` is a model a host already loaded (ComfyUI's).
    `keep_text_encoders`: keep them even with cached embeddings (a session samples any prompt later)."""
    proc = job.process
    run = RunFolder(job.run_dir, job.name)
    write_text_atomic(run.root / "config.yaml", dump_job_yaml(job))
    if model is None:
        device = pick_device(proc.device)
        dtype = pick_dtype(proc.train.dtype, device)
        report(f"loading {job.arch} from {proc.model.name_or_path} on {device} ({dtype})")
        model = load_model(job, device, dtype)
    datasets = load_datasets(job, model)
    report(f"{sum(len(d.images) for d in datasets)} images, {sum(len(d.entries) for d in datasets)} training entries")
    latents, texts = prepare_caches(job, model, datasets, report)
    samples = prepare_samples(job, model)
    if texts is not None and not keep_text_encoders:
        model.release_text_encoders()
    model.place_denoiser()  # after the encoders had the card to themselves
    network = make_network(job, model)
    if proc.train.compile:
        report("compiling the model's blocks (the first steps of each new size take longer)")
        model.compile_blocks()
    n_params = sum(p.numel() for p in network.parameters())
    report(f"{proc.network.type} rank {proc.network.linear} on {len(network.targets)} layers ({n_params / 1e6:.2f}M parameters)")
    trainer = Trainer(job, model, network, datasets, latents, texts, samples, run)
    if trainer.resume():
        report(f"resuming {run.root} from step {trainer.state.step}")
    return trainer


def run_job(job: JobConfig, report: Callable[[str], None] = print, progress=None) -> TrainState:
    trainer = build_trainer(job, report)
    if trainer.state.step >= job.process.train.steps and trainer.run.final_path.exists():
        report(f"already finished: {trainer.run.final_path}")
        return trainer.state
    return trainer.train(progress)
