"""Data-parallel training over several processes, proven on the CPU with gloo (two ranks of a tiny Flux):
`torchrun --nproc_per_node 2 -m trainer job.yaml` at batch b ends with the weights one process trains at batch 2b; a
run whose rank was killed resumes to the same end as one never stopped; a rank that fails stops the other within
seconds, with its message, and the last save stays whole; sessions (the ComfyUI nodes) refuse such a launch.

The failure tests launch the ranks themselves (the launch variables torchrun sets, without torchrun), so the other
rank's stop is the trainer's own doing, not the launcher's teardown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import job_dict, quiet
from helpers import make_images
from launch_helpers import LAUNCH_VARS, launch_env, rel, torchrun, write_job
from trainer.config import load_job_dict
from trainer.errors import ConfigError, UserError
from trainer.job import run_job
from trainer.train.distributed import start
from trainer.train.state_file import read_state

STEPS = 20
pytestmark = pytest.mark.usefixtures("one_thread")  # as the ranks run (OMP_NUM_THREADS=1): no spinning workers


def _job(model: dict, data: Path, out: Path, **train) -> dict:
    """Two micro-batches a step over 5 images (a global batch of 2 leaves one rank nothing in every third), cosine
    with warm-up, noise offset, caption dropout, a disk latent cache (the main rank writes it, the other reads)."""
    settings = dict(steps=STEPS, batch_size=1, gradient_accumulation=2, lr_scheduler="cosine", lr_warmup_steps=2,
                    noise_offset=0.05, cache_text_embeddings=True, disable_sampling=True)
    d = job_dict(model, data, out, **{**settings, **train})
    p = d["config"]["process"][0]
    p["datasets"][0].update(caption_dropout_rate=0.3, cache_latents_to_disk=True)
    p["save"].update(save_every=2, max_step_saves_to_keep=2)
    return d


def _torchrun(path: Path) -> subprocess.CompletedProcess:
    return torchrun("-m", "trainer", str(path), cwd=path.parent)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(path: Path, tag: str = "") -> tuple[list[subprocess.Popen], list[Path]]:
    """The two ranks started as a launcher starts them; their output goes to rank{r}{tag}.out / .err beside the job."""
    port, procs, logs = str(_free_port()), [], []
    for r in range(2):
        logs.append(path.parent / f"rank{r}{tag}.err")
        env = launch_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "trainer", str(path)], cwd=path.parent, env=env,
                                      stdout=logs[-1].with_suffix(".out").open("w"), stderr=logs[-1].open("w")))
    return procs, logs


def _exit_times(procs: list[subprocess.Popen], timeout: float) -> list[float]:
    ends: list[float | None] = [None] * len(procs)
    deadline = time.monotonic() + timeout
    while None in ends:
        for i, p in enumerate(procs):
            if ends[i] is None and p.poll() is not None:
                ends[i] = time.monotonic()
        if time.monotonic() > deadline:
            for p in procs:
                p.kill()
            raise AssertionError(f"ranks still running after {timeout} s: {ends}")
        time.sleep(0.01)
    return ends


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("ddp") / "data", n=5)


@pytest.fixture(scope="module")
def two_ranks(tiny_flux, data, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The final LoRA of the job trained by two ranks at batch 1 through torchrun, never stopped."""
    out = tmp_path_factory.mktemp("two_ranks")
    r = _torchrun(write_job(_job(tiny_flux, data, out), out))
    assert r.returncode == 0, r.stderr[-4000:]
    assert "samples/s on 2 ranks" in r.stderr  # the bar: the job's rate, every rank's images
    return load_file(str(out / "run" / "run.safetensors"))


def test_two_ranks_train_as_one_process_with_the_whole_batch(two_ranks, tiny_flux, data, tmp_path):
    final = {}
    for b in (2, 1):
        run_job(load_job_dict(_job(tiny_flux, data, tmp_path / f"b{b}", batch_size=b)), report=quiet)
        final[b] = load_file(str(tmp_path / f"b{b}" / "run" / "run.safetensors"))
    assert rel(two_ranks, final[2]) < 1e-5
    # the comparison can fail: a rank's own batch alone trains another network
    assert rel(two_ranks, final[1]) > 1e-3


