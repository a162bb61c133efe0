"""Local model files: path checks, safetensors headers and state dicts. Nothing is ever downloaded."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from ..errors import ModelFileError
from ..paths import HUB_ID

# Loading code below never reaches a hub; this makes libraries that could refuse to try.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")



def local_path(value: str, key: str) -> Path:
    """The path named by config key `key`, which must exist on disk."""
    p = Path(os.path.expanduser(str(value)))
    if p.exists():
        return p
    hint = ""
    if HUB_ID.match(str(value)) and not str(value).startswith((".", "/")):
        hint = (
            f" It looks like a hub id: this trainer never downloads. Point {key} at the local file or folder"
            " (e.g. ComfyUI/models/diffusion_models/flux1-dev.safetensors or a downloaded diffusers folder)."
        )
    raise ModelFileError(f"{key}: {value!r} does not exist.{hint}")


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def refuse_pickle(path: Path, key: str = "") -> None:
    """A pickle checkpoint is refused by its name, before it is opened."""
    if Path(path).suffix.lower() in PICKLE_SUFFIXES:
        raise ModelFileError(f"{key + ': ' if key else ''}{path}: a pickle checkpoint ({Path(path).suffix}), which this"
                             " trainer never loads (it can run code); use the .safetensors file of the same model")


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a .safetensors header, without reading the weights."""
    refuse_pickle(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("file too short")
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000:
                raise ValueError("header too large: not a safetensors file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("its header is not a mapping")
        out = {}
        for k, v in header.items():
            if k == "__metadata__":
                continue
            if not isinstance(v, dict) or not isinstance(v.get("shape"), list) or "dtype" not in v:
                raise ValueError(f"entry {k!r} has no shape and dtype")
            out[k] = tuple(int(d) for d in v["shape"])
    except (OSError, ValueError, TypeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: not a readable .safetensors file ({e})") from None
    return out


def safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_state_dict(path: Path, dtype: torch.dtype | None = None, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file (keys under `prefix`, with the prefix removed)."""
    from safetensors import safe_open

    out = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                if not k.startswith(prefix):
                    continue
                t = f.get_tensor(k)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                out[k[len(prefix):]] = t
    except Exception as e:  # safetensors raises its own error types
        raise ModelFileError(f"{path}: cannot read tensors ({e})") from None
    return out


def strip_known_prefix(shapes: dict[str, tuple[int, ...]], prefixes: tuple[str, ...]) -> str:
    """The first of `prefixes` that all (or most) keys start with, else ''."""
    for p in prefixes:
        if p and sum(k.startswith(p) for k in shapes) > len(shapes) // 2:
            return p
    return ""


def find_weights_file(folder: Path) -> list[Path]:
    """Safetensors files of a diffusers component folder (single or sharded)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFileError(f"{folder}: no .safetensors weights in this folder")
    return files


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").exists()


def comfyui_roots(*near: Path) -> list[Path]:
    """ComfyUI installs to take tokenizers from: COMFYUI_PATH, the install this pack sits in, and any
    install that holds the given model files."""
    seen: list[Path] = []
    candidates: list[Path] = []
    env = os.environ.get("COMFYUI_PATH")
    if env:
        candidates.append(Path(env))
    here = Path(__file__).resolve()
    candidates.extend(here.parents)
    for p in near:
        try:
            candidates.extend(Path(p).resolve().parents)
        except OSError:
            continue
    for c in candidates:
        if (c / "comfy").is_dir() and c not in seen:
            seen.append(c)
    return seen


def diffusers_component(path: Path, sub: str, name: str) -> Path:
    """The folder holding a diffusers model's config: `path/sub` of a pipeline folder, or `path` itself."""
    folder = path / sub if (path / sub / "config.json").exists() else path
    if not (folder / "config.json").exists():
        raise ModelFileError(f"{path}: not a diffusers {name} folder (no {sub}/config.json)")
    return folder


# ComfyUI's scaled-fp8 files: a per-tensor scale beside each fp8 weight (and markers without weights)
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # ComfyUI's scaled fp8: old ("scaled_fp8" marker) and new
QUANT_EXTRAS = (".scale_input", ".input_scale", ".comfy_quant")


def dequantize_scaled_fp8(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """ComfyUI's scaled-fp8 files store weight / scale in fp8 and the scale beside it: the real weight is
    weight * scale (a per-tensor scale; other quantizations are refused by name)."""
    out = {k: v for k, v in sd.items() if k != "scaled_fp8" and not k.endswith(QUANT_EXTRAS + SCALE_SUFFIXES)}
    for k, scale in sd.items():
        suffix = next((s for s in SCALE_SUFFIXES if k.endswith(s)), None)
        if suffix is None:
            continue
        w = f"{k[:-len(suffix)]}.weight"
        if w not in out or scale.numel() != 1:
            raise ModelFileError(f"{source}: {k} is a quantization this trainer cannot read; use an fp16/bf16 or"
                                 f" per-tensor scaled-fp8 file")
        out[w] = (out[w].float() * scale.float()).to(out[w].dtype)
    return out
