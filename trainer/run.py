"""Run a job file from the command line (`python -m trainer JOB.yaml` and the demo): load, train, report.

Ctrl-C (SIGINT) and SIGTERM (docker stop, systemd, a scheduler's timeout) both stop the run the same way: the
network is saved at the step reached, and the same command resumes it.
"""

from __future__ import annotations

import collections
import logging
import signal
import sys

from .errors import UserError


class ProgressBar:
    """tqdm bar over training steps with one rate, the training step's own (saving and sampling excluded), and the
    time left at that rate (the mean of the last steps). With several ranks: the global step, the job's images per
    second (every rank's) and each rank's peak memory on CUDA."""

    def __init__(self, total: int, initial: int, world: int = 1) -> None:
        from tqdm import tqdm

        self.total = total
        self.world = world
        self.recent: collections.deque[float] = collections.deque(maxlen=20)
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def __call__(self, rec: dict) -> None:
        self.recent.append(rec["s_per_step"])
        rate = sum(self.recent) / len(self.recent)
        left = format_seconds(rate * (self.total - rec["step"]))
        ranks = ""
        if self.world > 1:
            per_step = rec["samples_per_s"] * rec["s_per_step"]  # the job's items a step, over the mean step time
            ranks = f", {per_step / rate:.1f} samples/s on {self.world} ranks"
            if rec.get("rank_peak_mem_gib"):
                ranks += ", peak GiB " + "/".join(f"{m:.1f}" for m in rec["rank_peak_mem_gib"])
        self.bar.set_postfix_str(f"{rate:.2f} s/step, {left} left, loss {rec['loss']:.4f}, lr {rec['lr']:.2e}{ranks}")
        self.bar.update(rec["step"] - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Stopped(KeyboardInterrupt):
    """SIGTERM, delivered as an interrupt so the loop saves before it ends."""


def _on_sigterm(signum, frame):
    # one stop: a launcher that repeats SIGTERM (torchrun's teardown) must not cut the save and the message short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Stopped()


def run_job_file(path: str, overrides: list[str], restart: bool = False, allow_unknown_keys: bool = False) -> int:
    """One process, or this rank of a `torchrun --nproc_per_node N -m trainer job.yaml` launch."""
    from .config import load_job_file
    from .job import pick_device
    from .train.distributed import RankLost, start

    job = load_job_file(path, overrides, allow_unknown_keys)
    dist = start(job, pick_device(job.process.device))
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if dist is None:
            return _run(job, restart, None)
        if not dist.is_main:  # the others' warnings are marked with their rank
            for h in logging.getLogger("trainer").handlers:
                h.setFormatter(logging.Formatter(f"%(levelname)s: [rank {dist.rank}] %(message)s"))
        try:
            code = _run(job, restart, dist)
        except (UserError, KeyboardInterrupt, RankLost) as e:
            dist.abort(str(e) or "interrupted", 2)
        except BaseException as e:  # a bug: its traceback, then the others are told
            import traceback

            traceback.print_exc()
            dist.abort(f"{type(e).__name__}: {e}", 1)
        dist.close()
        return code
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(job, restart: bool, dist) -> int:
    from .job import build_trainer, finished_run
    from .train.distributed import RankLost

    main = dist is None or dist.is_main
    say = (lambda m: print(m, flush=True)) if main else (lambda m: None)
    log = logging.getLogger("trainer")
    for w in job.warnings if main else []:
        log.warning(w)
    if not restart:
        final = finished_run(job)
        if final is not None:
            say(f"already finished: {final} (raise train.steps to train on, or --restart to start over)")
            return 0
    try:
        trainer = build_trainer(job, report=say, restart=restart, dist=dist)
    except KeyboardInterrupt:
        raise UserError("interrupted before training began; nothing was trained (encoded latents already on disk"
                        " are kept)") from None
    if trainer.finished():
        say(f"already finished: {trainer.run.final_path}")
        return 0
    bar = ProgressBar(job.process.train.steps, trainer.state.step, dist.world if dist else 1) if main else None
    try:
        trainer.train(bar, report=lambda m: bar.bar.write(m) if bar else None)
    except (KeyboardInterrupt, RankLost) as e:
        step, saved = trainer.state.step, trainer.state.last_save or "nothing yet"
        if isinstance(e, RankLost):  # another rank failed: what it said comes last
            kept = f", saved {saved}" if main else ""
            raise UserError(f"stopped at step {step}{kept} (run the same job again to resume): {e}") from None
        why = "stopped (SIGTERM)" if isinstance(e, Stopped) else "interrupted"
        kept = f"; saved {saved}" if main else ""
        raise UserError(f"{why} at step {step}{kept}. Run the same job again to resume.") from None
    finally:
        if bar is not None:
            bar.close()
    say(f"saved {trainer.run.final_path}")
    return 0
