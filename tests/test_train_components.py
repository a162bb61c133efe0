"""Optimizers, schedules, dtypes, checkpointing and caches of the training loop."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import job_dict
from trainer.config import load_job_dict
from trainer.errors import ConfigError
from trainer.job import build_trainer
from trainer.train.optim import build_optimizer, lr_factor


def quiet(_m):
    pass


def test_lr_schedules_with_warmup():
    assert [lr_factor("constant", s, 10, 2) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor("linear", 2, 10, 2) == 1.0 and lr_factor("linear", 10, 10, 2) == 0.0
    assert lr_factor("cosine", 6, 10, 2) == pytest.approx(0.5)
    assert lr_factor("cosine", 10, 10, 0, min_ratio=0.1) == pytest.approx(0.1)


def test_adamw8bit_needs_cuda_clearly():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ConfigError, match="adamw8bit needs a CUDA device"):
        build_optimizer("adamw8bit", p, 1e-3, {}, torch.device("cpu"))
    with pytest.raises(ConfigError, match="optimizer_params: not accepted by adamw"):
        build_optimizer("adamw", p, 1e-3, {"turbo": 1}, torch.device("cpu"))


def _adam_run(device: str, extra: dict) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 16, generator=g).to(device)) for _ in range(3)]
    opt = build_optimizer("adamw", [{"params": params, "lr": 1e-2}], 1e-2, extra, torch.device(device))
    for step in range(5):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step * 10 + i)).to(device)
        opt.step()
    return opt, [p.detach().cpu() for p in params]


def test_adamw_kernel_default_off_the_card():
    """Off the card torch's default stays (no fused kernel asked for); optimizer_params still choose."""
    opt, _ = _adam_run("cpu", {})
    assert not opt.param_groups[0]["fused"] and opt.param_groups[0]["foreach"] is None
    opt, _ = _adam_run("cpu", {"foreach": False})
    assert opt.param_groups[0]["foreach"] is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused AdamW default applies to parameters on a"
                    " CUDA card")
def test_adamw_fused_on_the_card_steps_as_foreach():
    fused, a = _adam_run("cuda", {})
    assert fused.param_groups[0]["fused"] is True
    foreach, b = _adam_run("cuda", {"foreach": True})
    assert not foreach.param_groups[0]["fused"] and foreach.param_groups[0]["foreach"] is True
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides", [
    {"dtype": "bf16", "gradient_checkpointing": True},
    {"timestep_type": "shift", "batch_size": 2, "lr_scheduler": "linear"},
])
def test_training_variants_step(tiny_flux, images, tmp_path, overrides):
    d = job_dict(tiny_flux, images, tmp_path / "out", steps=2, disable_sampling=True, **overrides)
    trainer = build_trainer(load_job_dict(d), report=quiet)
    trainer.train()
    assert trainer.state.step == 2
    assert all(torch.isfinite(torch.tensor(v)) for v in trainer.state.losses)
    if overrides.get("dtype") == "bf16":
        assert next(trainer.model.denoiser.parameters()).dtype == torch.bfloat16
        assert all(p.dtype == torch.float32 for p in trainer.network.parameters())
    if "batch_size" in overrides:
        assert trainer.scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # linear, to 0 at the end


def _trainer(tiny_flux, images, tmp_path, name, **train):
    d = job_dict(tiny_flux, images, tmp_path / name, **{"steps": 2, "disable_sampling": True, **train})
    return build_trainer(load_job_dict(d), report=quiet)


