"""Paths a user (or a graph) names, resolved so that they cannot leave the folder they belong to."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ConfigError

# `owner/name`: what a hub id looks like (this trainer never downloads; the loaders say so)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def plain_name(value: str, what: str, max_length: int = 200) -> str:
    """A single file or folder name: not empty, no separators, no `..`, no NUL or control characters."""
    if not isinstance(value, str):
        raise ConfigError(f"{what}: expected a name, got {value!r}")
    name = value.strip()
    if not name:
        raise ConfigError(f"{what}: is empty")
    bad = next((c for c in name if ord(c) < 32 or c in "/\\"), None)
    if bad is not None or name in (".", ".."):
        shown = repr(bad) if bad is not None else repr(name)
        raise ConfigError(f"{what}: {value!r} must be a plain name ({shown} is not allowed)")
    if len(name) > max_length:
        raise ConfigError(f"{what}: {len(name)} characters; at most {max_length}")
    return name


def contained(root: str | os.PathLike, relative: str, what: str) -> Path:
    """`root/relative`, refused unless it stays inside `root` after `..` and links are resolved.

    `relative` may hold sub-folders (`styles/2026`); absolute paths, `..` parts, NUL and control characters are
    refused with a message naming `what`."""
    if not isinstance(relative, str):
        raise ConfigError(f"{what}: expected a relative path, got {relative!r}")
    text = relative.strip().replace("\\", "/")
    if any(ord(c) < 32 for c in text):
        raise ConfigError(f"{what}: {relative!r} holds a control character")
    if text.startswith("/") or (len(text) > 1 and text[1] == ":") or Path(text).is_absolute():
        raise ConfigError(f"{what}: {relative!r} is an absolute path; give a path inside {root}")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ConfigError(f"{what}: {relative!r} leaves {root} ('..' is not allowed)")
    base = Path(root).resolve()
    target = base.joinpath(*parts).resolve() if parts else base
    if os.path.commonpath([str(base), str(target)]) != str(base):
        raise ConfigError(f"{what}: {relative!r} resolves outside {root} (through a link)")
    return target


def contained_file(root: str | os.PathLike, folder: str, filename: str, suffixes: tuple[str, ...], what: str) -> Path:
    """A file `filename` (given one of `suffixes`, the first added when it has none) in sub-folder `folder`
    of `root`, contained as `contained` is."""
    name = plain_name(filename, f"{what} filename")
    if not name.lower().endswith(suffixes):
        name += suffixes[0]
    return contained(root, f"{folder.strip()}/{name}" if folder.strip() else name, what)


def user_cache_dir() -> Path:
    """Where this trainer keeps what it can rebuild (compiled kernels, the attention self-test's verdicts):
    $ERIDIFFUSION_CACHE, else $XDG_CACHE_HOME/eridiffusion, else ~/.cache/eridiffusion."""
    if os.environ.get("ERIDIFFUSION_CACHE"):
        return Path(os.environ["ERIDIFFUSION_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "eridiffusion"
