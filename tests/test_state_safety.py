"""The resume state is data, never code: no pickle runs, damage is detected before use, and a bad state is one
message that leaves every saved LoRA as it was."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import load_file

from helpers import job_dict, quiet
from trainer.config import load_job_dict
from trainer.errors import UserError
from trainer.job import build_trainer, run_job
from trainer.train.state_file import encode_state, read_state


class Payload:
    """Unpickling this runs code: it creates a file named by the test."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _finished_run(tiny_flux, images, tmp_path):
    d = job_dict(tiny_flux, images, tmp_path / "out", steps=2)
    d["config"]["process"][0]["train"]["disable_sampling"] = True
    run_job(load_job_dict(d), report=quiet)
    run = tmp_path / "out" / "run"
    return d, run


def test_state_round_trip_keeps_optimizer_state_exactly():
    state = {"step": 3, "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 2)}},
                                      "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]},
             "scaler": None, "shapes": {"a": [4, 2]}, "dtype": torch.bfloat16, "lr": float("inf")}
    tensors, meta = encode_state(state)
    from safetensors.torch import save_file

    import tempfile, os

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "s.safetensors")
        save_file(tensors, p, metadata=meta)
        back = read_state(p)
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert back["dtype"] is torch.bfloat16 and back["lr"] == float("inf") and back["step"] == 3


def test_pickle_payload_in_a_legacy_state_never_runs(tiny_flux, images, tmp_path):
    d, run = _finished_run(tiny_flux, images, tmp_path)
    (run / "training_state.safetensors").unlink()
    marker = tmp_path / "payload_ran"
    with open(run / "training_state.pt", "wb") as f:
        pickle.dump({"step": 1, "x": Payload(str(marker))}, f, protocol=2)
    before = {p.name: p.read_bytes() for p in run.glob("*.safetensors")}
    with pytest.raises(UserError, match=r"training_state.pt: cannot resume.*not a plain-data state.*untouched"):
        build_trainer(load_job_dict(d), report=quiet)
    assert not marker.exists()
    assert {p.name: p.read_bytes() for p in run.glob("*.safetensors")} == before


def test_garbled_state_is_detected_before_use(tiny_flux, images, tmp_path):
    d, run = _finished_run(tiny_flux, images, tmp_path)
    state = run / "training_state.safetensors"
    data = bytearray(state.read_bytes())
    data[-64] ^= 0x40  # one bit inside the tensor data
    state.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"checksum mismatch.*the saved LoRA files are untouched.*last LoRA save is .*run\.safetensors"):
        build_trainer(load_job_dict(d), report=quiet)
    assert all(torch.isfinite(t).all() for t in load_file(str(run / "run.safetensors")).values())


@pytest.mark.parametrize("damage", ["missing", "float_step", "past_end"])
def test_state_with_wrong_fields_is_one_message(tiny_flux, images, tmp_path, damage):
    from trainer.fileio import save_safetensors_atomic

    d, run = _finished_run(tiny_flux, images, tmp_path)
    st = read_state(run / "training_state.safetensors")
    if damage == "missing":
        del st["optimizer"]
    elif damage == "float_step":
        st["step"] = 1.5
    else:
        st["step"] = 99
    tensors, meta = encode_state(st)
    save_safetensors_atomic(tensors, run / "training_state.safetensors", meta)
    match = {"missing": "'optimizer' is missing", "float_step": "'step' is missing or not a int",
             "past_end": "at step 99, past train.steps 2; raise train.steps"}[damage]
    with pytest.raises(UserError, match=match):
        build_trainer(load_job_dict(d), report=quiet)


def test_legacy_plain_state_still_resumes(tiny_flux, images, tmp_path):
    """A training_state.pt of the previous version (plain tensors and containers) resumes through torch's
    weights-only loader."""
    d = job_dict(tiny_flux, images, tmp_path / "out", steps=3)
    d["config"]["process"][0]["train"]["disable_sampling"] = True
    trainer = build_trainer(load_job_dict(d), report=quiet)
    trainer.train(until=2)
    run = trainer.run
    st = read_state(run.state_path)
    torch.save(st, run.root / "training_state.pt")
    run.state_path.unlink()
    again = build_trainer(load_job_dict(d), report=quiet)
    assert again.state.step == 2
