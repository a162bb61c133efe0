"""The nodes' widgets as config keys: one table per node says which YAML key each widget stands for, and the
widget's type, default, bounds, choices and tooltip all come from that key's own schema (config.py), so a graph
and a YAML job with the same values describe the same run, and a node left at its defaults equals a YAML job
that leaves the keys out.

Widget values map to YAML as the key's type says: an optional number of 0 and an empty string mean "unset";
lists are typed as text (`512, 768, 1024`, or one item per line); an optional choice offers "family default"
(unset: the family's own default, e.g. timestep_type).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

from .config import DatasetConfig, ModelConfig, NetworkConfig, ProcessConfig, SampleConfig, SaveConfig, TrainConfig
from .schema import FieldSpec, describe

FAMILY_DEFAULT = "family default"


@dataclass(frozen=True)
class Widget:
    name: str  # the node input's name
    cls: type  # the config dataclass that holds the key
    field: str  # its field
    path: tuple[str, ...]  # where the value goes in the node's output dict
    text: str = ""  # list fields: "ints" (comma-separated numbers), "lines" (one item per line), "csv" (commas)
    tooltip: str = ""  # more than the key's own help, where the widget needs it

    @property
    def spec(self) -> FieldSpec:
        return describe(self.cls, self.field)

    @property
    def optional(self) -> bool:
        tp = typing.get_type_hints(self.cls)[self.field]
        return type(None) in typing.get_args(tp)

    @property
    def kind(self) -> str:
        """BOOLEAN, INT, FLOAT, COMBO or STRING: what the node shows."""
        s = self.spec
        if self.text:
            return "STRING"
        if s.choices is not None:
            return "COMBO"
        if bool in typing.get_args(s.type):  # true/false or a fraction (gradient_checkpointing): the switch
            return "BOOLEAN"
        return {bool: "BOOLEAN", int: "INT", float: "FLOAT"}.get(s.type, "STRING")

    def options(self) -> list[str]:
        s = self.spec
        return ([FAMILY_DEFAULT] if self.optional else []) + list(s.choices or ())

    @property
    def default(self) -> Any:
        """The widget's value that stands for the YAML default."""
        s = self.spec
        v = s.default
        if self.text == "ints":
            return ", ".join(str(x) for x in v or [])
        if self.text in ("lines", "csv"):
            return ("\n" if self.text == "lines" else ", ").join(v or [])
        if self.kind == "COMBO":
            return FAMILY_DEFAULT if v is None else v
        if v is None:
            return {"INT": 0, "FLOAT": 0.0, "BOOLEAN": False}.get(self.kind, "")
        return v

    def to_yaml(self, value: Any) -> tuple[bool, Any]:
        """(present, YAML value) for a widget value: an unset optional is left out of the job."""
        if self.text == "ints":
            return True, [int(x) for x in str(value).replace(",", " ").split()]
        if self.text in ("lines", "csv"):
            sep = "\n" if self.text == "lines" else ","
            items = [p.strip() for p in str(value).split(sep) if p.strip()]
            return bool(items), items  # empty: the YAML's default
        if self.kind == "COMBO" and value == FAMILY_DEFAULT:
            return False, None
        if self.optional and value in (0, 0.0, "", None):
            return False, None
        if self.kind == "STRING":
            value = str(value).strip()
            if not value and self.spec.default is None:
                return False, None
        return True, value

    def tooltip_text(self) -> str:
        return " ".join(t for t in (self.spec.help, self.tooltip) if t)


def section_of(widgets: list[Widget], values: dict[str, Any]) -> dict:
    """The node's output dict (YAML sections) for its widget values."""
    out: dict = {}
    for w in widgets:
        if w.name not in values:
            continue
        present, v = w.to_yaml(values[w.name])
        if not present:
            continue
        node = out
        for p in w.path[:-1]:
            node = node.setdefault(p, {})
        node[w.path[-1]] = v
    return out


def _w(name: str, cls: type, field: str, *path: str, **kw) -> Widget:
    return Widget(name, cls, field, tuple(path) or (field,), **kw)


