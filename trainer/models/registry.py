"""The families, keyed by `model.arch`: one line each, naming the module that defines it.

The registry imports a family's module only when that family is asked for, so naming the arches (config
validation, --help, the nodes' arch list) costs nothing and family modules never import the registry.
A family module defines `FAMILIES`, a list of `Family` (one module may define several arches: Flux, Flex.1).
"""

from __future__ import annotations

import importlib

from ..errors import ConfigError
from .family import Family

# arch -> module of trainer.models that defines it
FAMILY_MODULES: dict[str, str] = {
    "flux": "flux",
    "flex1": "flux",
    "flex2": "flex2",
    "chroma": "chroma",
    "sd3": "sd3",
    "sdxl": "sdxl",
    "kolors": "kolors",
    "wan21": "wan",
    "wan21_i2v": "wan",
    "wan21_vace": "wan",
    "ltxv": "ltxv",
    "hunyuan_video": "hunyuan_video",
    "hidream": "hidream",
    "sana": "sana",
    "omnigen2": "omnigen2",
}

# old names for arches (ai-toolkit's flags map here too: is_flux, is_v3, is_xl)
ALIASES: dict[str, str] = {"sd35": "sd3", "sd3.5": "sd3", "flux1": "flux", "flux.1": "flux", "flex.2": "flex2", "wan": "wan21", "wan2.1": "wan21",
                       "wan21_t2v": "wan21", "ltx-video": "ltxv", "ltx": "ltxv",
                       "hunyuan": "hunyuan_video", "hunyuanvideo": "hunyuan_video"}


def known_arches() -> list[str]:
    return sorted(FAMILY_MODULES)


def canonical_arch(name: str) -> str | None:
    low = name.strip().lower()
    low = ALIASES.get(low, low)
    return low if low in FAMILY_MODULES else None


def get_family(arch: str) -> Family:
    name = canonical_arch(arch)
    if name is None:
        raise ConfigError(f"unknown arch {arch!r}; known: {', '.join(known_arches())}")
    module = importlib.import_module(f"{__package__}.{FAMILY_MODULES[name]}")
    for fam in module.FAMILIES:
        if fam.arch == name:
            return fam
    raise RuntimeError(f"trainer.models.{FAMILY_MODULES[name]} defines no family {name!r}")  # a registry typo
