"""The stage graph of a job: model -> prepare -> datasets -> caches -> network -> train (sample, save).

The CLI and the ComfyUI nodes call these same stages; a model a host already loaded enters at the same
place as one loaded here and passes through the same preparation (trainer.prepare).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from .config import JobConfig, dump_job_yaml
from .data.cache import LatentCache, TextCache, text_image_pairs
from .data.dataset import Dataset, Geometry, check_dataset_folder, scan_dataset
from .errors import ConfigError, UserError
from .fileio import write_text_atomic
from .models import registry
from .models.base import TrainingModel
from .models.files import local_path, refuse_pickle, safetensors_shapes
from .models.fingerprint import file_fingerprint, module_fingerprint
from .networks.network import Network, build_network, read_network_file
from .prepare import choose_attention, compile_model, prepare_for_encoding, prepare_for_training
from .previews import prepare_samples
from .train.auto_checkpointing import plan_checkpointing
from .train.checkpoints import DTYPES, RunFolder
from .train.cuda_graphs import check_config as check_cuda_graphs
from .train.sharding import check_config as check_sharding, shard_denoiser
from .train.distributed import Distributed, require_single_process
from .train.loop import Trainer, TrainState
from .train.run_identity import check_job_fits_state, run_identity

log = logging.getLogger("trainer")


def pick_device(requested: str | None) -> torch.device:
    if requested:
        try:
            dev = torch.device(requested)
        except (RuntimeError, ValueError):
            raise ConfigError(f"config.process[0].device: {requested!r} is not a device (cpu, cuda, cuda:1 ...)") from None
        if dev.type not in ("cpu", "cuda"):
            raise ConfigError(f"config.process[0].device: {requested!r}: training runs on cpu or cuda")
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"config.process[0].device: {requested!r} asked for, but no CUDA device is available")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ConfigError(f"config.process[0].device: {requested!r}: this machine has"
                                  f" {torch.cuda.device_count()} CUDA devices")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype == torch.float16:
        log.warning("train.dtype fp16 is not supported on CPU; training in fp32")
        return torch.float32
    return dtype


def load_model(job: JobConfig, device: torch.device, dtype: torch.dtype) -> TrainingModel:
    """The model from files: the family's own loader, or ComfyUI's loaders on the comfyui backend."""
    mc = job.process.model
    if mc.backend == "comfyui":
        from .models.comfy_files import load_with_comfyui

        return load_with_comfyui(mc, device, dtype)
    return registry.get_family(job.arch).load(mc, device, dtype)


def base_model_id(job: JobConfig, model: TrainingModel) -> str:
    """Identifies the base model a run trains: its file (size and sampled blocks: seconds for any size), or, for a
    model a host handed over, its weights (a few sampled tensors, before any preparation changes them)."""
    path = Path(str(job.process.model.name_or_path)).expanduser()
    if path.exists():
        return f"file:{file_fingerprint(path)}"
    return f"weights:{module_fingerprint(model.denoiser)}"


def finished_run(job: JobConfig) -> Path | None:
    """The final file, if the run folder holds a finished run of this job whose final file reads: checked before
    anything loads. A damaged final file is not finished (the run is loaded and saves it again from its state)."""
    run_dir = job.run_dir
    final = run_dir / f"{job.name}.safetensors"
    state = run_dir / "training_state.safetensors"
    if not (final.is_file() and state.is_file()):
        return None
    from .train.state_file import read_state_step

    step = read_state_step(state)
    if step is None or step < job.process.train.steps:
        return None
    try:
        safetensors_shapes(final)
    except UserError:
        return None
    return final


def check_before_loading(job: JobConfig, model_files: bool = True) -> None:
    """What can be checked from the config and the file system alone, before a model file is opened.
    `model_files`: the model loads from the job's files (not handed over by a host), so they must exist."""
    for i, d in enumerate(job.process.datasets):
        check_dataset_folder(d, i)
    if model_files:
        check_model_files(job.process.model)
        if job.process.model.backend == "diffusers":
            check_tokenizers(job)
    if job.process.network.pretrained_lora_path:
        local_path(job.process.network.pretrained_lora_path, "network.pretrained_lora_path")
    check_cuda_graphs(job, pick_device(job.process.device))
    check_sharding(job)
    if job.process.train.optimizer == "adamw8bit":
        device = pick_device(job.process.device)
        if device.type != "cuda":
            raise ConfigError(f"config.process[0].train.optimizer: adamw8bit needs a CUDA device (bitsandbytes);"
                              f" use adamw on {device.type}")


