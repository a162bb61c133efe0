"""Block swap: the same outputs and gradients as the model held whole, with only a block (and the one being
fetched) of the swapped ones resident at a time, in training (checkpointed) and in sampling."""

from __future__ import annotations

import pytest
import torch

from helpers import job_dict, quiet
from trainer.config import load_job_dict
from trainer.job import build_trainer
from trainer.models.offload import BlockSwap


def _grads(trainer):
    trainer.network.zero_grad(set_to_none=True)
    loss = trainer._loss(0, torch.Generator().manual_seed(5))
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in trainer.network.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("swapped", [1, 2])
def test_swapped_blocks_train_and_sample_the_same(tiny_flux, images, tmp_path, swapped):
    d = job_dict(tiny_flux, images, tmp_path / "a", steps=2, gradient_checkpointing=True, disable_sampling=True)
    plain = build_trainer(load_job_dict(d), report=quiet)
    loss0, g0 = _grads(plain)

    d["config"]["process"][0]["training_folder"] = str(tmp_path / "b")
    d["config"]["process"][0]["train"]["blocks_to_swap"] = swapped
    trainer = build_trainer(load_job_dict(d), report=quiet)
    blocks = trainer.model.repeated_blocks()
    # the swapped blocks hold no weights between uses
    assert [sum(p.numel() for p in b.parameters()) == 0 for b in blocks][-swapped:] == [True] * swapped
    swap = trainer.model.block_swap
    assert isinstance(swap, BlockSwap) and swap.swapped == list(range(len(blocks) - swapped, len(blocks)))
    loss1, g1 = _grads(trainer)
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    assert g1.keys() == g0.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=k)
    assert swap.max_resident <= 2 and swap.loads >= 2 * swapped  # forward and recompute in backward
    trainer.train()
    plain.train()
    for k, v in plain.network.state_dict().items():
        torch.testing.assert_close(trainer.network.state_dict()[k], v, rtol=1e-4, atol=1e-6, msg=k)
    # sampling (no grad) streams the blocks too and drops each after use
    from trainer.sampling import denoise, initial_noise

    cond = plain.model.encode_text(["a cat"]) if plain.model.text_encoders_loaded() else None
    if cond is not None:
        noise = initial_noise(plain.model, 32, 32, 1)
        a = denoise(plain.model, noise, cond, None, 2, 3.5)
        b = denoise(trainer.model, noise, cond, None, 2, 3.5)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not swap.resident or len(swap.resident) <= 1


def test_auto_and_ai_toolkit_names(tiny_flux, images, tmp_path):
    from trainer.prepare import swap_setting

    d = job_dict(tiny_flux, images, tmp_path, blocks_to_swap="auto")
    assert swap_setting(load_job_dict(d).process) == "auto"
    d = job_dict(tiny_flux, images, tmp_path)
    d["config"]["process"][0]["model"].update(layer_offloading=True, layer_offloading_transformer_percent=0.5)
    assert swap_setting(load_job_dict(d).process) == "fraction:0.5"
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="blocks_to_swap: expected a number of blocks or auto"):
        load_job_dict(job_dict(tiny_flux, images, tmp_path, blocks_to_swap="lots"))


def test_auto_leaves_room_for_the_largest_training_size(tiny_flux, images, tmp_path):
    """blocks_to_swap auto reserves the activations of the largest bucket: more tokens reserve more, and the blocks'
    saved inputs count unless train.offload_activations keeps them in host memory."""
    from trainer.job import load_model
    from trainer.prepare import ACTIVATION_BYTES_PER_TOKEN_UNIT, activation_bytes

    job = load_job_dict(job_dict(tiny_flux, images, tmp_path, offload_activations=True))
    model = load_model(job, torch.device("cpu"), torch.float32)
    blocks = model.repeated_blocks()
    small = activation_bytes(model, blocks, (32, 32, 1), offloaded=True)
    big = activation_bytes(model, blocks, (64, 64, 1), offloaded=True)
    tokens = model.latent_shape(32, 32)[2] * model.latent_shape(32, 32)[3] // model.patch ** 2
    hidden, rest = divmod(small, tokens * ACTIVATION_BYTES_PER_TOKEN_UNIT)
    assert rest == 0 and hidden == model.denoiser.inner_dim and big == 4 * small
    assert activation_bytes(model, blocks, (32, 32, 1), offloaded=False) == small + tokens * hidden * 2 * len(blocks)
