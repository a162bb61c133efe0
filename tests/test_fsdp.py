"""train.distributed fsdp, proven on the CPU with gloo and two ranks: the frozen base's blocks sharded over the ranks
(each holds half of their weights) train the LoRA one process trains with the whole batch, previews included (every
rank samples, the main rank writes the one a single process writes); every engine family's sharded forward and
LoRA gradients equal its whole model's; settings fsdp is not built with are refused before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from helpers import job_dict, make_images, quiet
from kolors_helpers import write_tiny_kolors
from launch_helpers import rel, torchrun, write_job
from sdxl_helpers import write_tiny_sdxl
from test_chroma import write_tiny_chroma
from trainer.config import load_job_dict
from trainer.demo import DEMO_WRITERS, demo_job, make_dataset
from trainer.demo.videos import make_video_dataset
from trainer.errors import ConfigError
from trainer.job import check_before_loading, run_job
from trainer.models import registry

pytestmark = pytest.mark.usefixtures("one_thread")
HERE = Path(__file__).resolve().parent


def _job(model: dict, data: Path, out: Path, **train) -> dict:
    """As the ddp tests' job (two micro-batches a step over 5 images: a global batch of 2 leaves one rank nothing in
    every third, so it runs the stand-in forward), with previews before training and at the end."""
    settings = dict(steps=8, batch_size=1, gradient_accumulation=2, lr_scheduler="cosine", lr_warmup_steps=2,
                    noise_offset=0.05, cache_text_embeddings=True, gradient_checkpointing=0.5)
    d = job_dict(model, data, out, **{**settings, **train})
    p = d["config"]["process"][0]
    p["datasets"][0]["caption_dropout_rate"] = 0.3
    p["save"].update(save_every=4, max_step_saves_to_keep=2)
    p["sample"] = {"sample_every": 100, "width": 32, "height": 32, "sample_steps": 2, "guidance_scale": 1.0,
                   "seed": 3, "prompts": ["a red circle"]}
    return d


def _previews(run: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p), dtype=np.int16) for p in sorted((run / "samples").glob("*.png"))}


def test_two_sharded_ranks_train_and_preview_as_one_process_with_the_whole_batch(tiny_flux, tmp_path):
    data = make_images(tmp_path / "data", n=5)
    out = tmp_path / "fsdp"
    out.mkdir()
    r = torchrun("-m", "trainer", str(write_job(_job(tiny_flux, data, out, distributed="fsdp"), out)), cwd=out)
    assert r.returncode == 0, r.stderr[-4000:]
    said = [ln for ln in r.stdout.splitlines() if "train.distributed fsdp:" in ln]
    assert said and "blocks sharded over 2 ranks" in said[0], r.stdout[-3000:]
    sharded = load_file(str(out / "run" / "run.safetensors"))
    final = {}
    for b in (2, 1):
        run_job(load_job_dict(_job(tiny_flux, data, tmp_path / f"b{b}", batch_size=b)), report=quiet)
        final[b] = load_file(str(tmp_path / f"b{b}" / "run" / "run.safetensors"))
    assert rel(sharded, final[2]) < 1e-5
    assert rel(sharded, final[1]) > 1e-3  # the comparison can fail: one rank's items alone train another network
    ours, one = _previews(out / "run"), _previews(tmp_path / "b2" / "run")
    assert len(ours) == 2 and ours.keys() == one.keys()  # step 0 and the end, written once
    for name in ours:
        assert np.abs(ours[name] - one[name]).max() <= 1, name


def _family_jobs(folder: Path) -> list[Path]:
    """A job per engine family with its own model class (Flux and Flex share Flux's, trained above): the family's
    demo files (the tests' tiny ones for Chroma, SDXL and Kolors), two items of its kind of data at a small size,
    half the blocks checkpointed; DoRA once (its scale reads the base's whole weight inside a sharded block)."""
    images = make_dataset(folder / "images", n=2, size=(64, 64))
    clips = make_video_dataset(folder / "clips", n=2, size=(32, 32), frames=9, fps=16)
    start = folder / "start.png"
    Image.open(images / "shape_00.png").resize((32, 32)).save(start)
    tiny = {"chroma": write_tiny_chroma, "sdxl": write_tiny_sdxl, "kolors": write_tiny_kolors}
    runs = [(a, "lora") for a in ("chroma", "sdxl", "kolors", "sd3", "hidream", "sana", "omnigen2", "wan21",
                                  "wan21_i2v", "wan21_vace", "ltxv", "hunyuan_video")] + [("sd3", "dora")]
    paths = []
    for arch, network in runs:
        fam = registry.get_family(arch)
        models = folder / "models" / arch
        model = tiny[arch](models) if arch in tiny else DEMO_WRITERS[arch](models)
        d = demo_job(arch, model, clips if fam.video else images, folder, 1, video=fam.video,
                     start_image=start if fam.video and fam.takes_control else None)
        p = d["config"]["process"][0]
        p["datasets"][0].update(resolution=[32 if fam.video else 64], cache_latents_to_disk=False)
        p["network"]["type"] = network
        p["train"].update(batch_size=2, gradient_checkpointing=0.5, disable_sampling=True)
        paths.append(folder / f"{arch}_{network}.yaml")
        paths[-1].write_text(yaml.safe_dump(d))
    return paths


def test_every_family_sharded_gives_its_whole_models_loss_and_gradients(tmp_path):
    paths = _family_jobs(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    r = torchrun(str(HERE / "fsdp_rank.py"), str(out), *map(str, paths), cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    for rank in (0, 1):
        rows = [json.loads(ln) for ln in (out / f"rank{rank}.jsonl").read_text().splitlines()]
        assert [row["job"] for row in rows] == [p.stem for p in paths]
        for row in rows:
            who = f"rank {rank}, {row['job']}"
            # half of the blocks' weights on this rank (rounded up per tensor), not a copy of them all
            assert row["local_bytes"] <= 0.55 * row["total_bytes"], who
            assert row["grad_norm"] > 0, who
            assert row["grad_rel"] < 1e-5, who
            for a, b in (("loss", "sharded_loss"), ("value", "sharded_value")):
                assert row[b] == pytest.approx(row[a], rel=1e-5), who


def test_settings_fsdp_is_not_built_with_are_refused_before_loading(tiny_flux, tmp_path):
    data = make_images(tmp_path / "data", n=2)
    for train, model, named in (({}, {"quantize": True}, "model.quantize"),
                                ({"blocks_to_swap": 2}, {}, "train.blocks_to_swap"),
                                ({"compile": True}, {}, "train.compile"),
                                ({"gradient_checkpointing": "auto"}, {}, "train.gradient_checkpointing auto")):
        d = job_dict(tiny_flux, data, tmp_path, distributed="fsdp", **train)
        d["config"]["process"][0]["model"].update(model)
        with pytest.raises(ConfigError, match=rf"train\.distributed: fsdp is not available with {named}"):
            check_before_loading(load_job_dict(d))
    check_before_loading(load_job_dict(job_dict(tiny_flux, data, tmp_path, distributed="fsdp")))  # alone: fine
    assert not (tmp_path / "run").exists()
