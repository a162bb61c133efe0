"""Test helpers: tiny real Flux-family files (original layouts), synthetic images, job dicts."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw

TINY_FLUX = dict(hidden=32, head_dim=16, double=1, single=1, context_dim=32, pooled_dim=64)


def write_tiny_flux(folder: Path, guidance: bool = True, seed: int = 4) -> dict:
    """A tiny Flux (+ CLIP, T5, VAE, tokenizers) in the files users keep; returns the `model:` config."""
    from trainer.demo import tiny
    from trainer.demo import flux as demo_flux

    folder.mkdir(parents=True, exist_ok=True)
    ct = tiny.build_tokenizer(folder / "tok_clip", "clip")
    tt = tiny.build_tokenizer(folder / "tok_t5", "t5")
    tiny.make_clip_file(folder / "clip_l.safetensors", len(ct), hidden=TINY_FLUX["pooled_dim"])
    tiny.make_t5_file(folder / "t5.safetensors", len(tt), d_model=TINY_FLUX["context_dim"])
    tiny.make_vae_file(folder / "ae.safetensors", [32, 32])
    cfg = demo_flux.flux_diffusers_config(guidance=guidance, **TINY_FLUX)
    demo_flux.make_flux_file(folder / "flux.safetensors", cfg, seed=seed, dtype=torch.float32)
    return {
        "arch": "flux",
        "name_or_path": str(folder / "flux.safetensors"),
        "text_encoder_paths": [str(folder / "clip_l.safetensors"), str(folder / "t5.safetensors")],
        "vae_path": str(folder / "ae.safetensors"),
        "tokenizer_paths": [str(folder / "tok_clip"), str(folder / "tok_t5")],
        "t5_max_length": 8,
    }


def make_images(folder: Path, n: int = 4, size: tuple[int, int] = (32, 32), captions: bool = True, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
        d = ImageDraw.Draw(img)
        w, h = size
        d.ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=tuple(rng.randrange(256) for _ in range(3)))
        img.save(folder / f"img_{i}.png")
        if captions:
            (folder / f"img_{i}.txt").write_text(f"a red circle on a blue background {i}")
    return folder


def job_dict(model: dict, dataset: Path, out: Path, name: str = "run", **train) -> dict:
    t = {"batch_size": 1, "steps": 3, "lr": 1e-3, "optimizer": "adamw", "dtype": "fp32",
         "gradient_checkpointing": False, "seed": 7}
    t.update(train)
    return {
        "job": "extension",
        "config": {
            "name": name,
            "process": [{
                "type": "sd_trainer",
                "training_folder": str(out),
                "device": "cpu",
                "trigger_word": "sks",
                "network": {"type": "lora", "linear": 4, "linear_alpha": 4},
                "save": {"dtype": "fp32", "save_every": 2, "max_step_saves_to_keep": 2},
                "datasets": [{"folder_path": str(dataset), "caption_ext": "txt", "resolution": [32]}],
                "train": t,
                "model": dict(model),
                "sample": {"sample_every": 100, "width": 32, "height": 32, "sample_steps": 2,
                           "prompts": ["[trigger] a cat"], "guidance_scale": 3.5},
            }],
        },
    }


def run_through_and_resumed(d: dict, tmp_path: Path, stop_at: int = 2) -> tuple[dict, dict]:
    """The final LoRA of job `d` run through (into tmp_path/a), and of the same job stopped by Ctrl-C after
    `stop_at` steps and run again (into tmp_path/b), which must resume at `stop_at` from the save the stop wrote."""
    import copy

    import pytest
    from safetensors.torch import load_file

    from trainer.config import load_job_dict
    from trainer.job import build_trainer, run_job

    def quiet(_msg: str) -> None:
        pass

    a, b = copy.deepcopy(d), copy.deepcopy(d)
    a["config"]["process"][0]["training_folder"] = str(tmp_path / "a")
    b["config"]["process"][0]["training_folder"] = str(tmp_path / "b")
    name = d["config"]["name"]
    run_job(load_job_dict(a), report=quiet)
    trainer = build_trainer(load_job_dict(b), report=quiet)

    def interrupt(step, loss):
        if step == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer.train(on_step=interrupt)
    run_b = tmp_path / "b" / name
    assert (run_b / f"{name}_{stop_at:09d}.safetensors").exists() and not (run_b / f"{name}.safetensors").exists()
    trainer = build_trainer(load_job_dict(b), report=quiet)
    assert trainer.state.step == stop_at
    trainer.train()
    return (load_file(str(tmp_path / "a" / name / f"{name}.safetensors")),
            load_file(str(run_b / f"{name}.safetensors")))


def quiet(_msg: str) -> None:
    """A report callback that prints nothing (the trainer's progress lines)."""


def assert_family_resumes(model_cfg: dict, data: Path, tmp_path: Path) -> None:
    """A family's cached-text job (cosine schedule, caption dropout) stopped at step 2 and resumed ends with the
    LoRA a run never stopped ends with."""
    d = job_dict(model_cfg, data, tmp_path / "a", steps=4, lr_scheduler="cosine", cache_text_embeddings=True,
                 disable_sampling=True)
    d["config"]["process"][0]["datasets"][0]["caption_dropout_rate"] = 0.3
    a, b = run_through_and_resumed(d, tmp_path, stop_at=2)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def merge_lora(original: dict, lora: dict) -> dict:
    """W + alpha / rank * up @ down on original-layout weights, by ComfyUI's key names (`diffusion_model.<weight
    name without .weight>`; conv LoRAs as their matrices): an independent reading of a saved LoRA."""
    out = dict(original)
    for k in lora:
        if not k.endswith(".lora_down.weight"):
            continue
        name = k.removeprefix("diffusion_model.").removesuffix(".lora_down.weight")
        down, up = lora[k].double(), lora[k.replace("lora_down", "lora_up")].double()
        scale = float(lora[k.replace("lora_down.weight", "alpha")]) / down.shape[0]
        w = out[f"{name}.weight"]
        out[f"{name}.weight"] = (w.double() + (up.flatten(1) @ down.flatten(1) * scale).reshape(w.shape)).to(w.dtype)
    return out