def check_model_files(mc) -> None:
    """Every file the model section names exists and is not a pickle checkpoint (named by key)."""
    named = [("model.name_or_path", mc.name_or_path), ("model.vae_path", mc.vae_path),
             ("model.clip_vision_path", mc.clip_vision_path), ("model.assistant_lora_path", mc.assistant_lora_path)]
    named += [(f"model.text_encoder_paths[{i}]", p) for i, p in enumerate(mc.text_encoder_paths)]
    named += [(f"model.tokenizer_paths[{i}]", p) for i, p in enumerate(mc.tokenizer_paths)]
    for key, value in named:
        if value:
            refuse_pickle(local_path(value, key), key)


def check_tokenizers(job: JobConfig) -> None:
    """The tokenizers the family's loader will look for are there (a missing one is said before a long load)."""
    from .models.sources import ModelSources

    fam = registry.get_family(job.arch)
    if not fam.tokenizers:
        return
    src = ModelSources(job.process.model, job.arch)
    for kind, index, component in fam.tokenizers:
        src.tokenizer_folder(kind, src.tokenizer_path(index), component)


def load_datasets(job: JobConfig, model: TrainingModel) -> list[Dataset]:
    geometry = Geometry(model.pixel_factor, model.vae_temporal, model.native_fps)
    return [scan_dataset(d, i, job.process.trigger_word, geometry) for i, d in enumerate(job.process.datasets)]


def prepare_caches(job: JobConfig, model: TrainingModel, datasets: list[Dataset],
                   report: Callable[[str], None]) -> tuple[LatentCache, TextCache | None]:
    latents = LatentCache(datasets, model.latent_cache_id(), fallback_dir=job.run_dir)
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
            captions.update(m.caption for m in d.media)
            if d.cfg.caption_dropout_rate > 0:
                captions.add("")
        texts = TextCache()
        report(f"encoding {len(captions)} captions")
        texts.prepare(model, sorted(captions))
        if model.text_takes_images:  # each item's caption(s) with its control image, as the text encoder reads them
            pairs = text_image_pairs(latents, item_captions)
            if pairs:
                report(f"encoding {len(pairs)} captions with their control images")
                texts.prepare_with_images(model, pairs)
    return latents, texts


def item_captions(ds: Dataset, caption: str) -> list[str]:
    """The captions an item trains with: its own, and the empty one where its dataset drops captions."""
    return [caption, ""] if ds.cfg.caption_dropout_rate > 0 else [caption]


def make_network(job: JobConfig, model: TrainingModel) -> Network:
    model.denoiser.requires_grad_(False)  # only the network trains: no gradients for the base weights
    tc = job.process.train
    targets = model.targets() if tc.train_unet else []
    if tc.train_text_encoder:
        targets = targets + model.text_encoder_targets()
    # the initial weights are a function of train.seed, so runs are reproducible
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tc.seed)
        net = build_network(targets, job.process.network)
    path = job.process.network.pretrained_lora_path
    if path:
        net.import_(read_network_file(local_path(path, "network.pretrained_lora_path")), str(path))
    return net.to(model.device).attach()


