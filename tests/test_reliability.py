"""Nothing lost, nothing silently wrong: one run per folder, stale temp files, "already finished" before loading,
changed jobs on resume, interrupted runs' metrics, SIGTERM, a full disk, wrong files."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import job_dict, quiet
from trainer.config import load_job_dict
from trainer.errors import ModelFileError, UserError
from trainer.job import build_trainer, run_job

REPO = Path(__file__).resolve().parent.parent


def _job(tiny_flux, images, out: Path, **train) -> dict:
    d = job_dict(tiny_flux, images, out, **{"disable_sampling": True, **train})
    return d


HOLD = """
import sys, time, filelock
lock = filelock.FileLock(sys.argv[1], timeout=0)
lock.acquire()
open(sys.argv[1][:-len('.lock')] + '.lock.pid', 'w').write(str(__import__('os').getpid()))
print('held', flush=True)
time.sleep(60)
"""


def test_one_run_per_folder(tiny_flux, images, tmp_path):
    run = tmp_path / "out" / "run"
    run.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"another run is training into this folder \(process {proc.pid}\)"):
            build_trainer(load_job_dict(_job(tiny_flux, images, tmp_path / "out")), report=quiet)
    finally:
        proc.kill()
        proc.wait()
    build_trainer(load_job_dict(_job(tiny_flux, images, tmp_path / "out")), report=quiet)  # free again: runs


def test_stale_temp_files_are_removed(tiny_flux, images, tmp_path):
    run = tmp_path / "out" / "run"
    (run / "samples").mkdir(parents=True)
    stale = [run / ".training_state.safetensors.abc123.tmp", run / "samples" / ".000000001_00.png.x.tmp"]
    for p in stale:
        p.write_bytes(b"x" * 100)
    build_trainer(load_job_dict(_job(tiny_flux, images, tmp_path / "out")), report=quiet)
    assert not any(p.exists() for p in stale)


def test_already_finished_is_checked_before_loading_and_verified(tiny_flux, images, tmp_path):
    d = _job(tiny_flux, images, tmp_path / "out", steps=2)
    run_job(load_job_dict(d), report=quiet)
    final = tmp_path / "out" / "run" / "run.safetensors"
    good = final.read_bytes()
    # the model file is not even opened: a finished run reports so with the model gone
    gone = dict(d)
    gone["config"] = json.loads(json.dumps(d["config"]))
    gone["config"]["process"][0]["model"]["name_or_path"] = str(tmp_path / "moved_away.safetensors")
    msgs: list[str] = []
    run_job(load_job_dict(gone), report=msgs.append)
    assert msgs == [f"already finished: {final}"]
    # a damaged final file is not "finished": the run loads and writes it again from its state
    final.write_bytes(b"garbage")
    msgs.clear()
    run_job(load_job_dict(d), report=msgs.append)
    assert load_file(str(final)).keys() == load_file_bytes(good).keys()


def load_file_bytes(data: bytes) -> dict:
    from safetensors.torch import load

    return load(data)


def test_changed_job_on_resume(tiny_flux, images, tmp_path):
    d = _job(tiny_flux, images, tmp_path / "out", steps=4, lr=1e-3)
    trainer = build_trainer(load_job_dict(d), report=quiet)
    trainer.train(until=2)
    # what the saved state cannot take: refused, by key, with the ways out
    changed = json.loads(json.dumps(d))
    changed["config"]["process"][0]["network"]["linear"] = 8
    changed["config"]["process"][0]["train"]["optimizer"] = "adafactor"
    with pytest.raises(UserError, match=r"(?s)network.linear: 4 -> 8.*optimizer: 'adamw' -> 'adafactor'.*--restart"):
        build_trainer(load_job_dict(changed), report=quiet)
    # what it can: applied from the resume step, and reported
    faster = json.loads(json.dumps(d))
    faster["config"]["process"][0]["train"].update(lr=5e-4, optimizer_params={"weight_decay": 0.5})
    msgs: list[str] = []
    trainer = build_trainer(load_job_dict(faster), report=msgs.append)
    assert trainer.state.step == 2
    assert any("lr: 0.001 -> 0.0005" in m for m in msgs) and any("weight_decay" in m for m in msgs)
    g = trainer.optimizer.param_groups[0]
    assert g["lr"] == pytest.approx(5e-4) and g["weight_decay"] == 0.5
    assert "lr: 0.0005" in (tmp_path / "out" / "run" / "config.yaml").read_text()
    # --restart: the state set aside, the run starts over
    fresh = build_trainer(load_job_dict(changed), report=quiet, restart=True)
    assert fresh.state.step == 0 and list((tmp_path / "out" / "run").glob("training_state.*.old.safetensors"))


def test_interrupted_run_metrics_do_not_repeat(tiny_flux, images, tmp_path):
    d = _job(tiny_flux, images, tmp_path / "out", steps=4)
    d["config"]["process"][0]["save"]["save_every"] = 2
    trainer = build_trainer(load_job_dict(d), report=quiet)

    def crash(step, loss):
        if step == 3:  # after step 3's metrics line, before its save: the resume restarts at 2
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        trainer.train(on_step=crash)
    build_trainer(load_job_dict(d), report=quiet).train()
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_sigterm_saves_and_the_job_resumes(tiny_flux, images, tmp_path):
    d = _job(tiny_flux, images, tmp_path / "out", steps=400)
    d["config"]["process"][0]["save"]["save_every"] = 1000
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(d))
    proc = subprocess.Popen([sys.executable, "-m", "trainer", str(job)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "out" / "run" / "metrics.jsonl"
    t0 = time.monotonic()
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() - t0 < 300, proc.stderr.read()[-3000:] if proc.poll() else "slow"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-3000:]
    assert "stopped (SIGTERM) at step" in err and "Traceback" not in err
    saves = list((tmp_path / "out" / "run").glob("run_*.safetensors"))
    assert saves
    step = int(saves[0].stem.split("_")[-1])
    assert build_trainer(load_job_dict(d), report=quiet).state.step == step


def test_full_disk_is_one_message_and_keeps_the_last_save(tiny_flux, images, tmp_path, monkeypatch):
    d = _job(tiny_flux, images, tmp_path / "out", steps=4)
    d["config"]["process"][0]["save"]["save_every"] = 2
    trainer = build_trainer(load_job_dict(d), report=quiet)
    trainer.train(until=2)
    from safetensors import torch as st_torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st_torch, "save_file", full)
    with pytest.raises(UserError, match=r"run.safetensors: cannot write the save \(No space left on device\);"
                                        r" the previous save is intact .*run_000000002"):
        trainer.train()
    run = tmp_path / "out" / "run"
    assert not list(run.glob(".*.tmp")) and load_file(str(run / "run_000000002.safetensors"))


def test_wrong_files_are_named(tmp_path):
    from trainer.models.files import safetensors_shapes

    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(ModelFileError, match="a pickle checkpoint .*use the .safetensors file"):
        safetensors_shapes(ckpt)
    for header, why in (([1, 2], "not a mapping"), ({"a": {"dtype": "F32"}}, "no shape"), ({"a": "x"}, "no shape")):
        raw = json.dumps(header).encode()
        p = tmp_path / "bad.safetensors"
        p.write_bytes(len(raw).to_bytes(8, "little") + raw)
        with pytest.raises(ModelFileError, match=why):
            safetensors_shapes(p)


def test_run_folder_pieces_of_the_wrong_kind(tiny_flux, images, tmp_path):
    run = tmp_path / "out" / "run"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").mkdir()
    with pytest.raises(UserError, match="metrics.jsonl: expected a file here"):
        build_trainer(load_job_dict(_job(tiny_flux, images, tmp_path / "out")), report=quiet)
    (tmp_path / "file_out").mkdir()
    (tmp_path / "file_out" / "run").write_text("x")
    with pytest.raises(UserError, match="the run folder is a file"):
        build_trainer(load_job_dict(_job(tiny_flux, images, tmp_path / "file_out")), report=quiet)


def _fifo_model(tiny_flux: dict, folder: Path) -> dict:
    """The model's files as named pipes: opening one for reading blocks until a writer comes (none does), so a run
    that opens a model file before it fails hangs, and the test's timeout catches it."""
    folder.mkdir(parents=True, exist_ok=True)
    model = dict(tiny_flux)
    for key in ("name_or_path", "vae_path"):
        os.mkfifo(folder / Path(model[key]).name)
        model[key] = str(folder / Path(model[key]).name)
    model["text_encoder_paths"] = []
    for p in tiny_flux["text_encoder_paths"]:
        os.mkfifo(folder / Path(p).name)
        model["text_encoder_paths"].append(str(folder / Path(p).name))
    return model


