"""ComfyUI inputs built from the engine's widget tables (trainer/graph_parts.py): type, default, bounds,
choices and tooltip all come from the config key's own schema."""

from __future__ import annotations

from comfy_api.latest import io

from ..trainer.graph_parts import Widget

INT_MAX = 2**31 - 1


def widget_input(w: Widget, optional: bool = False, **overrides):
    s, kind = w.spec, w.kind
    kw = dict(default=w.default, tooltip=w.tooltip_text() or None, optional=optional)
    kw.update(overrides)
    if kind == "BOOLEAN":
        return io.Boolean.Input(w.name, **kw)
    if kind == "COMBO":
        return io.Combo.Input(w.name, options=w.options(), **kw)
    if kind == "INT":
        lo = 0 if w.optional else int(s.ge if s.ge is not None else -INT_MAX)
        hi = int(min(s.le, INT_MAX)) if s.le is not None else INT_MAX
        return io.Int.Input(w.name, min=lo, max=hi, **kw)
    if kind == "FLOAT":
        lo = 0.0 if w.optional else float(s.ge if s.ge is not None else -1e9)
        hi = float(s.le) if s.le is not None else 1e9
        step = 1e-6 if w.field in ("lr", "text_encoder_lr") else 0.01
        return io.Float.Input(w.name, min=lo, max=hi, step=step, **kw)
    return io.String.Input(w.name, multiline=w.text == "lines", **kw)


def widget_inputs(widgets: list[Widget], optional: bool = False) -> list:
    return [widget_input(w, optional) for w in widgets]
