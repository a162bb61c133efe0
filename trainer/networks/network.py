"""A set of adapters over a model's targets: selection, injection by forward hooks, ComfyUI-keyed files."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, UserError
from ..models.base import Target
from .base import conv_params, read_weight
from .dora import DoRAAdapter
from .loha import LoHaAdapter
from .lokr import LoKrAdapter
from .lora import LoRAAdapter

NETWORK_TYPES = ("lora", "locon", "lokr", "loha", "dora")


def select_targets(targets: list[Target], only_if_contains: list[str], ignore_if_contains: list[str]) -> list[Target]:
    """Targets whose ComfyUI key or backend names contain any `only` string and no `ignore` string. Opt-in targets
    (Target.opt_in) are left out unless an `only` string names them."""

    def names(t: Target) -> list[str]:
        return [t.key, *t.aliases]

    out = []
    for t in targets:
        ns = names(t)
        if t.opt_in and not only_if_contains:
            continue
        if only_if_contains and not any(s in n for s in only_if_contains for n in ns):
            continue
        if ignore_if_contains and any(s in n for s in ignore_if_contains for n in ns):
            continue
        out.append(t)
    return out


def _module_key(key: str) -> str:
    return key.replace(".", "__")  # ModuleDict keys cannot hold dots


def _fused_weight(target: Target):
    def read() -> torch.Tensor:
        return torch.cat([read_weight(m.module) for m in target.members], dim=0)

    return read


def make_adapter(t: Target, type_name: str, rank: int, alpha: float, dropout: float, factor: int = -1,
                 full_rank: bool = False) -> nn.Module:
    """The adapter of `type_name` for one target (a conv target gets the conv form of the type)."""
    conv = conv_params(t.members[0].module) if t.kind == "conv" else None
    kernel = tuple(t.members[0].module.kernel_size) if conv is not None else None
    if type_name in ("lora", "locon"):
        return LoRAAdapter(t.in_features, t.out_features, rank, alpha, dropout, kernel, conv)
    if type_name == "loha":
        return LoHaAdapter(t.in_features, t.out_features, rank, alpha, dropout, kernel, conv)
    if type_name == "lokr":
        return LoKrAdapter(t.in_features, t.out_features, rank, alpha, dropout, kernel, conv, factor, full_rank)
    if type_name == "dora":
        if conv is not None:
            raise ConfigError("network.type dora: conv layers are not supported yet; leave network.conv unset")
        return DoRAAdapter(t.in_features, t.out_features, rank, alpha, dropout, _fused_weight(t))
    raise ConfigError(f"network.type: unknown type {type_name!r}; known: {', '.join(NETWORK_TYPES)}")


class Network(nn.Module):
    def __init__(self, targets: list[Target], type_name: str, rank: int, alpha: float, dropout: float = 0.0,
                 conv_rank: int | None = None, conv_alpha: float | None = None, factor: int = -1,
                 full_rank: bool = False) -> None:
        super().__init__()
        # conv layers are adapted only when a conv rank is given (LoCon defaults it to the linear rank)
        if type_name == "locon" and conv_rank is None:
            conv_rank = rank
        targets = [t for t in targets if t.kind != "conv" or conv_rank]
        if not targets:
            raise UserError("network: no layers match the target filters (network_kwargs.only_if_contains / ignore_if_contains)")
        self.type_name = type_name
        self.rank, self.alpha = rank, alpha
        self.targets = {t.key: t for t in targets}
        adapters = {}
        for t in targets:
            r, a = (conv_rank, conv_alpha if conv_alpha is not None else conv_rank) if t.kind == "conv" else (rank, alpha)
            adapters[_module_key(t.key)] = make_adapter(t, type_name, r, a, dropout, factor, full_rank)
        self.adapters = nn.ModuleDict(adapters)
        self._handles: list = []

    def adapter(self, key: str) -> nn.Module:
        return self.adapters[_module_key(key)]

    @property
    def trains_text_encoders(self) -> bool:
        """Some targets sit in a text encoder: captions must be encoded with grad, and anew for previews."""
        return any(t.component == "text_encoder" for t in self.targets.values())

    def param_groups(self, lr: float, text_encoder_lr: float | None = None) -> list[dict]:
        """Optimizer groups: the denoiser's adapters at `lr`, the text encoders' at `text_encoder_lr` (default lr)."""
        groups: dict[str, list[nn.Parameter]] = {}
        for key, t in self.targets.items():
            groups.setdefault(t.component, []).extend(p for p in self.adapter(key).parameters() if p.requires_grad)
        lrs = {"text_encoder": lr if text_encoder_lr is None else text_encoder_lr}
        return [{"params": ps, "lr": lrs.get(c, lr), "name": c} for c, ps in groups.items() if ps]

    # --- injection -----------------------------------------------------------------------------
    def attach(self) -> "Network":
        self.detach()
        for key, t in self.targets.items():
            ad = self.adapter(key)
            for m in t.members:
                if isinstance(ad, DoRAAdapter):
                    self._handles.append(m.module.register_forward_pre_hook(_make_scale_hook(ad)))
                self._handles.append(m.module.register_forward_hook(_make_hook(ad, m.rows)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # --- files ---------------------------------------------------------------------------------
    def export(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for key in self.targets:
            for suffix, t in self.adapter(key).export().items():
                t = t.detach().cpu()
                if dtype is not None and t.is_floating_point() and suffix != "alpha":
                    t = t.to(dtype)
                out[f"{key}.{suffix}"] = t.contiguous()
        return out

    def import_(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Load ComfyUI-keyed tensors; every target must be present, unknown keys are an error."""
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        unknown = []
        for name, t in tensors.items():
            key = next((k for k in self.targets if name.startswith(k + ".")), None)
            if key is None:
                unknown.append(name)
                continue
            grouped.setdefault(key, {})[name[len(key) + 1:]] = t
        if unknown:
            hint = (" (text-encoder weights: set train.train_text_encoder: true to load them)"
                    if unknown[0].startswith("lora_te") and not self.trains_text_encoders else "")
            raise UserError(f"{source}: {len(unknown)} tensors match no layer of this network (e.g. {unknown[0]}){hint}")
        missing = [k for k in self.targets if k not in grouped]
        if missing:
            raise UserError(f"{source}: no weights for {len(missing)} layers of this network (e.g. {missing[0]})")
        for key, ts in grouped.items():
            try:
                self.adapter(key).import_(ts, f"{source}: {key}")
            except (KeyError, ValueError) as e:
                raise UserError(str(e)) from None


def _make_hook(adapter: nn.Module, rows: slice):
    def hook(module, args, output):
        return output + adapter.delta(args[0], rows)

    return hook


def _make_scale_hook(adapter: DoRAAdapter):
    def pre_hook(module, args):
        x = args[0]
        return (x * adapter.input_scale().to(x.dtype), *args[1:])

    return pre_hook


def build_network(model_targets: list[Target], net_cfg) -> Network:
    if net_cfg.dropout and net_cfg.type in ("loha", "lokr"):
        import logging

        logging.getLogger("trainer").warning("network.dropout is not applied to %s; ignored", net_cfg.type)
    targets = select_targets(model_targets, net_cfg.only_if_contains, net_cfg.ignore_if_contains)
    return Network(targets, net_cfg.type, net_cfg.linear, net_cfg.alpha, net_cfg.dropout,
                   conv_rank=net_cfg.conv, conv_alpha=net_cfg.conv_alpha, factor=net_cfg.lokr_factor,
                   full_rank=net_cfg.lokr_full_rank)


def read_network_file(path: Path) -> dict[str, torch.Tensor]:
    from ..models.files import load_state_dict

    return load_state_dict(path)