def test_a_killed_rank_stops_the_other_and_the_run_resumes_to_the_same_end(two_ranks, tiny_flux, data, tmp_path):
    path = write_job(_job(tiny_flux, data, tmp_path), tmp_path)
    run = tmp_path / "run"
    procs, logs = _ranks(path)
    deadline = time.monotonic() + 120
    while not list(run.glob("run_0*.safetensors")) and all(p.poll() is None for p in procs):
        assert time.monotonic() < deadline, "no save within 120 s"
        time.sleep(0.002)
    assert all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
    os.kill(procs[1].pid, signal.SIGKILL)  # rank 1 dies without a word, mid-run
    killed = time.monotonic()
    ends = _exit_times(procs, timeout=60)
    err = logs[0].read_text()
    assert procs[0].returncode == 2 and ends[0] - killed < 10, err[-3000:]
    assert f"error: rank 0 of 2: " in err and f"rank 1 (process {procs[1].pid}) is gone" in err, err[-3000:]
    # what the stop left is whole: every save reads, and the state is at the newest one
    saves = sorted(run.glob("run_0*.safetensors"))
    assert saves and all(load_file(str(p)) for p in saves)
    step = read_state(run / "training_state.safetensors")["step"]
    assert 2 <= step == int(saves[-1].stem.rsplit("_", 1)[1]) < STEPS and not (run / "run.safetensors").exists()
    procs, logs = _ranks(path, "_again")  # the same command again: both ranks resume from that state
    _exit_times(procs, timeout=120)
    assert [p.returncode for p in procs] == [0, 0], logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]
    assert f"resuming {run} from step {step}" in logs[0].with_suffix(".out").read_text()
    resumed = load_file(str(run / "run.safetensors"))
    for k in two_ranks:
        torch.testing.assert_close(resumed[k], two_ranks[k], rtol=0, atol=1e-6, msg=k)


def test_a_failing_rank_stops_the_other_within_seconds_with_its_message(tiny_flux, data, tmp_path):
    # a folder where rank 0 must write the step-4 save: only the main rank writes, so only it fails
    (tmp_path / "run" / "run_000000004.safetensors").mkdir(parents=True)
    procs, logs = _ranks(write_job(_job(tiny_flux, data, tmp_path), tmp_path))
    ends = _exit_times(procs, timeout=120)
    err0, err1 = (p.read_text() for p in logs)
    assert [p.returncode for p in procs] == [2, 2], err0[-3000:] + err1[-3000:]
    assert abs(ends[1] - ends[0]) < 5
    assert "error: rank 0 of 2: " in err0 and "run_000000004.safetensors: cannot write the save" in err0
    line = next(l for l in err1.splitlines() if l.startswith("error: rank 1 of 2: "))
    assert "rank 0 failed: " in line and "run_000000004.safetensors: cannot write the save" in line, err1[-3000:]
    run = tmp_path / "run"
    assert load_file(str(run / "run_000000002.safetensors"))
    assert read_state(run / "training_state.safetensors")["step"] == 2


def test_sessions_refuse_a_multi_process_launch(tiny_flux, data, tmp_path, monkeypatch):
    from trainer.session import TrainingSession

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="a training session .* trains in one process, but WORLD_SIZE is 2"):
        TrainingSession(job_dict(tiny_flux, data, tmp_path), report=quiet)
    assert not (tmp_path / "run").exists()


def test_ddp_without_a_launch_names_the_key(tiny_flux, data, tmp_path, monkeypatch):
    for v in LAUNCH_VARS:
        monkeypatch.delenv(v, raising=False)
    job = load_job_dict(_job(tiny_flux, data, tmp_path, distributed="ddp"))
    with pytest.raises(ConfigError, match=r"train\.distributed: ddp needs a multi-process launch"):
        start(job, torch.device("cpu"))
    assert start(load_job_dict(_job(tiny_flux, data, tmp_path)), torch.device("cpu")) is None  # auto: one process
    with pytest.raises(ConfigError, match=r"train\.distributed: fsdp needs a multi-process launch"):
        start(load_job_dict(_job(tiny_flux, data, tmp_path, distributed="fsdp")), torch.device("cpu"))
