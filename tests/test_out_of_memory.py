"""A step that runs out of the card's memory stops the run with one message: where, what was saved, and the keys of
this job that lower the peak; the save is the last step's weights, and the same job resumes from it."""

from __future__ import annotations

import pytest
import torch

from helpers import job_dict, make_images
from trainer.config import load_job_dict
from trainer.job import build_trainer
from trainer.train.out_of_memory import OutOfMemory, lower_memory_keys


def _out_of_memory_in_forward(trainer, at_step: int) -> None:
    """The card's allocator failing inside the denoiser's forward at step `at_step` (0-based): what a step that does
    not fit raises. The trainer's own code runs as it would."""
    block = trainer.model.repeated_blocks()[0]

    def pre_hook(module, args):
        if trainer.state.step == at_step:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 90.00 MiB.")

    block.register_forward_pre_hook(pre_hook)


def test_out_of_memory_stops_with_the_keys_to_change_and_keeps_the_last_step(tiny_flux, tmp_path):
    data = make_images(tmp_path / "data", n=2)
    d = job_dict(tiny_flux, data, tmp_path / "out", steps=4, disable_sampling=True)
    d["config"]["process"][0]["save"]["save_every"] = 100
    trainer = build_trainer(load_job_dict(d), report=lambda s: None)
    _out_of_memory_in_forward(trainer, at_step=2)
    with pytest.raises(OutOfMemory) as e:
        trainer.train()
    msg = str(e.value)
    assert "out of memory on the card in step 3" in msg
    saved = trainer.run.step_path(2)
    assert saved.exists() and f"saved {saved}" in msg
    for key in ("train.gradient_checkpointing: true (now False)", "model.quantize: true",
                "train.blocks_to_swap: auto", "a smaller datasets[].resolution (the largest now 32)"):
        assert key in msg, msg
    assert "cuda_graphs" not in msg  # not on in this job
    weights = {k: v.clone() for k, v in trainer.network.state_dict().items()}

    d["config"]["process"][0]["train"]["gradient_checkpointing"] = True  # the advice taken
    again = build_trainer(load_job_dict(d), report=lambda s: None)
    assert again.state.step == 2  # resumed from the save the stop wrote, with the changed setting
    for k, v in again.network.state_dict().items():
        assert torch.equal(v, weights[k]), k  # the last step's weights: the failed step changed nothing
    again.train()
    assert again.state.step == 4 and again.run.final_path.exists()


def test_out_of_memory_in_the_first_step_says_nothing_was_trained(tiny_flux, tmp_path):
    data = make_images(tmp_path / "data", n=2)
    trainer = build_trainer(load_job_dict(job_dict(tiny_flux, data, tmp_path / "out", steps=2,
                                                   disable_sampling=True)), report=lambda s: None)
    _out_of_memory_in_forward(trainer, at_step=0)
    with pytest.raises(OutOfMemory, match="in step 1; nothing was trained yet"):
        trainer.train()
    assert not list(trainer.run.root.glob("*.safetensors"))


def test_the_keys_offered_are_only_those_this_job_can_still_change(tiny_flux, tmp_path):
    data = make_images(tmp_path / "data", n=2)
    lean = load_job_dict(job_dict(tiny_flux, data, tmp_path, gradient_checkpointing=True, blocks_to_swap="auto",
                                  offload_activations=True, cuda_graphs=True, batch_size=2,
                                  gradient_accumulation=2)).process
    lean.model.quantize = True
    keys = lower_memory_keys(lean, host_places_weights=False)
    assert keys[0].startswith("train.cuda_graphs: false")
    assert not any(k.startswith(("train.gradient_checkpointing", "model.quantize", "train.blocks_to_swap",
                                 "train.offload_activations")) for k in keys), keys
    assert "train.batch_size: 1 with train.gradient_accumulation: 4 (now batch_size 2)" in keys
    plain = load_job_dict(job_dict(tiny_flux, data, tmp_path, gradient_checkpointing="auto")).process
    comfy = lower_memory_keys(plain, host_places_weights=True)  # ComfyUI's MODEL: its weights are ComfyUI's to place
    assert "train.gradient_checkpointing: true (auto left some blocks unchecked)" in comfy
    assert not any(k.startswith(("model.quantize", "train.blocks_to_swap")) for k in comfy), comfy


def test_auto_checkpointings_probe_out_of_memory_is_told_the_same_way(tiny_flux, tmp_path):
    """The probe is a fully checkpointed step: the message says so, and does not offer checkpointing."""
    from trainer.train.auto_checkpointing import plan_checkpointing

    data = make_images(tmp_path / "data", n=2)
    trainer = build_trainer(load_job_dict(job_dict(tiny_flux, data, tmp_path / "out", gradient_checkpointing="auto")),
                            report=lambda s: None)
    _out_of_memory_in_forward(trainer, at_step=0)
    with pytest.raises(OutOfMemory, match="auto's probe .*; nothing was trained yet; to fit, one of: model.quantize"
                       ) as e:
        plan_checkpointing(trainer, (32, 32, 1), lambda s: None, limit=10**15)
    assert "gradient_checkpointing: true" not in str(e.value)
