"""The training loop. It reads top to bottom and knows nothing of the family it trains."""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from ..config import JobConfig
from ..data.cache import LatentCache, TextCache
from ..data.dataset import BatchPlan, Dataset, captions_for_batch
from ..errors import TrainingDiverged
from ..fileio import append_jsonl, atomic_path
from ..models.base import Conditioning, SampleRequest, TrainingModel, collate_conditioning
from ..networks.network import Network
from ..sampling import sample_image, to_pil
from .checkpoints import DTYPES, RunFolder, check_resumable
from .optim import build_optimizer, build_scheduler
from .timesteps import linear_timestep_weights

log = logging.getLogger("trainer")


def derived_seed(seed: int, *keys: int) -> int:
    h = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


@dataclass
class PreparedSample:
    index: int
    prompt: str
    request: SampleRequest
    neg: str = ""  # the negative prompt, re-encoded with the prompt where the text encoders train


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
        on_step: Callable[[int, float], None] | None = None,
    ) -> None:
        self.job, self.cfg = job, job.process
        self.model, self.network = model, network
        self.datasets, self.latents, self.texts = datasets, latents, texts
        self.samples = samples
        self.run = run
        self.on_step = on_step
        tc = self.cfg.train
        self.plan = BatchPlan(datasets, tc.batch_size, tc.seed)
        groups = network.param_groups(tc.lr, tc.text_encoder_lr)
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = build_optimizer(tc.optimizer, groups, tc.lr, dict(tc.optimizer_params), model.device)
        self.scheduler = build_scheduler(self.optimizer, tc.lr_scheduler, tc.steps, tc.lr_warmup_steps, dict(tc.lr_scheduler_params))
        fp16 = model.dtype == torch.float16 and model.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
        self.state = TrainState()
        self.network_shapes = {k: tuple(v.shape) for k, v in network.state_dict().items()}

    # --- persistence ---------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        from ..config import dump_job_yaml

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

    def save(self, final: bool = False) -> None:
        tensors = self.network.export(DTYPES[self.cfg.save.dtype])
        path = self.run.final_path if final else self.run.step_path(self.state.step)
        self.run.save_network(path, tensors, self.metadata())
        self.run.save_state({
            "step": self.state.step,
            "arch": self.model.arch,
            "network": {k: v.detach().cpu() for k, v in self.network.state_dict().items()},
            "network_shapes": self.network_shapes,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "last_save": str(path),
        })
        if not final:
            self.run.prune(self.cfg.save.max_step_saves_to_keep)
        self.state.last_save = str(path)

    def resume(self) -> bool:
        st = self.run.load_state()
        if st is None:
            return False
        check_resumable(st, self.network_shapes, self.model.arch, self.run.state_path)
        self.network.load_state_dict(st["network"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        if self.scaler and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        self.state.step = int(st["step"])
        self.state.last_save = st.get("last_save")
        return True

    # --- one step ------------------------------------------------------------------------------
    def _conditioning(self, captions: list[str]) -> Conditioning:
        if self.texts is not None:
            return collate_conditioning([self.texts.get(c) for c in captions])
        return self.model.encode_text_for_training(captions)

    def _loss(self, micro: int, gen: torch.Generator) -> torch.Tensor:
        tc = self.cfg.train
        batch = self.plan.batch(micro)
        latents = torch.stack([self.latents.get(it.dataset, it.entry, self.model) for it in batch]).float()
        cond = self._conditioning(captions_for_batch(self.datasets, batch, tc.seed, micro))
        control = self.latents.controls_for_batch(batch, self.model, tc.seed, micro)
        if control is not None:  # control images of the data (datasets[].control_path), for families that take them
            cond = {**cond, "control": control}
        noise = torch.randn(latents.shape, generator=gen)
        if tc.noise_offset:
            # one offset per sample and channel, over every spatial (and frame) position
            noise = noise + tc.noise_offset * torch.randn((*latents.shape[:2], *[1] * (latents.dim() - 2)), generator=gen)
        sigmas = self.model.train_sigmas(tc.timestep_type, latents.shape[0], gen, tuple(latents.shape))
        obj = self.model.objective
        dev = self.model.device
        latents, noise, sigmas = latents.to(dev), noise.to(dev), sigmas.to(dev)
        noisy = obj.add_noise(latents, noise, sigmas)
        pred = self.model.predict(noisy, sigmas, cond, guidance=1.0).float()
        target = obj.target(latents, noise, sigmas)
        per_sample = ((pred - target) ** 2).mean(dim=tuple(range(1, pred.dim())))
        weights = torch.ones_like(per_sample)
        if tc.linear_timesteps:
            weights = weights * linear_timestep_weights(self.model.schedule_position(sigmas).to(sigmas.device))
        if tc.snr_gamma:
            weights = weights * obj.min_snr_weights(sigmas, tc.snr_gamma)
        return (per_sample * weights).mean()

    def step(self) -> float:
        tc = self.cfg.train
        step = self.state.step
        seed = derived_seed(tc.seed, step)
        torch.manual_seed(seed)  # dropout and anything else drawing from the global generator
        gen = torch.Generator().manual_seed(seed)
        total = 0.0
        for a in range(tc.gradient_accumulation):
            loss = self._loss(step * tc.gradient_accumulation + a, gen) / tc.gradient_accumulation
            value = float(loss.detach())
            if not math.isfinite(value):
                saved = self.state.last_save or "nothing was saved yet"
                raise TrainingDiverged(
                    f"loss became {value} at step {step + 1}; training stopped before the weights were touched."
                    f" Last good save: {saved}. Try a lower train.lr, train.dtype bf16 instead of fp16,"
                    f" or a smaller train.max_grad_norm."
                )
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += value
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if tc.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, tc.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.step += 1
        return total

    # --- sampling ------------------------------------------------------------------------------
    def sample(self) -> list:
        if not self.samples:
            return []
        self.network.eval()
        self.model.set_train_hooks(False)
        images = []
        for s in self.samples:
            request = s.request
            if self.network.trains_text_encoders:  # the prompts' embeddings change with the network
                cond, neg = self.model.encode_text([s.prompt]), self.model.encode_text([s.neg])
                request = replace(request, cond={**request.cond, **cond}, neg_cond={**(request.neg_cond or {}), **neg})
            img = to_pil(sample_image(self.model, request))
            path = self.run.samples / f"{self.state.step:09d}_{s.index:02d}.png"
            with atomic_path(path) as tmp:
                img.save(tmp, format="PNG")
            append_jsonl(self.run.samples / "index.jsonl", {
                "step": self.state.step, "index": s.index, "prompt": s.prompt, "seed": s.request.seed,
                "file": path.name,
            })
            images.append(img)
        self.model.set_train_hooks(True)
        self.network.train()
        return images

    # --- the run -------------------------------------------------------------------------------
    def train(self, progress=None, until: int | None = None) -> TrainState:
        """Step to `until` (default: train.steps); at train.steps the final file is written."""
        tc, sc = self.cfg.train, self.cfg.sample
        until = tc.steps if until is None else min(until, tc.steps)
        sampling = not tc.disable_sampling and bool(self.samples)
        self.network.train()
        self.model.set_train_hooks(True)
        if self.state.step == 0 and sampling and not tc.skip_first_sample:
            self.sample()
        t_last = time.perf_counter()
        try:
            while self.state.step < until:
                loss = self.step()
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                step = self.state.step
                self.state.losses.append(loss)
                rec = {"step": step, "loss": loss, "lr": self.scheduler.get_last_lr()[0], "s_per_step": dt,
                       "peak_mem_gib": _peak_gib(self.model.device), "time": time.time()}
                append_jsonl(self.run.metrics_path, rec)
                if progress is not None:
                    progress(rec)
                if self.on_step is not None:
                    self.on_step(step, loss)
                if step < tc.steps and step % self.cfg.save.save_every == 0:
                    self.save()
                if sampling and step < tc.steps and step % sc.sample_every == 0:
                    self.sample()
                    t_last = time.perf_counter()  # sampling time is not step time
        except (KeyboardInterrupt, TrainingDiverged):
            self._save_on_stop()
            raise
        except Exception:
            # a cancel from the host (ComfyUI's interrupt) or a crash: keep what was trained
            self._save_on_stop()
            raise
        finally:
            self.model.set_train_hooks(False)
        if self.state.step >= tc.steps:
            self.save(final=True)
            if sampling:
                self.sample()
        elif self.state.step > 0 and self.state.last_save != str(self.run.step_path(self.state.step)):
            self.save()
        return self.state

    def _save_on_stop(self) -> None:
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, TrainingDiverged) or self.state.step == 0:
            return
        if self.state.last_save != str(self.run.step_path(self.state.step)):
            self.save()


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    except ImportError:
        return 0.0
