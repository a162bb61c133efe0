"""End-to-end runs on a tiny Flux: saves, resume, divergence, the saved file in an independent loader."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import job_dict, make_images, quiet, run_through_and_resumed
from trainer.config import load_job_dict
from trainer.errors import TrainingDiverged
from trainer.job import build_trainer, run_job


def test_end_to_end_run_folder(tiny_flux, images, tmp_path, caplog):
    d = job_dict(tiny_flux, images, tmp_path / "out", steps=4, cache_text_embeddings=True)
    d["config"]["process"][0]["sample"]["width"] = 34  # not a multiple of the tiny model's 4: rounded, with a message
    job = load_job_dict(d)
    with caplog.at_level("WARNING", logger="trainer"):
        state = run_job(job, report=quiet)
    assert "sample.samples[0]: 34x32 rounded to 32x32" in caplog.text
    run = tmp_path / "out" / "run"
    assert state.step == 4
    names = sorted(p.name for p in run.iterdir())
    assert "run.safetensors" in names and "run_000000002.safetensors" in names
    assert "config.yaml" in names and "training_state.safetensors" in names
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(set(m) >= {"loss", "lr", "s_per_step", "peak_mem_gib"} for m in metrics)
    samples = sorted(p.name for p in (run / "samples").glob("*.png"))
    assert samples == ["000000000_00.png", "000000004_00.png"]
    index = [json.loads(l) for l in (run / "samples" / "index.jsonl").read_text().splitlines()]
    assert [(r["step"], r["width"], r["height"], r["seed"], r["neg"], r["guidance_scale"], r["control_image"])
            for r in index] == [(0, 32, 32, 42, "", 3.5, None), (4, 32, 32, 42, "", 3.5, None)]
    with safe_open(str(run / "run.safetensors"), "pt") as f:
        md = f.metadata()
        keys = set(f.keys())
    assert md["ss_trigger_word"] == "sks" and md["eridiffusion.step"] == "4"
    assert yaml.safe_load(md["eridiffusion.job"])["config"]["name"] == "run"
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight" in keys
    assert "diffusion_model.single_blocks.0.linear1.alpha" in keys
    assert len(keys) == 13 * 3  # every block linear of the tiny model: down, up, alpha


def test_target_filters(tiny_flux, images, tmp_path):
    d = job_dict(tiny_flux, images, tmp_path / "out", steps=1)
    d["config"]["process"][0]["network"]["network_kwargs"] = {
        "only_if_contains": ["double_blocks"], "ignore_if_contains": ["transformer.transformer_blocks.0.ff.net"]}
    trainer = build_trainer(load_job_dict(d), report=quiet)
    keys = set(trainer.network.targets)
    assert all("double_blocks" in k for k in keys)
    assert "diffusion_model.double_blocks.0.img_mlp.0" not in keys
    assert "diffusion_model.double_blocks.0.txt_mlp.0" in keys


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_matches_uninterrupted(tiny_flux, tmp_path, accum):
    """Killed at step 2 (Ctrl-C saves), run again: the same final weights as a run never stopped."""
    data = make_images(tmp_path / "data", n=5)
    extra = dict(steps=4, gradient_accumulation=accum, lr_scheduler="cosine", lr_warmup_steps=1)
    d = job_dict(tiny_flux, data, tmp_path / "a", **extra)
    d["config"]["process"][0]["datasets"][0].update(caption_dropout_rate=0.3, flip_x=True)
    a, b = run_through_and_resumed(d, tmp_path, stop_at=2)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("where", ["weights", "loss"])
def test_divergence_stops_and_keeps_last_save(tiny_flux, images, tmp_path, where):
    """Weights blown up after the save at step 2: a non-finite network is never written (weights: blown up at step
    4, its save is refused), and a non-finite loss stops the run before the weights change (loss: blown up at step
    3, step 4's loss is not finite). Either way the last good save (step 2) is named, intact, and resumed from."""
    d = job_dict(tiny_flux, images, tmp_path / "out", steps=6)
    d["config"]["process"][0]["save"]["save_every"] = 2
    trainer = build_trainer(load_job_dict(d), report=quiet)
    up = next(p for n, p in trainer.network.named_parameters() if n.endswith("lora_up"))

    def blow_up(step, loss):
        if step == (4 if where == "weights" else 3):
            with torch.no_grad():
                up.fill_(float("inf"))

    match = "non-finite" if where == "weights" else "loss became"
    with pytest.raises(TrainingDiverged, match=match) as e:
        trainer.train(on_step=blow_up)
    run = tmp_path / "out" / "run"
    saves = sorted(run.glob("run_*.safetensors"))
    assert saves and saves[-1].stem == "run_000000002" and str(saves[-1]) in str(e.value)
    assert all(torch.isfinite(t).all() for p in saves for t in load_file(str(p)).values())
    assert not (run / "run.safetensors").exists()
    # the state on disk is the last good one: a rerun resumes from it
    assert build_trainer(load_job_dict(d), report=quiet).state.step == 2


def _diffusers_prediction(flux_file: str, lora_file: Path, model, noisy, sigmas, cond) -> torch.Tensor:
    """Load the base file fresh, apply the LoRA file with diffusers' own Flux LoRA loader, predict."""
    from diffusers import FluxPipeline

    from trainer.models.flux import load_flux_transformer

    fresh = load_flux_transformer(Path(flux_file), torch.float32, "flux")
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=fresh)
    pipe.load_lora_weights(str(lora_file))
    trained = model.denoiser
    model.denoiser = fresh
    try:
        with torch.no_grad():
            return model.predict(noisy, sigmas, cond, guidance=3.5)
    finally:
        model.denoiser = trained


