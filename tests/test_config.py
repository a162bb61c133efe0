from pathlib import Path

import pytest

from trainer.config import load_job_dict, load_job_file, parse_yaml_text
from trainer.errors import ConfigError


def base(**proc):
    p = {"model": {"name_or_path": "/x", "arch": "flux"}, "datasets": [{"folder_path": "/d"}]}
    p.update(proc)
    return {"job": "extension", "config": {"name": "n", "process": [p]}}


def test_wrong_type_names_key_path():
    with pytest.raises(ConfigError) as e:
        load_job_dict(base(train={"lr": "fast"}))
    assert "config.process[0].train.lr: expected a number, got 'fast'" in str(e.value)


def test_yaml_11_exponent_string_is_a_number():
    job = load_job_dict(base(train={"lr": "1e-4", "steps": 10}))
    assert job.process.train.lr == pytest.approx(1e-4)


@pytest.mark.parametrize("section,key,value,msg", [
    ("train", "lr", -1, "must be greater than 0"),
    ("train", "steps", 0, "must be at least 1"),
    ("network", "linear", 0, "must be at least 1"),
])
def test_out_of_range(section, key, value, msg):
    with pytest.raises(ConfigError) as e:
        load_job_dict(base(**{section: {key: value}}))
    assert f"config.process[0].{section}.{key}: {msg}" in str(e.value)


def test_unknown_keys_are_warnings():
    job = load_job_dict(base(train={"lr": 1e-4, "turbo": True}, wat=1))
    assert "config.process[0].train.turbo: unknown key, ignored" in job.warnings
    assert "config.process[0].wat: unknown key, ignored" in job.warnings


def test_unknown_arch_lists_known():
    d = base()
    d["config"]["process"][0]["model"]["arch"] = "nope"
    with pytest.raises(ConfigError) as e:
        load_job_dict(d)
    assert "unknown arch 'nope'" in str(e.value) and "flux" in str(e.value)


def test_legacy_flag_routes():
    d = base()
    d["config"]["process"][0]["model"] = {"name_or_path": "/x", "is_flux": True}
    assert load_job_dict(d).arch == "flux"


def test_gradient_accumulation_steps_alias_and_overrides():
    job = load_job_dict(base(train={"gradient_accumulation_steps": 3}), ["train.steps=10", "network.linear=8"])
    assert job.process.train.gradient_accumulation == 3
    assert job.process.train.steps == 10
    assert job.process.network.linear == 8
    assert job.raw["config"]["process"][0]["train"]["steps"] == 10


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("job: extension\nconfig:\n  name: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        load_job_file(p)
    assert "line" in str(e.value) and "column" in str(e.value)


def test_missing_required_and_datasets():
    d = base()
    del d["config"]["process"][0]["model"]["name_or_path"]
    d["config"]["process"][0]["datasets"] = []
    with pytest.raises(ConfigError) as e:
        load_job_dict(d)
    assert "config.process[0].model.name_or_path: is required" in str(e.value)


def test_resolution_scalar_becomes_list():
    d = base()
    d["config"]["process"][0]["datasets"] = [{"folder_path": "/d", "resolution": 768}]
    assert load_job_dict(d).process.datasets[0].resolution == [768]


def test_sample_items_fill_defaults_and_walk_seed():
    job = load_job_dict(base(sample={"prompts": ["a", "b"], "seed": 5, "width": 64, "height": 48}))
    items = job.process.sample.items()
    assert [i.seed for i in items] == [5, 6] and items[1].width == 64 and items[1].height == 48


def test_yaml_never_constructs_python_objects(tmp_path):
    """A job file is data: a python tag is a YAML error naming the file, and nothing runs."""
    marker = tmp_path / "ran"
    text = f"config: !!python/object/apply:builtins.open ['{marker}', 'w']\n"
    with pytest.raises(ConfigError, match="job.yaml: YAML syntax error"):
        parse_yaml_text(text, "job.yaml")
    assert not marker.exists()


def test_config_name_must_be_a_plain_name():
    for bad, msg in (("a/b", "must be a plain name"), ("x\0y", "must be a plain name"), ("n" * 300, "at most 120")):
        d = {"config": {"name": bad, "process": [{"model": {"arch": "flux", "name_or_path": "x"},
                                                   "datasets": [{"folder_path": "d"}]}]}}
        with pytest.raises(ConfigError, match=f"config.name: .*{msg}"):
            load_job_dict(d)


def test_numbers_are_finite_and_bounded():
    base = {"model": {"arch": "flux", "name_or_path": "x"}, "datasets": [{"folder_path": "d"}]}
    for section, key, value, msg in (("train", "lr", float("inf"), "finite"), ("train", "lr", 1e30, "at most"),
                                     ("train", "gradient_checkpointing", 5.0, "at most 1"),
                                     ("network", "linear", 1e30, "whole number|at most")):
        proc = {**base, section: {key: value}}
        with pytest.raises(ConfigError, match=f"{section}.{key}: .*({msg})"):
            load_job_dict({"config": {"name": "r", "process": [proc]}})
    with pytest.raises(ConfigError, match=r"datasets\[0\].resolution\[0\]: must be at most 8192"):
        load_job_dict({"config": {"name": "r", "process": [{**base, "datasets": [{"folder_path": "d",
                                                                                   "resolution": [2**40]}]}]}})


def test_typo_one_edit_from_a_known_key_is_an_error():
    with pytest.raises(ConfigError, match=r"config.process\[0\].train.stpes: unknown key; did you mean steps\?"):
        load_job_dict(base(train={"stpes": 10}))
    with pytest.raises(ConfigError, match=r"datasets\[0\].resolutoin: unknown key; did you mean resolution"):
        load_job_dict(base(datasets=[{"folder_path": "/d", "resolutoin": 512}]))
    job = load_job_dict(base(train={"stpes": 10}), allow_unknown_keys=True)
    assert job.process.train.steps == 1000
    assert "config.process[0].train.stpes: unknown key, ignored; did you mean steps?" in job.warnings
    # further away: a warning that still suggests
    job = load_job_dict(base(train={"learning_rat": 1e-4}))
    assert any(w.startswith("config.process[0].train.learning_rat: unknown key, ignored") for w in job.warnings)


def _write_job(path, proc):
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"job": "extension", "config": {"name": "n", "process": [proc]}}))
    return path


