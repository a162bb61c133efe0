"""Load a diffusers transformer from the original single-file layout or a local diffusers folder.

Shared by the Flux-layout families: each gives its diffusers class, its detected family name, and the
two functions of its layout table (config from shapes, original -> diffusers state dict).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..errors import ModelFileError
from .detect import require_family
from .files import diffusers_component, load_state_dict, safetensors_shapes
from .flux_layout import ORIGINAL_PREFIXES


def load_transformer(
    path: Path,
    dtype: torch.dtype,
    arch: str,
    cls,
    family: str,
    config_from_shapes: Callable[[dict, str], dict],
    to_diffusers: Callable[[dict, dict, dict, str], dict],
    name: str,
):
    if path.is_dir():
        folder = diffusers_component(path, "transformer", name)
        return cls.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
    shapes = safetensors_shapes(path)
    require_family(path, shapes, family, arch)
    prefix = next((p for p in ORIGINAL_PREFIXES if f"{p}img_in.weight" in shapes), None)
    if prefix is None:
        raise ModelFileError(f"{path}: a {name} checkpoint without img_in (a pixel-space variant?) is not supported")
    shapes = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    cfg = config_from_shapes(shapes, str(path))
    with torch.device("meta"):
        model = cls(**cfg)
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd = to_diffusers(load_state_dict(path, dtype, prefix), model_shapes, cfg, str(path))
    missing, _ = model.load_state_dict(sd, strict=False, assign=True)
    if missing:
        raise ModelFileError(f"{path}: incomplete {name} checkpoint, missing {missing[0]}")
    return model
