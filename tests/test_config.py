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