def _inputs(trainer, seed=3):
    return trainer.batch_inputs(0, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("key", ["snr_gamma", "linear_timesteps"])
def test_loss_weights_are_the_formulas(tiny_flux, images, tmp_path, key):
    """The loss with the setting is the plain loss times the weight the formula gives for the drawn sigma."""
    from trainer.train.timesteps import linear_timestep_weights

    plain = _trainer(tiny_flux, images, tmp_path, "a", timestep_type="sigmoid")
    value = 5.0 if key == "snr_gamma" else True
    weighted = _trainer(tiny_flux, images, tmp_path, "b", timestep_type="sigmoid", **{key: value})
    for seed in (1, 2, 3):
        sigmas = _inputs(plain, seed)[2]
        with torch.no_grad():
            lp = plain._loss(0, torch.Generator().manual_seed(seed))
            lw = weighted._loss(0, torch.Generator().manual_seed(seed))
        if key == "snr_gamma":
            want = plain.model.objective.min_snr_weights(sigmas, 5.0)
        else:
            want = linear_timestep_weights(sigmas)
        assert float(lw / lp) == pytest.approx(float(want), rel=1e-5)
        assert abs(float(want) - 1) > 1e-3  # the weight is not trivially 1 for these draws


def test_noise_offset_shifts_each_channel(tiny_flux, images, tmp_path):
    """noise_offset adds one value per sample and channel, over every position, of std noise_offset."""
    plain = _trainer(tiny_flux, images, tmp_path, "a")
    offset = _trainer(tiny_flux, images, tmp_path, "b", noise_offset=0.5)
    shifts = []
    for seed in range(8):
        n0, n1 = _inputs(plain, seed)[1], _inputs(offset, seed)[1]
        delta = n1 - n0
        per_channel = delta.mean(dim=(2, 3), keepdim=True)
        torch.testing.assert_close(delta, per_channel.expand_as(delta), rtol=0, atol=1e-5)
        shifts.append(per_channel.flatten())
    std = float(torch.cat(shifts).std())
    assert 0.35 < std < 0.65, std


def test_prodigy_adapts_its_step_size(tiny_flux, images, tmp_path):
    trainer = _trainer(tiny_flux, images, tmp_path, "p", optimizer="prodigy", lr=1.0, steps=3)
    d0 = trainer.optimizer.param_groups[0]["d"]
    trainer.train()
    assert trainer.optimizer.param_groups[0]["d"] > d0  # Prodigy's distance estimate grew from d0


def test_adafactor_keeps_factored_second_moments(tiny_flux, images, tmp_path):
    trainer = _trainer(tiny_flux, images, tmp_path, "f", optimizer="adafactor", lr=1e-3)
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    trainer.train()
    states = list(trainer.optimizer.state.values())
    assert any("exp_avg_sq_row" in st for st in states)  # 2-D parameters: row and column factors, not a full matrix
    assert any(not torch.equal(before[k], v) for k, v in trainer.network.state_dict().items())


def test_text_encoders_leave_memory_with_cached_embeddings(tiny_flux, images, tmp_path):
    d = job_dict(tiny_flux, images, tmp_path / "out", steps=1, cache_text_embeddings=True)
    d["config"]["process"][0]["datasets"][0]["caption_dropout_rate"] = 0.5
    trainer = build_trainer(load_job_dict(d), report=quiet)
    assert not trainer.model.text_encoders_loaded()
    assert "" in trainer.texts.mem  # the dropped caption is cached too
    trainer.train()  # samples were encoded before the encoders left
    assert (tmp_path / "out" / "run" / "samples" / "000000001_00.png").exists()


def test_latent_disk_cache_is_reused(tiny_flux, images, tmp_path):
    from trainer.data.cache import _tensor_digest

    d = job_dict(tiny_flux, images, tmp_path / "out", steps=1)
    d["config"]["process"][0]["datasets"][0]["cache_latents_to_disk"] = True
    first = build_trainer(load_job_dict(d), report=quiet)
    assert first.latents.encoded == 4
    files = sorted((images / "_latent_cache").glob("*.safetensors"))
    assert len(files) == 4
    marked = torch.full_like(load_file(str(files[0]))["latent"], 7.0)
    save_file({"latent": marked}, str(files[0]), metadata={"checksum": _tensor_digest({"latent": marked})})
    trainer = build_trainer(load_job_dict(d), report=quiet)
    assert trainer.latents.encoded == 0  # all from disk
    assert any(torch.equal(v, marked) for v in trainer.latents.mem.values())  # read back, not re-encoded
    # damaged files are rebuilt, not trusted: unreadable, garbled (checksum) or of another shape
    files[1].write_bytes(b"broken")
    save_file({"latent": marked + 1}, str(files[2]), metadata={"checksum": _tensor_digest({"latent": marked})})
    wrong = torch.zeros(3, *marked.shape[1:])
    save_file({"latent": wrong}, str(files[3]), metadata={"checksum": _tensor_digest({"latent": wrong})})
    trainer = build_trainer(load_job_dict(d), report=quiet)
    assert trainer.latents.encoded == 3
    for f in files[1:]:
        assert load_file(str(f))["latent"].shape == marked.shape and not torch.equal(load_file(str(f))["latent"], marked + 1)


CACHE_RUN = """
import sys, yaml
sys.path.insert(0, sys.argv[2])
from trainer.config import load_job_dict
from trainer.job import build_trainer
t = build_trainer(load_job_dict(yaml.safe_load(open(sys.argv[1]))), report=lambda m: None)
print("ENCODED", t.latents.encoded)
"""


def test_latent_cache_is_reused_by_another_process(tiny_flux, images, tmp_path):
    """The cache key is the same in every process (no hash of process-salted or unordered data): a second run
    with another PYTHONHASHSEED encodes nothing."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    d = job_dict(tiny_flux, images, tmp_path / "out", steps=1, disable_sampling=True)
    d["config"]["process"][0]["datasets"][0]["cache_latents_to_disk"] = True
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(d))
    counts = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        r = subprocess.run([sys.executable, "-c", CACHE_RUN, str(job), str(Path(__file__).parent.parent)],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        counts.append(int(r.stdout.split("ENCODED")[-1]))
    assert counts == [4, 0]


def test_unwritable_dataset_folder_caches_in_the_run_folder(tiny_flux, images, tmp_path):
    """Where _latent_cache cannot be made in the dataset folder (read-only for users; here a file in the way, which
    holds for root too) the cache goes to the run folder, and is reused from there."""
    d = job_dict(tiny_flux, images, tmp_path / "out", steps=1)
    d["config"]["process"][0]["datasets"][0]["cache_latents_to_disk"] = True
    (images / "_latent_cache").write_text("not a folder")
    build_trainer(load_job_dict(d), report=quiet)
    assert len(list((tmp_path / "out" / "run" / "_latent_cache" / "dataset_0").glob("*.safetensors"))) == 4
    assert build_trainer(load_job_dict(d), report=quiet).latents.encoded == 0


def test_partial_checkpointing_gives_the_same_training(tiny_flux, images, tmp_path, monkeypatch):
    """1 double + 1 single block: checkpointing none, half (one block) or all changes nothing but memory."""
    import torch.utils.checkpoint as ckpt

    real = ckpt.checkpoint
    calls = []

    def counting(fn, *args, **kwargs):
        calls.append(fn)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(ckpt, "checkpoint", counting)
    results, counts = [], []
    for i, gc in enumerate([False, 0.5, True]):
        calls.clear()
        d = job_dict(tiny_flux, images, tmp_path / f"o{i}", steps=2, disable_sampling=True, gradient_checkpointing=gc)
        trainer = build_trainer(load_job_dict(d), report=quiet)
        trainer.train()
        results.append(trainer.network.export(torch.float32))
        counts.append(len(calls))
    assert counts == [0, 2, 4]  # blocks checkpointed per step x 2 steps
    for r in results[1:]:
        for k in r:
            torch.testing.assert_close(r[k], results[0][k], rtol=0, atol=1e-6)
