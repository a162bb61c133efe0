"""Command line: `python -m trainer JOB.yaml [--set key=value ...]` and `python -m trainer demo`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .errors import UserError


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log = logging.getLogger("trainer")
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    # libraries' chatter about optional backends is noise for a trainer's user
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


class ProgressBar:
    """tqdm bar with loss, s/step and ETA."""

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
    if trainer.state.step >= total and trainer.run.final_path.exists():
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    if argv and argv[0] == "demo":
        p = argparse.ArgumentParser(prog="trainer demo", description="Train a LoRA on a small random model, offline.")
        p.add_argument("--arch", default="flux")
        p.add_argument("--out", default="demo", help="work folder (default ./demo)")
        p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")
        a = p.parse_args(argv[1:])
        try:
            from .demo import run_demo

            return run_demo(a.arch, a.out, a.steps)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    p = argparse.ArgumentParser(prog="trainer", description="Train a LoRA from an ai-toolkit style job file.")
    p.add_argument("job", help="job YAML file, or `demo`")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=10 (repeatable)")
    a = p.parse_args(argv)
    try:
        return run_job_file(a.job, a.overrides)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
