"""Wan 2.2 A14B's low-noise expert on ComfyUI's MODEL, small (comfy_wan22_a14b.py)."""

from __future__ import annotations

from pathlib import Path

from comfy_small import SmallFamily
from comfy_wan22_a14b import build_expert, expect

EXPECT = expect("low_noise")


def build(cache: Path, comfyui: str) -> SmallFamily:
    return build_expert(cache, "low_noise")
