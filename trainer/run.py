"""Run a job file from the command line (`python -m trainer JOB.yaml` and the demo): load, train, report."""

from __future__ import annotations

import logging
import sys

from .errors import UserError


class ProgressBar:
    """tqdm bar over training steps: loss, lr and the training step's own s/step (sampling time excluded)."""

    def __init__(self, total: int, initial: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def __call__(self, rec: dict) -> None:
        self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", s_step=f"{rec['s_per_step']:.2f}")
        self.bar.update(rec["step"] - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def run_job_file(path: str, overrides: list[str]) -> int:
    from .config import load_job_file
    from .job import build_trainer

    job = load_job_file(path, overrides)
    log = logging.getLogger("trainer")
    for w in job.warnings:
        log.warning(w)
    trainer = build_trainer(job, report=lambda m: print(m, flush=True))
    total = job.process.train.steps
    if trainer.finished():
        print(f"already finished: {trainer.run.final_path}")
        return 0
    bar = ProgressBar(total, trainer.state.step)
    try:
        trainer.train(bar)
    except KeyboardInterrupt:
        raise UserError(
            f"interrupted at step {trainer.state.step}; saved {trainer.state.last_save or 'nothing yet'}."
            " Run the same job again to resume."
        ) from None
    finally:
        bar.close()
    print(f"saved {trainer.run.final_path}")
    return 0