DATASET_WIDGETS = [
    _w("folder_path", DatasetConfig, "folder_path"),
    _w("trigger_word", ProcessConfig, "trigger_word", tooltip="the trigger word of the run ([trigger] in captions)"),
    _w("caption_ext", DatasetConfig, "caption_ext"),
    _w("default_caption", DatasetConfig, "default_caption"),
    _w("resolution", DatasetConfig, "resolution", text="ints", tooltip="e.g. 512, 768, 1024"),
    _w("caption_dropout_rate", DatasetConfig, "caption_dropout_rate"),
    _w("num_repeats", DatasetConfig, "num_repeats"),
    _w("flip_x", DatasetConfig, "flip_x"),
    _w("shuffle_tokens", DatasetConfig, "shuffle_tokens"),
    _w("keep_tokens", DatasetConfig, "keep_tokens"),
    _w("cache_latents_to_disk", DatasetConfig, "cache_latents_to_disk"),
]
DATASET_OPTIONAL_WIDGETS = [
    _w("control_path", DatasetConfig, "control_path"),
    _w("control_dropout", DatasetConfig, "control_dropout"),
    # video families (Wan): clips
    _w("num_frames", DatasetConfig, "num_frames"),
    _w("frames", DatasetConfig, "frames", text="ints", tooltip="e.g. 17, 33 (empty: num_frames)"),
    _w("shrink_video_to_frames", DatasetConfig, "shrink_video_to_frames"),
    _w("fps", DatasetConfig, "fps", tooltip="0: the model's native rate (Wan 16)"),
    _w("clips_per_video", DatasetConfig, "clips_per_video"),
    _w("do_i2v", DatasetConfig, "do_i2v"),
    _w("mask_path", DatasetConfig, "mask_path"),
    _w("reference_path", DatasetConfig, "reference_path"),
    _w("background_color", DatasetConfig, "background_color"),
]

NETWORK_WIDGETS = [
    _w("type", NetworkConfig, "type"),
    _w("rank", NetworkConfig, "linear"),
    _w("alpha", NetworkConfig, "linear_alpha", tooltip="0: = rank"),
    _w("conv_rank", NetworkConfig, "conv", tooltip="0: no conv layers (LoCon: = rank)"),
    _w("conv_alpha", NetworkConfig, "conv_alpha", tooltip="0: = conv_rank"),
    _w("lokr_factor", NetworkConfig, "lokr_factor"),
    _w("lokr_full_rank", NetworkConfig, "lokr_full_rank"),
]

SETTINGS_WIDGETS = [
    _w("lr", TrainConfig, "lr", "train", "lr"),
    _w("optimizer", TrainConfig, "optimizer", "train", "optimizer"),
    _w("lr_scheduler", TrainConfig, "lr_scheduler", "train", "lr_scheduler"),
    _w("lr_warmup_steps", TrainConfig, "lr_warmup_steps", "train", "lr_warmup_steps"),
    _w("batch_size", TrainConfig, "batch_size", "train", "batch_size"),
    _w("gradient_accumulation", TrainConfig, "gradient_accumulation", "train", "gradient_accumulation"),
    _w("timestep_type", TrainConfig, "timestep_type", "train", "timestep_type"),
    _w("dtype", TrainConfig, "dtype", "train", "dtype"),
    _w("gradient_checkpointing", TrainConfig, "gradient_checkpointing", "train", "gradient_checkpointing"),
    _w("cache_text_embeddings", TrainConfig, "cache_text_embeddings", "train", "cache_text_embeddings"),
    _w("seed", TrainConfig, "seed", "train", "seed"),
    _w("save_every", SaveConfig, "save_every", "save", "save_every"),
    _w("save_dtype", SaveConfig, "dtype", "save", "dtype"),
    _w("max_step_saves_to_keep", SaveConfig, "max_step_saves_to_keep", "save", "max_step_saves_to_keep"),
    _w("sample_every", SampleConfig, "sample_every", "sample", "sample_every"),
    _w("sample_prompts", SampleConfig, "prompts", "sample", "prompts", text="lines"),
    _w("sample_width", SampleConfig, "width", "sample", "width"),
    _w("sample_height", SampleConfig, "height", "sample", "height"),
    _w("sample_steps", SampleConfig, "sample_steps", "sample", "sample_steps"),
    _w("guidance_scale", SampleConfig, "guidance_scale", "sample", "guidance_scale"),
]
SETTINGS_OPTIONAL_WIDGETS = [
    _w("sample_num_frames", SampleConfig, "num_frames", "sample", "num_frames"),
    _w("blocks_to_swap", TrainConfig, "blocks_to_swap", "train", "blocks_to_swap", tooltip="a number, or auto"),
    _w("offload_activations", TrainConfig, "offload_activations", "train", "offload_activations"),
]

