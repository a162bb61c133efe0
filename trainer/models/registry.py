"""The registry of families, keyed by `model.arch`: the one piece of global state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from ..config import ModelConfig
    from .base import TrainingModel


@dataclass(frozen=True)
class Family:
    arch: str
    description: str
    load: Callable[["ModelConfig", str, "object"], "TrainingModel"]  # (model_cfg, device, dtype)
    # writes a small random model of this family into a folder; returns model-config overrides
    make_demo: Callable[..., dict] | None = None
    # train.train_text_encoder: the family's models give text-encoder targets (TrainingModel.text_encoder_targets)
    text_encoder_training: bool = False


_FAMILIES: dict[str, Family] = {}


def register(family: Family, aliases: tuple[str, ...] = ()) -> Family:
    for name in (family.arch, *aliases):
        _FAMILIES[name] = family
    return family


def _from_comfyui(*_args, **_kwargs):
    from ..errors import ConfigError

    raise ConfigError(
        "model.arch comfy: this model comes from ComfyUI's own loaders; train it with the EriDiffusion nodes,"
        " or give the family (e.g. flux) and the model files to train it headless"
    )


def _ensure_loaded() -> None:
    # importing the family modules registers them
    from . import flux  # noqa: F401
    from . import sdxl  # noqa: F401
    from . import chroma  # noqa: F401
    from . import flex2  # noqa: F401
    from . import sd3  # noqa: F401

    if "comfy" not in _FAMILIES:
        register(Family("comfy", "any model loaded by ComfyUI's loaders (nodes only)", _from_comfyui))


def known_arches() -> list[str]:
    _ensure_loaded()
    return sorted(_FAMILIES)


def get_family(arch: str) -> Family:
    _ensure_loaded()
    try:
        return _FAMILIES[arch]
    except KeyError:
        from ..errors import ConfigError

        raise ConfigError(f"unknown arch {arch!r}; known: {', '.join(known_arches())}") from None