def _cli_job(tmp_path: Path, d: dict) -> subprocess.CompletedProcess:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(d))
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}  # no ComfyUI install to find tokenizers in
    return subprocess.run([sys.executable, "-m", "trainer", str(job)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=env)


def test_bad_input_fails_before_any_model_file_is_opened(tiny_flux, images, tmp_path):
    model = _fifo_model(tiny_flux, tmp_path / "pipes")
    d = _job(model, tmp_path / "no_such_folder", tmp_path / "out")
    r = _cli_job(tmp_path, d)
    assert r.returncode == 2 and "datasets[0].folder_path" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()  # a job that fails validation creates no folders
    d = _job(model, images, tmp_path / "out", optimizer="adamw8bit")
    r = _cli_job(tmp_path, d)
    assert r.returncode == 2 and "adamw8bit needs a CUDA device" in r.stderr, r.stderr
    (images / "img_0.txt").unlink()
    r = _cli_job(tmp_path, _job(model, images, tmp_path / "out"))
    assert r.returncode == 2 and "1 files have no .txt caption (img_0.png)" in r.stderr, r.stderr
    (images / "img_0.txt").write_text("a caption again")
    empty = tmp_path / "not_a_tokenizer"
    empty.mkdir()
    r = _cli_job(tmp_path, _job({**model, "tokenizer_paths": [str(empty), str(empty)]}, images, tmp_path / "out"))
    assert r.returncode == 2 and "no CLIP tokenizer found" in r.stderr, r.stderr
    d = _job({**model, "vae_path": str(tmp_path / "no_vae.safetensors")}, images, tmp_path / "out")
    r = _cli_job(tmp_path, d)
    assert r.returncode == 2 and "model.vae_path:" in r.stderr and "does not exist" in r.stderr, r.stderr


def test_changed_network_on_resume_is_refused_before_the_model_loads(tiny_flux, images, tmp_path):
    d = _job(tiny_flux, images, tmp_path / "out", steps=4)
    trainer = build_trainer(load_job_dict(d), report=quiet)
    trainer.train(until=2)
    trainer.run.unlock()
    config_before = (tmp_path / "out" / "run" / "config.yaml").read_text()
    changed = _job(_fifo_model(tiny_flux, tmp_path / "pipes"), images, tmp_path / "out", steps=4)
    changed["config"]["process"][0]["network"]["linear"] = 8
    r = _cli_job(tmp_path, changed)
    assert r.returncode == 2 and "network.linear: 4 -> 8" in r.stderr, r.stderr
    assert (tmp_path / "out" / "run" / "config.yaml").read_text() == config_before  # the refused job wrote nothing


def test_a_run_needs_room_for_its_saves_and_state(tmp_path):
    from trainer.job import check_disk_room

    check_disk_room(tmp_path, 1_000_000, "float16")  # 28 MB
    with pytest.raises(UserError, match=r"GiB free, and this run's saves and resume state need about 9313\d\d\.\d\d GiB"):
        check_disk_room(tmp_path, 10**15 // 28, "float16")  # 1 PB: more than any disk here


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_an_interrupt_during_the_update_lands_after_the_step_count(tiny_flux, images, tmp_path):
    """SIGTERM while the optimizer updates the weights (torchrun's teardown can send it at any time): the stop
    comes once the step is counted, so the save on stop holds the weights of the step it names."""
    d = _job(tiny_flux, images, tmp_path / "out", steps=4)
    trainer = build_trainer(load_job_dict(d), report=quiet)
    update = trainer.optimizer.step

    def update_then_signal(*args, **kwargs):
        out = update(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the step's bookkeeping
        return out

    def stop(signum, frame):
        raise KeyboardInterrupt

    trainer.optimizer.step = update_then_signal
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert trainer.state.step == 1
    saved = load_file(str(tmp_path / "out" / "run" / "run_000000001.safetensors"))
    now = trainer.network.export(torch.float32)
    assert all(torch.equal(saved[k], now[k]) for k in now)
