"""The ComfyUI backend hands each sample's cached conditioning to ComfyUI's extra_conds as ComfyUI's sampling hands a
prompt's: every entry a batch of one, and `pooled_output` always there (None for a text encoder without a pooled
vector, Chroma's T5), since Flux's extra_conds read it unconditionally. ComfyUI itself is not needed (the end-to-end
runs are integration/test_comfyui_train_families.py, chroma and sd35)."""

from __future__ import annotations

import torch

from trainer.models.comfy import comfy_conditioning


def test_pooled_output_none_when_the_encoder_has_none() -> None:
    params = comfy_conditioning({"cross_attn": torch.ones(5, 8)}, "cpu")
    assert set(params) == {"cross_attn", "pooled_output"}
    assert params["pooled_output"] is None
    assert params["cross_attn"].shape == (1, 5, 8)


def test_a_pooled_vector_is_kept() -> None:
    pooled = torch.arange(6.0)
    params = comfy_conditioning({"cross_attn": torch.ones(5, 8), "pooled_output": pooled}, "cpu")
    assert params["pooled_output"].shape == (1, 6) and torch.equal(params["pooled_output"][0], pooled)
