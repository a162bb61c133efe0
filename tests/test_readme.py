"""The README as a newcomer copies it: the install and test commands are what CI runs, every trainer command line
parses, every YAML job in it (and every example workflow's YAML twin) validates without a warning, and the
defaults its config table states are the schema's."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from trainer.cli import demo_parser, job_parser
from trainer.config import DatasetConfig, ModelConfig, NetworkConfig, SampleConfig, SaveConfig, TrainConfig, load_job_dict
from trainer.demo import DEMO_WRITERS
from trainer.models import registry

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _commands() -> list[str]:
    lines = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line:
                lines.append(line)
    return lines


def test_install_and_test_commands_are_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text()
    cmds = _commands()
    install = next(c for c in cmds if c.startswith("pip install torch"))
    for part in install.split("&&"):
        args = shlex.split(part)[2:]  # after `pip install`
        assert re.search(r"pip install -q " + re.escape(" ".join(args)), ci.replace('"', "")), part
    assert "python -m pytest -q" in cmds and "python3 -m pytest -q" in ci


def test_every_trainer_command_line_parses():
    seen = 0
    for c in _commands():
        words = shlex.split(c)
        if words[:3] == ["python", "-m", "trainer"]:
            args = words[3:]
        elif words[:1] == ["trainer"]:
            args = words[1:]
        else:
            continue
        seen += 1
        if args[:1] == ["demo"]:
            a = demo_parser().parse_args(args[1:])
            assert registry.canonical_arch(a.arch) in DEMO_WRITERS, c
        else:
            job_parser().parse_args(args)
    assert seen >= 3


def test_demo_usage_lists_every_demo():
    usage = re.search(r"python -m trainer demo \[--arch ([\w|]+)\]", README)
    assert usage is not None and set(usage.group(1).split("|")) == set(DEMO_WRITERS)


@pytest.mark.parametrize("index", range(len(_blocks("yaml"))))
def test_readme_yaml_jobs_validate_without_warnings(index):
    data = yaml.safe_load(_blocks("yaml")[index])
    job = load_job_dict(data, source=f"README yaml block {index}")
    assert job.warnings == []
    assert job.process.train.optimizer != "adamw8bit"  # runs without bitsandbytes and CUDA as written


@pytest.mark.parametrize("path", sorted((REPO / "example_workflows").glob("*.yaml")), ids=lambda p: p.name)
def test_example_workflow_yamls_validate_without_warnings(path):
    job = load_job_dict(yaml.safe_load(path.read_text()), source=str(path))
    assert job.warnings == []


SECTIONS = {"model": ModelConfig, "network": NetworkConfig, "save": SaveConfig, "datasets[]": DatasetConfig,
            "train": TrainConfig, "sample": SampleConfig}


def _table_defaults() -> dict[tuple[str, str], str]:
    """(section, key) -> the default the config table states in `key` (default ...) form."""
    out = {}
    for row in re.findall(r"^\| `?([\w\[\]]+)`? \| (.*) \|$", README, flags=re.M):
        section, cells = row
        for key, default in re.findall(r"`(\w+)` \(([^()]*(?:\([^()]*\)[^()]*)*)\)", cells):
            out[(section, key)] = default
    return out


def _stated(default: str) -> str:
    return default.split(";")[0].split(",")[0].split(":")[0].strip().strip("`")


def _is_value(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return text in ("true", "false")


def test_config_table_defaults_are_the_schemas():
    import dataclasses

    checked = 0
    for (section, key), stated in _table_defaults().items():
        cls = SECTIONS.get(section)
        field = next((f for f in dataclasses.fields(cls) if f.name == key), None) if cls else None
        if field is None:
            continue
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
        head = _stated(stated)
        if head == "required":
            assert field.metadata.get("required"), (section, key, stated)
        elif isinstance(default, bool):
            assert head == str(default).lower(), (section, key, stated, default)
        elif isinstance(default, (int, float)):
            assert float(head) == float(default), (section, key, stated, default)
        elif isinstance(default, str):
            assert head.lower() == default.lower(), (section, key, stated, default)
        elif isinstance(default, list) and default:
            assert head == str(default).replace(" ", ""), (section, key, stated, default)
        else:  # no default value (None, or an empty list): the table says so, or says in words what decides it
            assert head == "none" or not _is_value(head), (section, key, stated, default)
        checked += 1
    assert checked >= 40, checked
