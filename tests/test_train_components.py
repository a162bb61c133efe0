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


@pytest.mark.parametrize("overrides", [
    {"optimizer": "prodigy", "lr": 1.0},
    {"optimizer": "adafactor"},
    {"dtype": "bf16", "gradient_checkpointing": True},
    {"timestep_type": "flux_shift", "linear_timesteps": True, "snr_gamma": 5.0, "noise_offset": 0.1},
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


def test_text_encoders_leave_memory_with_cached_embeddings(tiny_flux, images, tmp_path):
    d = job_dict(tiny_flux, images, tmp_path / "out", steps=1, cache_text_embeddings=True)
    d["config"]["process"][0]["datasets"][0]["caption_dropout_rate"] = 0.5
    trainer = build_trainer(load_job_dict(d), report=quiet)
    assert not trainer.model.text_encoders_loaded()
    assert "" in trainer.texts.mem  # the dropped caption is cached too
    trainer.train()  # samples were encoded before the encoders left
    assert (tmp_path / "out" / "run" / "samples" / "000000001_00.png").exists()


def test_latent_disk_cache_is_reused(tiny_flux, images, tmp_path):
    d = job_dict(tiny_flux, images, tmp_path / "out", steps=1)
    d["config"]["process"][0]["datasets"][0]["cache_latents_to_disk"] = True
    build_trainer(load_job_dict(d), report=quiet)
    files = sorted((images / "_latent_cache").glob("*.safetensors"))
    assert len(files) == 4
    marked = torch.full_like(load_file(str(files[0]))["latent"], 7.0)
    save_file({"latent": marked}, str(files[0]))
    trainer = build_trainer(load_job_dict(d), report=quiet)
    assert any(torch.equal(v, marked) for v in trainer.latents.mem.values())  # read back, not re-encoded
    # a damaged cache file is rebuilt, not trusted
    files[1].write_bytes(b"broken")
    trainer = build_trainer(load_job_dict(d), report=quiet)
    assert load_file(str(files[1]))["latent"].shape == marked.shape


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