MODEL_WIDGETS = [
    _w("name_or_path", ModelConfig, "name_or_path", tooltip="diffusion model .safetensors or a diffusers folder"),
    _w("text_encoder_paths", ModelConfig, "text_encoder_paths", text="lines"),
    _w("vae_path", ModelConfig, "vae_path"),
]
MODEL_OPTIONAL_WIDGETS = [
    _w("tokenizer_paths", ModelConfig, "tokenizer_paths", text="lines"),
    _w("t5_max_length", ModelConfig, "t5_max_length", tooltip="0: the family's default (Flux dev 512, schnell 256)"),
    _w("quantize", ModelConfig, "quantize"),
    _w("clip_vision_path", ModelConfig, "clip_vision_path"),
]
# Wan 2.2 A14B's experts (each its own model file): on both model nodes
EXPERT_WIDGETS = [
    _w("expert", ModelConfig, "expert"),
    _w("expert_boundary", ModelConfig, "expert_boundary", tooltip="0: Wan 2.2's (T2V 0.875, I2V 0.9)"),
]
MODEL_OPTIONAL_WIDGETS += EXPERT_WIDGETS
# what a ComfyUI MODEL takes from its node, having no file to name: the expert it is, the node reading its captions
# with their images
HOST_MODEL_WIDGETS = EXPERT_WIDGETS + [
    _w("text_image_node", ModelConfig, "text_image_node",
       tooltip="Qwen-Image-Edit: TextEncodeQwenImageEditPlus (2509 / 2511) or TextEncodeQwenImageEdit (the first)"),
]

# widgets whose node default differs from the YAML's on purpose (the host decides): name -> why
HOST_DEFAULTS = {
    "training_folder": "empty: ComfyUI's output/eridiffusion instead of ./output",
    "name": "the YAML requires config.name; the node starts with my_lora",
}


def network_section(values: dict[str, Any]) -> dict:
    n = section_of(NETWORK_WIDGETS, values)
    kw = {}
    for key in ("only_if_contains", "ignore_if_contains"):
        parts = [p.strip() for p in str(values.get(key, "")).split(",") if p.strip()]
        if parts:
            kw[key] = parts
    if kw:
        n["network_kwargs"] = kw
    return n


def settings_section(values: dict[str, Any]) -> dict:
    s = section_of(SETTINGS_WIDGETS + SETTINGS_OPTIONAL_WIDGETS, values)
    s["name"] = str(values.get("name") or "my_lora").strip()
    folder = str(values.get("training_folder") or "").strip()
    if folder:
        s["training_folder"] = folder
    return s


def dataset_section(values: dict[str, Any]) -> dict:
    return section_of(DATASET_WIDGETS + DATASET_OPTIONAL_WIDGETS, values)


def model_section(arch: str, values: dict[str, Any]) -> dict:
    return {"arch": arch, **section_of(MODEL_WIDGETS + MODEL_OPTIONAL_WIDGETS, values)}


def host_model_keys(values: dict[str, Any]) -> dict:
    """The model keys a ComfyUI MODEL still takes from its node (it has no file to name): HOST_MODEL_WIDGETS."""
    return section_of(HOST_MODEL_WIDGETS, values)
