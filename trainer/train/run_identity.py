"""What a run depends on, recorded in its resume state and compared when it resumes.

A changed job is found by key: what cannot apply to the saved state (the base model, the network's layout, the
optimizer type) is refused with the list and the ways out; what can (steps, lr and schedule, optimizer
parameters, clipping, data, seed, batch, saves and samples) applies from the resume step and is reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import JobConfig
from ..errors import UserError

# keys whose change the saved state cannot take
FIXED = ("arch", "base_model", "network", "optimizer")


# keys recorded since some states were saved, with the value those runs had
RECORDED_LATER = {"world_size": 1}


def run_identity(job: JobConfig, base_model: str, world_size: int = 1) -> dict[str, Any]:
    """`world_size`: the ranks of the run (with batch_size, its global batch)."""
    p = job.process
    tc, nc = p.train, p.network
    return {
        "arch": job.arch,
        "base_model": base_model,
        "network": {"type": nc.type, "linear": nc.linear, "alpha": nc.alpha, "conv": nc.conv,
                    "conv_alpha": nc.conv_alpha, "lokr_factor": nc.lokr_factor, "lokr_full_rank": nc.lokr_full_rank,
                    "only_if_contains": nc.only_if_contains, "ignore_if_contains": nc.ignore_if_contains,
                    "train_unet": tc.train_unet, "train_text_encoder": tc.train_text_encoder},
        "optimizer": tc.optimizer,
        "optimizer_params": dict(tc.optimizer_params),
        "lr": tc.lr,
        "text_encoder_lr": tc.text_encoder_lr,
        "lr_scheduler": tc.lr_scheduler,
        "lr_scheduler_params": dict(tc.lr_scheduler_params),
        "lr_warmup_steps": tc.lr_warmup_steps,
        "steps": tc.steps,
        "max_grad_norm": tc.max_grad_norm,
        "seed": tc.seed,
        "batch_size": tc.batch_size,
        "world_size": world_size,
        "gradient_accumulation": tc.gradient_accumulation,
        "dtype": tc.dtype,
        "timestep_type": tc.timestep_type,
        "expert_boundary": p.model.expert_boundary,
        "datasets": [{k: v for k, v in vars(d).items()} for d in p.datasets],
    }


def differences(saved: dict, now: dict) -> list[str]:
    """`key: old -> new` for every key that differs (datasets compared item by item)."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key, RECORDED_LATER.get(key)), now.get(key, RECORDED_LATER.get(key))
        if key == "datasets" and isinstance(a, list) and isinstance(b, list):
            for i in range(max(len(a), len(b))):
                da = a[i] if i < len(a) else None
                db = b[i] if i < len(b) else None
                if da != db:
                    if da is None or db is None:
                        out.append(f"datasets[{i}]: {'added' if da is None else 'removed'}")
                    else:
                        for k in sorted(set(da) | set(db)):
                            if da.get(k) != db.get(k):
                                out.append(f"datasets[{i}].{k}: {da.get(k)!r} -> {db.get(k)!r}")
        elif isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def split_changes(saved: dict, now: dict) -> tuple[list[str], list[str]]:
    """(refused, applied) differences."""
    changes = differences(saved, now)
    refused = [c for c in changes if c.split(":", 1)[0].split(".", 1)[0] in FIXED]
    return refused, [c for c in changes if c not in refused]


def changed_job_error(state_path: Path, refused: list[str]) -> UserError:
    return UserError(
        f"{state_path}: this run was started with another model, network or optimizer, which its saved state cannot"
        " continue:\n  " + "\n  ".join(refused) + "\nUse a new config.name, or run with --restart to start this run"
        " over (its saves are kept until new ones replace them)."
    )


def past_steps_error(state_path: Path, step: int, steps: int) -> UserError:
    return UserError(f"{state_path}: the run is at step {step}, past train.steps {steps}; raise train.steps to"
                     " continue it, or use a new config.name")


def check_job_fits_state(job: JobConfig, state: dict, state_path: Path, extendable: bool = False) -> None:
    """The changes the saved state cannot take, refused from the job alone (before the model loads): every fixed
    key but the base model, which is compared once it is loaded."""
    saved = state.get("identity")
    if isinstance(saved, dict):
        refused, _ = split_changes(saved, run_identity(job, saved.get("base_model")))
        if refused:
            raise changed_job_error(state_path, refused)
    step = state.get("step")
    if isinstance(step, int) and step > job.process.train.steps and not extendable:
        raise past_steps_error(state_path, step, job.process.train.steps)
