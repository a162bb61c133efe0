"""The node-side engine API: parts <-> job dict, and a run advanced piece by piece."""

import torch
import yaml

from helpers import job_dict
from trainer.config import load_job_dict
from trainer.session import TrainingSession, assemble_job, split_job


def test_assemble_and_split_round_trip(tiny_flux, images, tmp_path):
    d = job_dict(tiny_flux, images, tmp_path / "out")
    name, model, datasets, network, settings = split_job(d)
    assert datasets[0]["trigger_word"] == "sks"
    again = assemble_job(name, model, datasets, network, settings)
    a, b = load_job_dict(d), load_job_dict(again)
    assert yaml.safe_dump(a.raw["config"]) == yaml.safe_dump(b.raw["config"])


def test_session_advances_in_pieces_like_one_run(tiny_flux, images, tmp_path):
    d = job_dict(tiny_flux, images, tmp_path / "a", steps=4)
    d["config"]["process"][0]["train"]["disable_sampling"] = True
    one = TrainingSession(d, report=lambda m: None)
    one.advance(4)
    d["config"]["process"][0]["training_folder"] = str(tmp_path / "b")
    two = TrainingSession(d, report=lambda m: None)
    two.advance(1)
    two.advance(3)
    assert two.step == 4 and [s for s, _ in two.losses] == [1, 2, 3, 4]
    ta, _ = one.export("fp32")
    tb, md = two.export("fp32")
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=1e-6)
    assert md["eridiffusion.step"] == "4"
    # the network is attached only while the session works
    assert not one.trainer.network._handles


def test_session_grows_the_run_past_its_steps(tiny_flux, images, tmp_path):
    d = job_dict(tiny_flux, images, tmp_path / "a", steps=2)
    d["config"]["process"][0]["train"]["disable_sampling"] = True
    s = TrainingSession(d, report=lambda m: None)
    s.advance(2)
    s.advance(2)
    assert s.step == 4
    img = s.sample("sks, a cat", 32, 32, 2, 3.5, seed=1)
    assert img.shape == (3, 32, 32) and torch.isfinite(img).all()