def build_trainer(job: JobConfig, report: Callable[[str], None] = print, model: TrainingModel | None = None,
                  keep_text_encoders: bool = False, extendable: bool = False, restart: bool = False,
                  dist: Distributed | None = None) -> Trainer:
    """Every stage up to a ready Trainer. `model`: a model a host already loaded (ComfyUI's MODEL), prepared
    exactly as a loaded one. `keep_text_encoders`: keep them (off the card) even with cached embeddings, for a
    session that samples any prompt later; `extendable`: a session continues a run past its train.steps;
    `restart`: the run folder's state is set aside and the run starts over. `dist`: this rank of a multi-process
    launch (train/distributed.py): it trains on its own device, and the run folder is the main rank's to write."""
    proc = job.process
    check_before_loading(job, model_files=model is None)
    run = RunFolder(job.run_dir, job.name)

    def take_folder() -> None:
        run.lock()
        if restart:
            run.restart()

    if dist is None:
        take_folder()
    else:  # the main rank's folder; the others wait, then read the same state
        dist.main_runs("the run folder", take_folder)
    # read once: a changed job is refused now, not after a long model load; the Trainer resumes from it
    saved = None if restart else run.load_state()
    if saved is not None:
        check_job_fits_state(job, saved, run.state_path, extendable)
    if model is None:
        device = dist.device if dist is not None else pick_device(proc.device)
        dtype = pick_dtype(proc.train.dtype, device)
        report(f"loading {job.arch} from {proc.model.name_or_path} on {device} ({dtype})")
        model = load_model(job, device, dtype)
    identity = run_identity(job, base_model_id(job, model), dist.world if dist is not None else 1)
    prepare_for_encoding(model, job, report)
    datasets = load_datasets(job, model)
    n_clips = sum(m.info.is_video for d in datasets for m in d.media)
    n_files = sum(len(d.media) for d in datasets)
    what = f"{n_files - n_clips} images, {n_clips} videos" if n_clips else f"{n_files} images"
    report(f"{what}, {sum(len(d.entries) for d in datasets)} training entries")
    def caches() -> tuple[LatentCache, TextCache | None]:
        return prepare_caches(job, model, datasets, report)

    # several ranks: a disk cache is written by the main rank, then read by the others; a memory cache (and the
    # captions' embeddings) each rank encodes for itself
    if dist is not None and any(d.cfg.cache_latents_to_disk for d in datasets):
        latents, texts = dist.main_first("the caches", caches)
    else:
        latents, texts = caches()
    samples = [] if proc.train.disable_sampling else prepare_samples(job, model)
    largest = max((e.key for d in datasets for e in d.entries), key=lambda k: k[0] * k[1] * k[2])
    sharded = dist is not None and dist.sharded
    prepare_for_training(model, job, texts is not None, keep_text_encoders, report, largest, place=not sharded)
    network = make_network(job, model)
    if sharded:  # after the network: DoRA starts from the base's whole weights
        shard_denoiser(model, dist.device, report)
    choose_attention(model, job, sorted({e.key for d in datasets for e in d.entries}), report)
    n_params = sum(p.numel() for p in network.parameters())
    check_disk_room(run.root, n_params, proc.save.dtype)
    report(f"{proc.network.type} rank {proc.network.linear} on {len(network.targets)} layers"
           f" ({n_params / 1e6:.2f}M parameters)")
    trainer = Trainer(job, model, network, datasets, latents, texts, samples, run, identity, dist)
    changes = trainer.resume(saved, extendable)
    if changes is not None:
        report(f"resuming {run.root} from step {trainer.state.step}")
        for c in changes:
            report(f"  changed since the run began, applied from step {trainer.state.step}: {c}")
    if dist is not None:
        dist.broadcast_from_main(trainer.params)
    if proc.train.gradient_checkpointing == "auto":  # measured on the trained weights, before compile traces the blocks
        plan_checkpointing(trainer, largest, report)
    compile_model(model, job, report)
    if trainer.writes:
        write_text_atomic(run.root / "config.yaml", dump_job_yaml(job))
    return trainer


def check_disk_room(folder: Path, n_params: int, save_dtype: str) -> None:
    """Refuse a run whose folder cannot hold what it writes: two LoRA saves (a new one is written beside the last
    before the older goes) and two resume states (the network in fp32 with AdamW's two moments), so a long run does
    not end in a failed save."""
    import shutil

    save = n_params * DTYPES[save_dtype].itemsize
    state = n_params * 4 * 3
    need = 2 * save + 2 * state
    free = shutil.disk_usage(folder).free
    if free < need:
        raise UserError(f"{folder}: {free / 2**30:.2f} GiB free, and this run's saves and resume state need about"
                        f" {need / 2**30:.2f} GiB; free some space or set training_folder to another disk")


def run_job(job: JobConfig, report: Callable[[str], None] = print, progress=None) -> TrainState:
    """The job trained in this process (`torchrun ... -m trainer job.yaml` is the several-process path)."""
    require_single_process("run_job")
    final = finished_run(job)
    if final is not None:
        report(f"already finished: {final}")
        return TrainState(step=job.process.train.steps, last_save=str(final))
    trainer = build_trainer(job, report)
    if trainer.finished():
        report(f"already finished: {trainer.run.final_path}")
        return trainer.state
    return trainer.train(progress)