def test_relative_paths_are_read_from_the_job_files_folder(tmp_path, monkeypatch):
    (tmp_path / "project" / "data").mkdir(parents=True)
    (tmp_path / "project" / "models").mkdir()
    (tmp_path / "project" / "models" / "f.safetensors").write_bytes(b"")
    p = _write_job(tmp_path / "project" / "jobs" / "job.yaml", {
        "model": {"name_or_path": "../models/f.safetensors", "arch": "flex2"},
        "datasets": [{"folder_path": "../data", "control_path": "../ctrl"}],
        "sample": {"samples": [{"prompt": "a", "ctrl_img": "../data/c.png"}]}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    job = load_job_file(p)
    proj = (tmp_path / "project").resolve()
    assert job.process.model.name_or_path == str(proj / "models" / "f.safetensors")
    assert Path(job.process.datasets[0].folder_path).resolve() == proj / "data"
    assert Path(job.process.datasets[0].control_path).resolve() == proj / "ctrl"  # missing: named where looked
    assert Path(job.process.sample.samples[0].control_image).resolve() == proj / "data" / "c.png"
    assert Path(job.process.training_folder) == proj / "jobs" / "output"  # outputs beside the job file
    # the job copied into the run folder names the same files
    assert job.raw["config"]["process"][0]["datasets"][0]["folder_path"] == job.process.datasets[0].folder_path
    assert not job.warnings


def test_relative_path_found_only_from_the_current_folder_warns(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    p = _write_job(tmp_path / "jobs" / "job.yaml", {"model": {"name_or_path": "org/some-model", "arch": "flux"},
                                                     "datasets": [{"folder_path": "data"}]})
    monkeypatch.chdir(tmp_path)
    job = load_job_file(p)
    assert Path(job.process.datasets[0].folder_path) == (tmp_path / "data").resolve()
    assert job.warnings == [f"datasets[0].folder_path: not found beside the job file ({(tmp_path / 'jobs').resolve()}),"
                            f" read from the current folder ({tmp_path}); relative paths in a job file are read from"
                            " its folder"]
    assert job.process.model.name_or_path == "org/some-model"  # a hub id is left for the loader to explain


def test_training_adapter_only_on_comfyui_and_turbo_without_one_is_warned(tmp_path):
    from helpers import job_dict, make_images

    data = make_images(tmp_path / "data", n=1)
    turbo = job_dict({"backend": "comfyui", "name_or_path": str(tmp_path / "z_image_turbo_bf16.safetensors")}, data,
                     tmp_path / "out")
    warned = [w for w in load_job_dict(turbo).warnings if "model.name_or_path" in w]
    assert len(warned) == 1 and "model.assistant_lora_path" in warned[0], warned
    turbo["config"]["process"][0]["model"]["assistant_lora_path"] = str(tmp_path / "adapter.safetensors")
    assert not [w for w in load_job_dict(turbo).warnings if "model.name_or_path" in w]
    base = job_dict({"backend": "comfyui", "name_or_path": str(tmp_path / "z_image_bf16.safetensors")}, data,
                    tmp_path / "out")
    assert not [w for w in load_job_dict(base).warnings if "model.name_or_path" in w]
    engine = job_dict({"arch": "flux", "name_or_path": str(tmp_path / "flux.safetensors"),
                       "assistant_lora_path": str(tmp_path / "adapter.safetensors")}, data, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"model\.assistant_lora_path: only on model\.backend comfyui"):
        load_job_dict(engine)
