"""The training loop. It reads top to bottom and knows nothing of the family it trains."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from ..config import JobConfig, dump_job_yaml
from ..data.cache import LatentCache, TextCache
from ..data.dataset import BatchPlan, Dataset, captions_for_batch
from ..errors import TrainingDiverged, UserError
from ..fileio import append_jsonl
from ..models.base import Conditioning, TrainingModel, collate_conditioning
from ..networks.network import Network
from ..previews import PreparedSample, save_preview
from ..sampling import sample, to_pil
from ..seeds import derived_seed
from .checkpoints import DTYPES, RunFolder, check_resumable
from .cuda_graphs import CaptureFailed, GraphedMicroStep
from .distributed import Distributed
from .optim import build_optimizer, build_scheduler
from .out_of_memory import OutOfMemory, out_of_memory_message
from .run_identity import changed_job_error, past_steps_error, split_changes
from .timesteps import expert_window, in_window, linear_timestep_weights

log = logging.getLogger("trainer")


@dataclass
class TrainState:
    step: int = 0
    last_save: str | None = None
    losses: list[float] = field(default_factory=list)


class Trainer:
    """One training run: the model, its network, the data and the run folder, stepped to `train.steps`."""

    def __init__(
        self,
        job: JobConfig,
        model: TrainingModel,
        network: Network,
        datasets: list[Dataset],
        latents: LatentCache,
        texts: TextCache | None,
        samples: list[PreparedSample],
        run: RunFolder,
        identity: dict | None = None,
        dist: Distributed | None = None,
    ) -> None:
        self.job, self.cfg = job, job.process
        self.identity = identity or {}  # what the run depends on (run_identity.py), kept in the state
        self.model, self.network = model, network
        self.datasets, self.latents, self.texts = datasets, latents, texts
        self.samples = samples
        self.run = run
        # several ranks (distributed.py): the plan is the global batch's, each rank trains its share of it, and
        # only the main rank writes (saves, previews, metrics)
        self.dist = dist
        self.writes = dist is None or dist.is_main
        # train.distributed fsdp: every forward is a collective of the ranks, so every rank runs each one
        self.sharded = dist is not None and dist.sharded
        tc = self.cfg.train
        world = dist.world if dist is not None else 1
        self.plan = BatchPlan(datasets, tc.batch_size * world, tc.seed)
        self.samples_per_step = tc.batch_size * world * tc.gradient_accumulation
        groups = network.param_groups(tc.lr, tc.text_encoder_lr)
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = build_optimizer(tc.optimizer, groups, tc.lr, dict(tc.optimizer_params), model.device)
        self.scheduler = self._schedule(tc.steps)
        fp16 = model.dtype == torch.float16 and model.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
        self.state = TrainState()
        # train.cuda_graphs: each micro-step's forward and backward replayed from a graph per input shape
        self.graphs = GraphedMicroStep(self.forward_backward, model.device, self.params) if tc.cuda_graphs else None
        self.micro_step = self.graphs or self.forward_backward
        self.network_shapes = {k: tuple(v.shape) for k, v in network.state_dict().items()}

    def _schedule(self, total: int):
        tc = self.cfg.train
        return build_scheduler(self.optimizer, tc.lr_scheduler, total, tc.lr_warmup_steps, dict(tc.lr_scheduler_params))

    def _reschedule(self, total: int) -> None:
        """A schedule over `total` steps, positioned at the current step (the optimizer's lr set to it)."""
        import warnings

        self.scheduler = self._schedule(total)
        self.scheduler.last_epoch = self.state.step - 1
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*optimizer.step.*")
            self.scheduler.step()

    def extend_to(self, total: int) -> None:
        """Grow the run to `total` steps (a session that trains on): the schedule is stretched to the new total
        from the current step, and the job (written into saves' metadata) records the new step count."""
        if total <= self.cfg.train.steps:
            return
        self.cfg.train.steps = total
        self.job.raw["config"]["process"][0].setdefault("train", {})["steps"] = total
        for g in self.optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self._reschedule(total)

    # --- persistence ---------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        nc = self.cfg.network
        md = {
            **self.model.save_metadata(),
            "ss_network_module": f"eridiffusion.networks.{nc.type}",
            "ss_network_dim": str(nc.linear),
            "ss_network_alpha": str(nc.alpha),
            "eridiffusion.network_type": nc.type,
            "eridiffusion.step": str(self.state.step),
            "eridiffusion.job": dump_job_yaml(self.job),
        }
        if self.cfg.trigger_word:
            md["ss_trigger_word"] = self.cfg.trigger_word
        return md

    def check_finite(self) -> None:
        """A network with a non-finite weight is never written: the run stops with the last good save named."""
        for name, t in self.network.state_dict().items():
            if not bool(torch.isfinite(t).all()):
                saved = self.state.last_save or "nothing was saved yet"
                raise TrainingDiverged(
                    f"the network's {name} became non-finite at step {self.state.step}; nothing was written."
                    f" Last good save: {saved}. Try a lower train.lr or a smaller train.max_grad_norm."
                )

    def save(self, final: bool = False) -> None:
        self.check_finite()
        path = self.run.final_path if final else self.run.step_path(self.state.step)
        self._on_main(f"save {path.name}", lambda: self._write_and_prune(path, final))
        self.state.last_save = str(path)

    def _write_and_prune(self, path, final: bool) -> None:
        try:
            self._write(path, final)
        except OSError as e:  # disk full, read-only folder ...: the atomic writes left the previous files whole
            kept = self.state.last_save or "nothing was saved yet"
            raise UserError(f"{path}: cannot write the save ({e.strerror or e}); the previous save is intact ({kept})."
                            " Free space in the training folder (or fix its permissions) and run again to resume.") from None
        if not final:
            self.run.prune(self.cfg.save.max_step_saves_to_keep)

    def _on_main(self, what: str, fn: Callable[[], object]) -> object:
        """Run `fn` here, or with several ranks on the main rank while the others wait for it (a long preview is
        not a collective's timeout)."""
        return fn() if self.dist is None else self.dist.main_runs(what, fn)

    def _write(self, path, final: bool) -> None:
        tensors = self.network.export(DTYPES[self.cfg.save.dtype])
        self.run.save_network(path, tensors, self.metadata())
        self.run.save_state({
            "step": self.state.step,
            "arch": self.model.arch,
            "network": {k: v.detach().cpu() for k, v in self.network.state_dict().items()},
            "network_shapes": {k: list(v) for k, v in self.network_shapes.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "last_save": str(path),
            "identity": self.identity,
        })

    def resume(self, st: dict | None, extendable: bool = False) -> list[str] | None:
        """Continue from `st`, the run folder's state as read (None: nothing to resume). Returns the job changes
        applied from the resume step (empty: the same job), or raises with the changes the saved state cannot take.
        `extendable`: a state past train.steps extends the run (a session that trains on) instead of an error."""
        if st is None:
            return None
        refused, applied = split_changes(st.get("identity") or {}, self.identity) if st.get("identity") else ([], [])
        if refused:
            raise changed_job_error(self.run.state_path, refused)
        check_resumable(st, self.network_shapes, self.model.arch, max(self.cfg.train.steps, st.get("step", 0)),
                        self.run.state_path)
        if st["step"] > self.cfg.train.steps and extendable:
            self.extend_to(st["step"])
        elif st["step"] > self.cfg.train.steps:
            raise past_steps_error(self.run.state_path, st["step"], self.cfg.train.steps)
        self.network.load_state_dict(st["network"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.state.step = st["step"]
        self.state.last_save = st.get("last_save")
        if self.scaler and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        if applied or extendable:
            self._apply_current_settings()
        else:
            self.scheduler.load_state_dict(st["scheduler"])
        if self.writes:
            self.run.trim_metrics(self.state.step)
        return applied

    def _apply_current_settings(self) -> None:
        """After a resume with a changed job: the job's lr, optimizer parameters and schedule from this step on."""
        tc = self.cfg.train
        groups = self.network.param_groups(tc.lr, tc.text_encoder_lr)
        for g, want in zip(self.optimizer.param_groups, groups):
            g.update({k: v for k, v in tc.optimizer_params.items()})
            g["lr"] = g["initial_lr"] = want["lr"]
        self._reschedule(tc.steps)

    def finished(self) -> bool:
        """At train.steps with a final file that reads (a damaged one is written again by train())."""
        if self.state.step < self.cfg.train.steps or not self.run.final_path.is_file():
            return False
        from ..models.files import safetensors_shapes

        try:
            safetensors_shapes(self.run.final_path)
        except UserError:
            return False
        return True

    # --- one step ------------------------------------------------------------------------------
    def _conditioning(self, captions: list[str], batch: list, micro: int, first: int = 0) -> Conditioning:
        if self.model.text_takes_images:  # each caption read with its item's control image (where it has one)
            keys = self.latents.text_image_keys(batch, self.cfg.train.seed, micro, first)
            if self.texts is not None:
                return collate_conditioning([self.texts.get(c, k) for c, k in zip(captions, keys)])
            images = [None if k is None else self.latents.control_pixels(it) for it, k in zip(batch, keys)]
            return self.model.encode_text_with_images(captions, images)
        if self.texts is not None:
            return collate_conditioning([self.texts.get(c) for c in captions])
        return self.model.encode_text_for_training(captions)

    def _share(self, n: int) -> slice:
        """This rank's items of a global batch of `n` (all of them in one process)."""
        return slice(0, n) if self.dist is None else self.dist.share(n)

    def batch_inputs(self, micro: int, gen: torch.Generator, stand_in: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Conditioning] | None:
        """(latents, noise, sigmas, conditioning) of this rank's share of micro-batch `micro`, on the training
        device; every random draw comes from `gen`, drawn for the whole batch (so a share's draws are what one
        process would draw for those items). None: the share is empty (a short last batch), after the draws;
        with `stand_in`, the batch's first item instead (for a forward whose loss does not count)."""
        tc = self.cfg.train
        batch = self.plan.batch(micro)
        share = self._share(len(batch))
        mine = batch[share]
        items = mine or batch[:1]  # an empty share takes the batch's shape from its first item
        first = share.start if mine else 0
        latents = torch.stack([self.latents.get(it.dataset, it.entry, self.model) for it in items]).float()
        cond = self._conditioning(captions_for_batch(self.datasets, items, tc.seed, micro, first), items, micro, first)
        # per-item conditions (control latents, I2V start images) of families that take them
        cond = {**cond, **self.latents.conditions_for_batch(items, self.model, tc.seed, micro, first)}
        if self.model.conditions_on_fps:
            native = self.model.native_fps or 16.0
            cond["fps"] = torch.tensor([self.datasets[it.dataset].cfg.fps or native for it in items])
        lead = self.model.leading_frames_key
        if lead is not None and lead in cond:  # reference frames (VACE) are trained on before the item's own
            latents = torch.cat([cond[lead], latents], dim=2)
        whole = (len(batch), *latents.shape[1:])
        noise = torch.randn(whole, generator=gen)
        if tc.noise_offset:
            # one offset per sample and channel, over every spatial (and frame) position
            noise = noise + tc.noise_offset * torch.randn((*whole[:2], *[1] * (len(whole) - 2)), generator=gen)
        sigmas = self.train_sigmas(len(batch), gen, whole)
        if not mine:
            if not stand_in:
                return None
            share = slice(0, 1)
        dev = self.model.device
        return latents.to(dev), noise[share].to(dev), sigmas[share].to(dev), cond

    def train_sigmas(self, batch: int, gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
        """The batch's noise levels: the family's distribution, kept to model.expert's share of the schedule."""
        kind = self.cfg.train.timestep_type
        window = expert_window(self.cfg.model.expert, self.cfg.model.expert_boundary)
        if window is None:
            return self.model.train_sigmas(kind, batch, gen, shape)
        return in_window(lambda n: self.model.train_sigmas(kind, n, gen, (n, *shape[1:])),
                         self.model.schedule_position, batch, window)

    def loss_weights(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights: linear_timesteps (a bell over the schedule) and min-SNR-gamma."""
        tc = self.cfg.train
        weights = torch.ones_like(sigmas, dtype=torch.float32)
        if tc.linear_timesteps:
            weights = weights * linear_timestep_weights(self.model.schedule_position(sigmas).to(sigmas.device))
        if tc.snr_gamma:
            weights = weights * self.model.objective.min_snr_weights(sigmas, tc.snr_gamma)
        return weights

    def _loss(self, micro: int, gen: torch.Generator) -> torch.Tensor | None:
        """This rank's items' part of the micro-batch's mean loss (their sum over the whole batch's size: the ranks'
        parts add up to the mean); None when it has no items."""
        inputs = self.batch_inputs(micro, gen)
        if inputs is None:
            return None
        return self.loss_of(*inputs, len(self.plan.batch(micro)))

    def loss_of(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning,
                items: int) -> torch.Tensor:
        """The loss of a drawn batch, summed over its items and divided by `items` (the whole micro-batch's): the
        step's work on the card, from inputs on the card (what a CUDA graph captures)."""
        obj = self.model.objective
        noisy = obj.add_noise(latents, noise, sigmas)
        known = self.model.known_latents(cond, latents)
        if known is not None:  # frames the conditioning gives (I2V's start frame) go in clean
            values, given = (t.to(latents.device, latents.dtype) for t in known)
            noisy = noisy * (1 - given) + values * given
        pred = self.model.predict(noisy, sigmas, cond, guidance=self.model.train_guidance).float()
        target = obj.target(latents, noise, sigmas)
        err = (pred - target) ** 2
        dims = tuple(range(1, pred.dim()))
        if known is None:
            per_sample = err.mean(dim=dims)
        else:  # the mean over what the model generates: given frames teach nothing
            free = (1 - given).expand_as(err)
            per_sample = (err * free).sum(dim=dims) / free.sum(dim=dims).clamp_min(1.0)
        return (per_sample * self.loss_weights(sigmas)).sum() / items

    def forward_backward(self, inputs: tuple, weight: float = 1.0) -> torch.Tensor:
        """One micro-batch's loss (divided by the micro-batches a step takes) and its backward, the gradients
        accumulated into the parameters' .grad; returns the loss, detached. `inputs`: batch_inputs(), the batch's
        item count, the micro-batches a step takes. `weight` 0: a stand-in whose loss and gradients are zero."""
        latents, noise, sigmas, cond, items, accumulation = inputs
        loss = self.loss_of(latents, noise, sigmas, cond, items) / accumulation
        if weight != 1.0:
            loss = loss * weight
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        return loss.detach()

    def step(self) -> float:
        tc = self.cfg.train
        step = self.state.step
        seed = derived_seed(tc.seed, step)
        torch.manual_seed(seed)  # dropout and anything else drawing from the global generator
        gen = torch.Generator().manual_seed(seed)
        total = 0.0
        for a in range(tc.gradient_accumulation):
            micro = step * tc.gradient_accumulation + a
            n = len(self.plan.batch(micro))
            share = self._share(n)
            # no item here: skipped, or under fsdp a stand-in forward at weight 0 (the others' gathers need this
            # rank's part)
            inputs = self.batch_inputs(micro, gen, stand_in=self.sharded)
            if inputs is None:
                continue
            args = (*inputs, n, tc.gradient_accumulation)
            try:
                loss = self.micro_step(args) if share.stop > share.start else self.forward_backward(args, weight=0.0)
            except CaptureFailed as e:  # the weights are the last step's: saved, then the run stops
                self._save_before_stop(step)
                raise UserError(f"config.process[0].train.cuda_graphs: {e}. The run stopped at step {step}, saved"
                                f" ({self.state.last_save}); set train.cuda_graphs: false and run the same command to"
                                " resume.") from None
            except torch.cuda.OutOfMemoryError:  # before the update: the weights are the last step's
                self._save_before_stop(step)
                raise OutOfMemory(out_of_memory_message(self.cfg, self.model.device, f"step {step + 1}",
                                                        self.state.last_save, self.model.host_places_weights)) from None
            # read after the backward is queued (the one host sync of a step: reading it between forward and
            # backward would hold the backward's launches until the forward had finished on the card)
            value = float(loss)
            if not math.isfinite(value):
                self.optimizer.zero_grad(set_to_none=True)
                saved = self.state.last_save or "nothing was saved yet"
                raise TrainingDiverged(
                    f"loss became {value} at step {step + 1}; training stopped before the weights were touched."
                    f" Last good save: {saved}. Try a lower train.lr, train.dtype bf16 instead of fp16,"
                    f" or a smaller train.max_grad_norm."
                )
            total += value
        if self.dist is not None:  # the ranks' gradients summed: every rank steps with the global batch's
            total = self.dist.sum_gradients(self.params, total, _peak_gib(self.model.device))
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if tc.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, tc.max_grad_norm)
        with _interrupts_held():
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.state.step += 1
        return total

    def _save_before_stop(self, step: int) -> None:
        """A step that cannot go on, stopped before its update: the partial gradients dropped, the weights (the
        last step's) saved unless they are already or nothing was trained."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()  # room for the save's copies
        if step > 0 and self.state.last_save != str(self.run.step_path(step)):
            self.save()

    # --- sampling ------------------------------------------------------------------------------
    def sample(self, report: Callable[[str], None] | None = None) -> list:
        if not self.samples:
            return []
        if self.sharded:  # the sharded model samples on every rank at once; the main rank writes the previews
            images = self._sample_all(report if self.writes else None)
            return images if self.writes else []
        return self._on_main(f"sample at {self.state.step}", lambda: self._sample_all(report)) or []

    def _sample_all(self, report: Callable[[str], None] | None) -> list:
        if report is not None:
            report(f"sampling {len(self.samples)} previews at step {self.state.step}")
        self.network.eval()
        self.model.set_train_hooks(False)
        images = []
        try:
            for k, s in enumerate(self.samples, 1):
                t0 = time.perf_counter()
                try:
                    images.append(self._sample_one(s))
                except torch.cuda.OutOfMemoryError:
                    # a preview larger than what training left free: skipped, the run goes on
                    torch.cuda.empty_cache()
                    log.warning("preview %d/%d at step %d skipped: out of memory on the card (smaller"
                                " sample.width / height / num_frames fit)", k, len(self.samples), self.state.step)
                    continue
                if report is not None:
                    report(f"  preview {k}/{len(self.samples)} in {time.perf_counter() - t0:.1f}s")
        finally:
            self.model.set_train_hooks(True)
            self.network.train()
        return images

    def _sample_one(self, s: PreparedSample):
        request = s.request
        if self.network.trains_text_encoders:  # the prompts' embeddings change with the network
            with self.model.text_encoders_on_device():
                cond, neg = self.model.encode_text([s.prompt]), self.model.encode_text([s.neg])
            request = replace(request, cond={**request.cond, **cond}, neg_cond={**(request.neg_cond or {}), **neg})
        out = sample(self.model, request)
        if not self.writes:
            return None
        fps = self.cfg.sample.fps or self.model.native_fps or 16.0
        files = save_preview(out, self.run.samples / f"{self.state.step:09d}_{s.index:02d}", fps)
        img = to_pil(out if out.dim() == 3 else out[:, 0])
        append_jsonl(self.run.samples / "index.jsonl", {
            "step": self.state.step, "index": s.index, "prompt": s.prompt, "neg": s.neg, "seed": request.seed,
            "width": img.width, "height": img.height, "frames": out.shape[1] if out.dim() == 4 else 1,
            "steps": request.steps, "guidance_scale": request.guidance_scale, "control_image": s.control_image,
            "reference_image": s.reference_image,
            "file": files[0].name, **({"video": files[1].name, "fps": fps} if len(files) > 1 else {}),
        })
        return img

    # --- the run -------------------------------------------------------------------------------
    def train(self, progress=None, until: int | None = None, on_step: Callable[[int, float], None] | None = None,
              report: Callable[[str], None] | None = None) -> TrainState:
        """Step to `until` (default: train.steps); at train.steps the final file is written."""
        tc, sc = self.cfg.train, self.cfg.sample
        until = tc.steps if until is None else min(until, tc.steps)
        sampling = not tc.disable_sampling and bool(self.samples)
        self.model.ensure_loaded()
        self.network.train()
        self.model.set_train_hooks(True)
        try:
            if self.state.step == 0 and sampling and not tc.skip_first_sample:
                self.sample(report)
            t_last = time.perf_counter()
            while self.state.step < until:
                loss = self.step()
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                step = self.state.step
                self.state.losses.append(loss)
                rec = {"step": step, "loss": loss, "lr": self.scheduler.get_last_lr()[0], "s_per_step": dt,
                       "samples_per_s": self.samples_per_step / max(dt, 1e-9),
                       "peak_mem_gib": _peak_gib(self.model.device), "time": time.time()}
                if self.dist is not None and self.model.device.type == "cuda":
                    rec["rank_peak_mem_gib"] = self.dist.peaks
                if self.writes:
                    append_jsonl(self.run.metrics_path, rec)
                if progress is not None:
                    progress(rec)
                if on_step is not None:
                    on_step(step, loss)
                if step < tc.steps and step % self.cfg.save.save_every == 0:
                    self.save()
                if sampling and step < tc.steps and step % sc.sample_every == 0:
                    self.sample(report)
                t_last = time.perf_counter()  # saving and sampling time are not step time
        except UserError:
            raise  # a save that could not be written: nothing more to save
        except BaseException:
            # Ctrl-C, a cancel from the host (ComfyUI's interrupt) or a crash: keep what was trained
            self._save_on_stop()
            raise
        finally:
            self.model.set_train_hooks(False)
            if self.graphs is not None:
                (report or log.info)(f"train.cuda_graphs: {self.graphs.summary()}")
        if self.state.step >= tc.steps:
            self.save(final=True)
            if sampling:
                self.sample(report)
        elif self.state.step > 0 and self.state.last_save != str(self.run.step_path(self.state.step)):
            self.save()
        return self.state

    def _save_on_stop(self) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, TrainingDiverged) or self.state.step == 0 or not self.writes:
            return
        if self.state.last_save != str(self.run.step_path(self.state.step)):
            try:
                self.save()
            except TrainingDiverged:
                log.warning("the network is not finite at step %d: not saved", self.state.step)
            except UserError as e:  # the disk is full too: say so, and let the first error through
                log.warning("%s", e)


@contextlib.contextmanager
def _interrupts_held():
    """Ctrl-C and SIGTERM (a launcher's teardown of the other ranks) held over the update: the stop lands before it
    or after the step count, never between, so the save on stop names the step its weights are at. (Held by
    Python handlers, not a thread's signal mask: the kernel hands a process's signal to any of its threads.)"""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers are the main thread's; a host's training thread (ComfyUI) is stopped by its host
        return
    caught: list[int] = []
    held = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not None]  # None: not Python's
    before = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        for s in caught:  # delivered now, to the handler it was meant for
            signal.raise_signal(s)


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    except ImportError:
        return 0.0
