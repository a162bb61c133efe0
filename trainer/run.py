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
    time left at that rate (the mean of the last steps)."""

    def __init__(self, total: int, initial: int) -> None:
        from tqdm import tqdm

        self.total = total
        self.recent: collections.deque[float] = collections.deque(maxlen=20)
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def __call__(self, rec: dict) -> None:
        self.recent.append(rec["s_per_step"])
        rate = sum(self.recent) / len(self.recent)
        left = format_seconds(rate * (self.total - rec["step"]))
        self.bar.set_postfix_str(f"{rate:.2f} s/step, {left} left, loss {rec['loss']:.4f}, lr {rec['lr']:.2e}")
        self.bar.update(rec["step"] - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Stopped(KeyboardInterrupt):
    """SIGTERM, delivered as an interrupt so the loop saves before it ends."""


def _on_sigterm(signum, frame):
    raise Stopped()


def run_job_file(path: str, overrides: list[str], restart: bool = False, allow_unknown_keys: bool = False) -> int:
    from .config import load_job_file
    from .job import build_trainer, finished_run

    job = load_job_file(path, overrides, allow_unknown_keys)
    log = logging.getLogger("trainer")
    for w in job.warnings:
        log.warning(w)
    if not restart:
        final = finished_run(job)
        if final is not None:
            print(f"already finished: {final} (raise train.steps to train on, or --restart to start over)")
            return 0
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        try:
            trainer = build_trainer(job, report=lambda m: print(m, flush=True), restart=restart)
        except KeyboardInterrupt:
            raise UserError("interrupted before training began; nothing was trained (encoded latents already on disk"
                            " are kept)") from None
        if trainer.finished():
            print(f"already finished: {trainer.run.final_path}")
            return 0
        bar = ProgressBar(job.process.train.steps, trainer.state.step)
        try:
            trainer.train(bar, report=lambda m: bar.bar.write(m))
        except KeyboardInterrupt as e:
            why = "stopped (SIGTERM)" if isinstance(e, Stopped) else "interrupted"
            raise UserError(f"{why} at step {trainer.state.step}; saved {trainer.state.last_save or 'nothing yet'}."
                            " Run the same job again to resume.") from None
        finally:
            bar.close()
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"saved {trainer.run.final_path}")
    return 0
