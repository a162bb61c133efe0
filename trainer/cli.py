"""Command line: `python -m trainer JOB.yaml [--set key=value ...]` and `python -m trainer demo`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .errors import UserError
from .run import run_job_file


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log = logging.getLogger("trainer")
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    # libraries' chatter about optional backends is noise for a trainer's user
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # block swap and changing clip sizes fragment fixed segments; read at the first CUDA allocation
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def demo_parser() -> argparse.ArgumentParser:
    from .demo import DEMO_WRITERS

    p = argparse.ArgumentParser(prog="trainer demo", description="Train a LoRA on a small random model, offline.")
    p.add_argument("--arch", default="flux", help="the family: " + ", ".join(sorted(DEMO_WRITERS)))
    p.add_argument("--out", default="demo", help="work folder (default ./demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")
    return p


def job_parser() -> argparse.ArgumentParser:
    from .models.registry import known_arches

    p = argparse.ArgumentParser(prog="trainer", description="Train a LoRA from an ai-toolkit style job file. Families"
                                " (model.arch): " + ", ".join(known_arches()) + ". `trainer demo --help`: the demo.")
    p.add_argument("job", help="job YAML file (relative paths in it are read from its folder), or `demo`")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=10 (repeatable)")
    p.add_argument("--restart", action="store_true",
                   help="start the run over: its saved state and metrics are set aside (renamed), not resumed")
    p.add_argument("--allow-unknown-keys", action="store_true",
                   help="run even when a key is one edit from a known key (otherwise: an error, e.g. `stpes`)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    try:
        if argv and argv[0] == "demo":
            a = demo_parser().parse_args(argv[1:])
            from .demo import run_demo

            return run_demo(a.arch, a.out, a.steps)
        a = job_parser().parse_args(argv)
        return run_job_file(a.job, a.overrides, a.restart, a.allow_unknown_keys)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
