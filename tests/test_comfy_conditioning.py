"""The ComfyUI backend hands each sample's cached conditioning to ComfyUI's extra_conds as ComfyUI's sampling hands a
prompt's: every entry a batch of one, and `pooled_output` always there (None for a text encoder without a pooled
vector, Chroma's T5), since Flux's extra_conds read it unconditionally. ComfyUI itself is not needed (the end-to-end
runs are integration/test_comfyui_train_families.py, chroma and sd35). The fixed training shift on ComfyUI's MODEL is
its discrete flow schedule's own (SD3: 3.0)."""

from __future__ import annotations

import torch

from trainer.models.comfy import comfy_conditioning, sampling_shift


def test_pooled_output_none_when_the_encoder_has_none() -> None:
    params = comfy_conditioning({"cross_attn": torch.ones(5, 8)}, "cpu")
    assert set(params) == {"cross_attn", "pooled_output"}
    assert params["pooled_output"] is None
    assert params["cross_attn"].shape == (1, 5, 8)


def test_a_pooled_vector_is_kept() -> None:
    pooled = torch.arange(6.0)
    params = comfy_conditioning({"cross_attn": torch.ones(5, 8), "pooled_output": pooled}, "cpu")
    assert params["pooled_output"].shape == (1, 6) and torch.equal(params["pooled_output"][0], pooled)



class ModelSamplingDiscreteFlow:  # named as ComfyUI's schedules are: the backend reads the class names
    def __init__(self, shift: float) -> None:
        self.shift = shift


class ModelSampling(ModelSamplingDiscreteFlow):  # ComfyUI's model_sampling() subclasses the schedule
    pass


class ModelSamplingFlux:
    shift = 1.15  # a mu on Flux's schedule, not a fixed shift


def test_the_fixed_shift_is_comfyuis_discrete_flow_shift() -> None:
    assert sampling_shift(ModelSampling(3.0)) == 3.0  # SD3's sampling_settings
    assert sampling_shift(ModelSampling(1.73)) == 1.73  # AuraFlow's


def test_no_fixed_shift_on_other_schedules() -> None:
    assert sampling_shift(ModelSamplingFlux()) is None


def test_an_entry_only_some_captions_have_stays_theirs() -> None:
    """HunyuanVideo 1.5's byT5 conditioning exists only for captions with quoted text: in a batch (encoded together,
    or collated from the text cache where each was encoded in another chunk) the captions that have it get theirs
    back at its own length, the others none, as ComfyUI's CLIP gives each of them alone."""
    from trainer.models.base import collate_conditioning, ragged_batch, sample_of, split_conditioning

    quoted = {"cross_attn": torch.randn(5, 8), "conditioning_byt5small": torch.randn(3, 4)}
    plain = {"cross_attn": torch.randn(7, 8)}
    batch = ragged_batch([plain, quoted, plain])
    got = [sample_of(batch, i) for i in range(3)]
    assert set(got[0]) == set(got[2]) == {"cross_attn"} and set(got[1]) == set(quoted)
    assert torch.equal(got[1]["conditioning_byt5small"], quoted["conditioning_byt5small"])
    assert torch.equal(got[0]["cross_attn"], plain["cross_attn"]) and torch.equal(got[1]["cross_attn"], quoted["cross_attn"])
    # the text cache: each caption from its own chunk's batch, then collated into a training batch
    cached = [split_conditioning(ragged_batch([plain]))[0], split_conditioning(ragged_batch([quoted]))[0]]
    again = collate_conditioning(cached)
    assert set(sample_of(again, 0)) == {"cross_attn"}
    assert torch.equal(sample_of(again, 1)["conditioning_byt5small"], quoted["conditioning_byt5small"])
    assert torch.equal(sample_of(again, 0)["cross_attn"], plain["cross_attn"])
