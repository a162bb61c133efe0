"""The ComfyUI backend's conditioning nodes (ComfyUI's WanImageToVideo, WanVaceToVideo): which ComfyUI model configs
take their inputs through one, which read CLIP vision, which are still refused for want of conditioning this path
does not build, and the node's conditioning entries cached per item and handed back to extra_conds as the node wrote
them. ComfyUI itself is not needed (the end-to-end runs, the nodes included, are
integration/test_comfyui_train_families.py: wan21_i2v, wan22_a14b_i2v, wan21_vace)."""

from __future__ import annotations

import pytest
import torch

from trainer.models.comfy import (NODE_PREFIX, WAN_IMAGE_TO_VIDEO, WAN_VACE, conditioning_node, missing_conditioning,
                                  node_entries, node_kwargs, reads_clip_vision)


class Wan21:  # ComfyUI's latent format: 16 channels
    latent_channels = 16


class BASE:
    def __init__(self, unet_config: dict) -> None:
        self.unet_config = unet_config
        self.latent_format = Wan21()


class WAN21_T2V(BASE):  # named as ComfyUI's supported_models entries are: the backend reads the class names
    pass


class WAN21_I2V(WAN21_T2V):
    pass


class WAN21_Vace(WAN21_T2V):
    pass


class WAN21_FunControl2V(WAN21_T2V):
    pass


def wan(cls, model_type: str, in_dim: int, out_dim: int = 16):
    return cls({"image_model": "wan2.1", "model_type": model_type, "in_dim": in_dim, "out_dim": out_dim})


def test_wan21_i2v_and_vace_through_their_nodes() -> None:
    i2v, vace = wan(WAN21_I2V, "i2v", 36), wan(WAN21_Vace, "vace", 16)
    assert conditioning_node(i2v) is WAN_IMAGE_TO_VIDEO and conditioning_node(vace) is WAN_VACE
    assert missing_conditioning(i2v) is None and missing_conditioning(vace) is None
    assert reads_clip_vision(i2v) and not reads_clip_vision(vace)  # img_emb exists for model_type i2v only
    assert WAN_VACE.takes_masks and WAN_VACE.takes_references and not WAN_IMAGE_TO_VIDEO.takes_masks


def test_wan22_i2v_a14b_detected_as_t2v_takes_the_start_image_without_clip_vision() -> None:
    """36 input channels without CLIP-vision keys: ComfyUI detects WAN21_T2V (model_type t2v)."""
    a14b = wan(WAN21_T2V, "t2v", 36)
    assert conditioning_node(a14b) is WAN_IMAGE_TO_VIDEO and missing_conditioning(a14b) is None
    assert not reads_clip_vision(a14b)


@pytest.mark.parametrize("cfg", [wan(WAN21_T2V, "t2v", 16), wan(WAN21_T2V, "t2v", 48, 48)])  # 2.1 T2V, 2.2 TI2V 5B
def test_text_to_video_takes_no_node(cfg) -> None:
    assert conditioning_node(cfg) is None and missing_conditioning(cfg) is None


def test_other_extra_input_channels_are_refused() -> None:
    """A Wan with channels beside its latent that no node here builds would train on ComfyUI's zeros."""
    assert "control video" in missing_conditioning(wan(WAN21_FunControl2V, "i2v", 48))
    assert "16 input channels beside its latent" in missing_conditioning(wan(WAN21_T2V, "t2v", 32))


class VisionOutput:  # ComfyUI's clip_vision.Output: entries as attributes, read by key
    def __init__(self, **entries) -> None:
        self.__dict__.update(entries)

    def __getitem__(self, key):
        return getattr(self, key)


def test_node_entries_cached_per_item() -> None:
    """Tensors lose ComfyUI's batch of one; lists (VACE's, one per node applied) go by index; numbers become 0-dim
    tensors; a CLIP vision output keeps the one entry the models read."""
    written = {"concat_latent_image": torch.ones(1, 16, 2, 4, 4), "vace_frames": [torch.zeros(1, 32, 3, 4, 4)],
               "vace_strength": [1.5],
               "clip_vision_output": VisionOutput(penultimate_hidden_states=torch.ones(1, 17, 8),
                                                  last_hidden_state=torch.ones(1, 17, 8))}
    c = node_entries(written)
    assert sorted(c) == [NODE_PREFIX + k for k in ("clip_vision_output.penultimate_hidden_states",
                                                   "concat_latent_image", "vace_frames.0", "vace_strength.0")]
    assert c[NODE_PREFIX + "concat_latent_image"].shape == (16, 2, 4, 4)
    assert c[NODE_PREFIX + "vace_strength.0"].dim() == 0 and c[NODE_PREFIX + "vace_strength.0"].item() == 1.5


def test_node_kwargs_as_the_node_wrote_them() -> None:
    entries = node_entries({"concat_mask": torch.zeros(1, 1, 2, 4, 4), "vace_mask": [torch.ones(1, 64, 3, 4, 4)] * 11,
                            "vace_strength": [1.0] * 11})
    kw = node_kwargs({**entries, "cross_attn": torch.ones(5, 8)}, "cpu")  # the caption's entries are not the node's
    assert sorted(kw) == ["concat_mask", "vace_mask", "vace_strength"]
    assert kw["concat_mask"].shape == (1, 1, 2, 4, 4)  # a batch of one again
    assert len(kw["vace_mask"]) == 11 and kw["vace_mask"][10].shape == (1, 64, 3, 4, 4)  # index order, not text order
    assert kw["vace_strength"] == [1.0] * 11


def test_an_unknown_entry_type_is_named() -> None:
    with pytest.raises(TypeError, match="model_patch"):
        node_entries({"model_patch": object()})
