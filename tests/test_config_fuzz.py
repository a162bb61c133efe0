"""A config fuzzer: a few hundred seeded mutations of the demo job, each accepted or refused by the loader with one
ConfigError naming a key path, never another exception and never a hang. In-process, no training."""

from __future__ import annotations

import copy
import random
import time
from pathlib import Path

import pytest

from trainer.config import load_job_dict
from trainer.demo import demo_job
from trainer.errors import ConfigError

VALUES = [None, "", "\x00", "x" * 300, 0, -1, 1e30, -1e30, float("nan"), float("inf"), 2**64, True, [], {}, [1, "a"],
          {"nested": {"deep": 1}}, "banana", "1e-4", 3.5]


def _base() -> dict:
    model = {"arch": "flux", "name_or_path": "models/flux.safetensors", "text_encoder_paths": ["clip.safetensors"],
             "vae_path": "ae.safetensors", "t5_max_length": 32}
    return demo_job("fuzz", model, Path("dataset"), Path("out"), 20)


def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, path + (i,))
    yield path


def _set(tree, path, value):
    node = tree
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


def _delete(tree, path):
    node = tree
    for p in path[:-1]:
        node = node[p]
    if isinstance(node, dict):
        node.pop(path[-1], None)
    else:
        node.pop(path[-1])


def mutations(n: int, seed: int = 0):
    rng = random.Random(seed)
    base = _base()
    paths = [p for p in _leaves(base) if p]
    for i in range(n):
        job = copy.deepcopy(base)
        overrides: list[str] = []
        for _ in range(rng.randint(1, 3)):
            path = rng.choice(paths)
            try:
                kind = rng.random()
                if kind < 0.2:
                    _delete(job, path)
                elif kind < 0.8:
                    _set(job, path, copy.deepcopy(rng.choice(VALUES)))
                elif kind < 0.9:
                    _set(job, path[:-1] + (f"unknown_{i}",), 1) if isinstance(path[-1], str) else None
                else:
                    key = ".".join(str(p) for p in path[3:]) if path[:3] == ("config", "process", 0) else "train.lr"
                    overrides.append(f"{key or 'train.steps'}={rng.choice(['1e30', 'abc', '-5', '[1,2]', '{a: 1}', ''])}")
            except (KeyError, IndexError, TypeError, AttributeError):
                pass  # the path went away with an earlier mutation of this job
        if rng.random() < 0.05 and isinstance(job.get("config"), dict):
            job["config"]["process"] = rng.choice([[], 3, {"a": 1}, [None]])
            overrides.append("train.steps=5")
        yield i, job, overrides


def test_config_fuzz_only_config_errors():
    counts = {"accepted": 0, "config_error": 0}
    t0 = time.monotonic()
    for i, job, overrides in mutations(300):
        start = time.monotonic()
        try:
            load_job_dict(job, overrides)
            counts["accepted"] += 1
        except ConfigError as e:
            assert str(e).strip(), f"mutation {i}: an empty message"
            counts["config_error"] += 1
        except Exception as e:  # noqa: BLE001 - anything else is the failure this test looks for
            pytest.fail(f"mutation {i} ({overrides}): {type(e).__name__}: {e}\n{job}")
        assert time.monotonic() - start < 2, f"mutation {i} took {time.monotonic() - start:.1f}s"
    print(f"\nconfig fuzz: {counts} in {time.monotonic() - t0:.1f}s")
    assert counts["accepted"] > 20 and counts["config_error"] > 100