def test_saved_lora_reproduces_trained_model_in_diffusers(tiny_flux, images, tmp_path):
    """The file alone, read by diffusers' Flux LoRA loader into a fresh model, gives the trained outputs.

    diffusers' converter hard-codes full-width (3072) splits for single-block linear1, so this tiny model
    leaves linear1 out; test_saved_lora_full_width_linear1 covers it at full width.
    """
    d = job_dict(tiny_flux, images, tmp_path / "out", steps=3, lr=5e-2)
    d["config"]["process"][0]["network"]["network_kwargs"] = {"ignore_if_contains": ["linear1"]}
    trainer = build_trainer(load_job_dict(d), report=quiet)
    trainer.train()
    model = trainer.model
    assert all(a.lora_up.abs().max() > 0 for a in trainer.network.adapters.values())  # really trained
    torch.manual_seed(0)
    noisy, sigmas = torch.randn(1, 16, 8, 8), torch.tensor([0.6])
    cond = model.encode_text(["sks, a red circle"])
    trainer.network.eval()
    with torch.no_grad():
        ours = model.predict(noisy, sigmas, cond, guidance=3.5)
        trainer.network.detach()
        base = model.predict(noisy, sigmas, cond, guidance=3.5)
    assert (ours - base).abs().max() > 1e-4  # the LoRA changes the output
    theirs = _diffusers_prediction(tiny_flux["name_or_path"], tmp_path / "out" / "run" / "run.safetensors",
                                   model, noisy, sigmas, cond)
    err = float((theirs - ours).abs().max() / ours.abs().max())
    assert err < 1e-4, err


def test_saved_lora_full_width_every_target(tmp_path):
    """At Flux's real width (3072, one double + one single block), every target incl. fused linear1."""
    from trainer.demo import tiny
    from trainer.demo import flux as demo_flux
    from trainer.models.flux import FluxModel, load_flux_transformer
    from trainer.networks.network import Network

    cfg = demo_flux.flux_diffusers_config(hidden=3072, head_dim=128, double=1, single=1, context_dim=64,
                                     pooled_dim=64, guidance=True)
    flux_file = tmp_path / "flux.safetensors"
    demo_flux.make_flux_file(flux_file, cfg, dtype=torch.bfloat16)
    model = FluxModel(load_flux_transformer(flux_file, torch.float32, "flux"), None, None, None, None, None, 8,
                      torch.device("cpu"), torch.float32)
    net = Network(model.targets(), "lora", rank=4, alpha=8.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    net.attach()
    lora_file = tmp_path / "lora.safetensors"
    from trainer.fileio import save_safetensors_atomic

    save_safetensors_atomic(net.export(torch.float32), lora_file)
    noisy, sigmas = torch.randn(1, 16, 4, 4, generator=g), torch.tensor([0.4])
    cond = {"t5": torch.randn(1, 8, 64, generator=g), "pooled": torch.randn(1, 64, generator=g)}
    with torch.no_grad():
        ours = model.predict(noisy, sigmas, cond, guidance=3.5)
    net.detach()
    theirs = _diffusers_prediction(str(flux_file), lora_file, model, noisy, sigmas, cond)
    err = float((theirs - ours).abs().max() / ours.abs().max())
    assert err < 1e-4, err


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_cli_bad_input_one_line_error(tiny_flux, tmp_path):
    d = job_dict(tiny_flux, tmp_path / "missing", tmp_path / "out")
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(d))
    r = _cli([str(p)], tmp_path)
    assert r.returncode == 2
    err_lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(err_lines) == 1 and "datasets[0].folder_path" in err_lines[0]
    assert "Traceback" not in r.stderr
    r = _cli([str(p), "--set", "train.lr=fast"], tmp_path)
    assert r.returncode == 2 and "config.process[0].train.lr: expected a number, got 'fast'" in r.stderr


def test_cli_trains_and_resumes_finished_run(tiny_flux, images, tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(job_dict(tiny_flux, images, tmp_path / "out", steps=2)))
    r = _cli([str(p)], tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "run" / "run.safetensors").exists()
    # sampling says so, with its own progress, at step 0 and after the last step
    assert "sampling 1 previews at step 0" in r.stdout and "sampling 1 previews at step 2" in r.stdout
    assert r.stdout.count("preview 1/1 in") == 2
    # one rate on the bar (the training step's) and the time left at it; not tqdm's wall-clock rate
    assert " s/step, " in r.stderr and " left, loss " in r.stderr and "step/s" not in r.stderr
    r = _cli([str(p)], tmp_path)
    assert r.returncode == 0 and "already finished" in r.stdout
