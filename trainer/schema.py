"""A small typed-schema builder: plain dict (from YAML) -> dataclass, with errors that name the key path.

Fields are declared as dataclass fields; constraints ride in `field(metadata=...)`:
  ge / gt / le  numeric bounds        choices   allowed strings (case-insensitive)
  aliases       other accepted names  required  must be given
  help          what the key does (the nodes' tooltips)
  ignored       accepted for ai-toolkit compatibility but not used: the reason, said as a warning when given
Unknown keys are collected as warnings (errors when one edit from a known key), never silently dropped. Numbers must be finite.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Union

from .errors import ConfigError


def spec(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **meta: Any) -> Any:
    """A dataclass field with schema metadata."""
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    if default is dataclasses.MISSING:
        default = None
    return dataclasses.field(default=default, metadata=meta)


class SchemaContext:
    def __init__(self, allow_unknown_keys: bool = False) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.allow_unknown_keys = allow_unknown_keys

    def unknown(self, key: str, path: str, known: "typing.Iterable[str]") -> None:
        """An unknown key: a warning naming the closest known key, or an error when it is one edit (a typo) away
        from one (`stpes` would otherwise train the default 1000 steps), unless unknown keys are allowed."""
        where = f"{path}.{key}" if path else str(key)
        known = sorted(known)
        close = [k for k in known if edits(str(key), k) <= 1] if len(str(key)) >= 4 else []
        if close and not self.allow_unknown_keys:
            self.error(where, f"unknown key; did you mean {close[0]}? (--allow-unknown-keys to ignore it)")
            return
        near = close or difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]}?" if near else ""
        self.warnings.append(f"{where}: unknown key, ignored{hint}")

    def error(self, path: str, msg: str) -> None:
        self.errors.append(f"{path}: {msg}")

    def raise_if_errors(self) -> None:
        if self.errors:
            raise ConfigError("\n".join(self.errors))


def _describe(value: Any) -> str:
    return repr(value) if isinstance(value, str) else f"{value!r} ({type(value).__name__})"


def _to_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        # YAML 1.1 reads `1e-4` as a string; accept numeric strings.
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _convert(tp: Any, value: Any, path: str, ctx: SchemaContext) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None:
            return None
        if len(non_none) == 1:
            return _convert(non_none[0], value, path, ctx)
        for a in non_none:  # first that converts without error
            sub = SchemaContext()
            out = _convert(a, value, path, sub)
            if not sub.errors:
                return out
        ctx.error(path, f"expected one of {[getattr(a, '__name__', str(a)) for a in non_none]}, got {_describe(value)}")
        return None
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            ctx.error(path, f"expected a mapping, got {_describe(value)}")
            return None
        return build(tp, value, path, ctx)
    if origin is list:
        (item_tp,) = args or (Any,)
        if not isinstance(value, list):
            value = [value]  # a lone value where a list is expected: `resolution: 512`
        return [_convert(item_tp, v, f"{path}[{i}]", ctx) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            ctx.error(path, f"expected a mapping, got {_describe(value)}")
            return None
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "false", "no", "off"):
            return value.strip().lower() in ("true", "yes", "on")
        ctx.error(path, f"expected true or false, got {_describe(value)}")
        return None
    if tp is int:
        f = _to_float(value)
        if f is None or not math.isfinite(f) or f != int(f):
            ctx.error(path, f"expected a whole number, got {_describe(value)}")
            return None
        return int(f)
    if tp is float:
        f = _to_float(value)
        if f is None:
            ctx.error(path, f"expected a number, got {_describe(value)}")
            return None
        if not math.isfinite(f):
            ctx.error(path, f"must be a finite number, got {value!r}")
            return None
        return f
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        ctx.error(path, f"expected a string, got {_describe(value)}")
        return None
    raise TypeError(f"schema type {tp!r} not supported")  # a programming error, not a user one


def _check(meta: dict, value: Any, path: str, ctx: SchemaContext) -> Any:
    if value is None:
        return value
    if isinstance(value, list):  # bounds and choices apply to each item (resolution: [512, 1024])
        return [_check(meta, v, f"{path}[{i}]", ctx) for i, v in enumerate(value)]
    choices = meta.get("choices")
    if choices is not None and isinstance(value, str):
        low = value.lower()
        if low not in [c.lower() for c in choices]:
            ctx.error(path, f"expected one of {', '.join(choices)}, got {value!r}")
        return low
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "gt" in meta and not value > meta["gt"]:
            ctx.error(path, f"must be greater than {meta['gt']}, got {value}")
        if "ge" in meta and not value >= meta["ge"]:
            ctx.error(path, f"must be at least {meta['ge']}, got {value}")
        if "le" in meta and not value <= meta["le"]:
            ctx.error(path, f"must be at most {meta['le']}, got {value}")
    return value


def build(cls: type, data: dict, path: str, ctx: SchemaContext) -> Any:
    hints = typing.get_type_hints(cls)
    known: set[str] = set()
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        names = [f.name, *f.metadata.get("aliases", ())]
        known.update(names)
        present = [n for n in names if n in data]
        fpath = f"{path}.{f.name}" if path else f.name
        if not present:
            if f.metadata.get("required"):
                ctx.error(fpath, "is required")
            continue
        key = present[0]
        fpath = f"{path}.{key}" if path else key
        if f.metadata.get("ignored"):
            ctx.warnings.append(f"{fpath}: ignored ({f.metadata['ignored']})")
        value = _convert(hints[f.name], data[key], fpath, ctx)
        kwargs[f.name] = _check(dict(f.metadata), value, fpath, ctx)
    for key in data:
        if key not in known:
            ctx.unknown(key, path, known)
    return cls(**kwargs)


def edits(a: str, b: str) -> int:
    """Optimal-string-alignment distance: insertions, deletions, substitutions and swaps of neighbours."""
    a, b = a.lower(), b.lower()
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[-1]


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One config key as a UI shows it: its type, default, bounds, choices and help."""

    name: str
    type: Any
    default: Any
    choices: tuple[str, ...] | None
    ge: float | None
    le: float | None
    help: str


def describe(cls: type, name: str) -> FieldSpec:
    """The schema of field `name` of config dataclass `cls` (the nodes build their inputs from this)."""
    f = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if f is None:
        raise KeyError(f"{cls.__name__} has no field {name!r}")  # a programming error
    tp = typing.get_type_hints(cls)[name]
    if typing.get_origin(tp) in (Union, types.UnionType):
        non_none = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = non_none[0] if len(non_none) == 1 else tp
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    m = f.metadata
    ge = m.get("ge", m.get("gt"))
    return FieldSpec(name, tp, default, tuple(m["choices"]) if "choices" in m else None, ge, m.get("le"),
                     m.get("help", ""))
