"""The fp8 checks of comfy_check_train.py (a family whose EXPECT has "fp8": ComfyUI holds the diffusion model's
weights in fp8, as UNETLoader's weight_dtype fp8_e4m3fn or a scaled-fp8 checkpoint gives them). Runs inside
ComfyUI's python.

- `SavedUpcasts`: what autograd keeps of the layers' weights cast up from fp8 (ComfyUI's cast ops make a compute-dtype
  copy of every weight in its forward; linear saves it for the input's gradient), by wrapping the backend's pack hook:
  the bytes of such copies alive at once (peak), and how many were kept as the layer instead (the backend's _Recast).
- `StorageWatch`: the fp8 parameters' dtypes and storages before and after training, and the target weights' dtypes
  at every training forward.
- `swapped_weights`: the model's fp8 parameters replaced for a while by other values (the same upcast, or the file's
  own bf16 weights) in the compute dtype, for the gradient comparison.
- `comfy_patched_outputs`: the LoRA through ComfyUI's two ways of applying it to fp8 weights: cast time (LowVramPatch,
  the weights stay fp8: ComfyUI's partially loaded model) and merged into the fp8 weights at load (stochastic
  rounding: a fully loaded model, always so on the CPU).
"""

from __future__ import annotations

import contextlib
import weakref

import torch

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_quantized(t) -> bool:
    return any(c.__name__ == "QuantizedTensor" for c in type(t).__mro__)


def fp8_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters ComfyUI stores in fp8 (float8 tensors or its QuantizedTensor), by name."""
    return {n: p for n, p in module.named_parameters() if p.dtype in FP8 or is_quantized(p)}


def upcast(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An fp8 parameter's values in `dtype`, exactly (a QuantizedTensor dequantized: its fp8 data times its scale)."""
    return (p.dequantize() if is_quantized(p) else p.detach()).to(dtype)


class SavedUpcasts:
    """Wraps trainer.models.comfy._pack while active: the bytes of upcast fp8 weights (a float tensor of a weight's
    shape or its transpose, not fp8, not requiring grad) autograd keeps alive at once, their peak, and the saves
    kept as the layer (_Recast)."""

    def __init__(self, denoiser: torch.nn.Module, keep_layers: bool = True) -> None:
        self.shapes = set()
        for p in fp8_params(denoiser).values():
            if p.dim() >= 2:
                self.shapes |= {tuple(p.shape), tuple(p.shape[::-1])}
        self.keep_layers = keep_layers
        self.live = 0
        self.peak = 0
        self.recasts = 0
        self._alive: set[int] = set()

    def __enter__(self):
        import trainer.models.comfy as backend

        self._backend, self._orig = backend, backend._pack

        def pack(t):
            out = self._orig(t) if self.keep_layers else (t.detach().clone() if t.requires_grad else t)
            if isinstance(out, backend._Recast):
                self.recasts += 1
            elif (isinstance(out, torch.Tensor) and out.is_floating_point() and out.dtype not in FP8
                  and not t.requires_grad and tuple(out.shape) in self.shapes):
                key = out.untyped_storage().data_ptr()
                if key not in self._alive:
                    self._alive.add(key)
                    n = out.untyped_storage().nbytes()
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(out, self._free, key, n)
            return out

        backend._pack = pack
        return self

    def _free(self, key: int, n: int) -> None:
        self._alive.discard(key)
        self.live -= n

    def __exit__(self, *exc):
        self._backend._pack = self._orig
        return False


class StorageWatch:
    """The fp8 parameters before and after: dtype and storage address per name (an in-place upcast or a replaced
    parameter changes them), and, through a forward pre-hook on the denoiser, the dtypes of the target layers' weights
    at every forward while active."""

    def __init__(self, denoiser: torch.nn.Module, target_modules: list[torch.nn.Module]) -> None:
        self.denoiser = denoiser
        self.targets = target_modules
        self.before = self.snapshot()
        self.forward_dtypes: list[list[str]] = []

    def snapshot(self) -> dict[str, tuple[str, int, int]]:
        out = {}
        for n, p in fp8_params(self.denoiser).items():
            data = p._qdata if is_quantized(p) and hasattr(p, "_qdata") else p
            out[n] = (str(data.dtype), data.untyped_storage().data_ptr(), data.untyped_storage().nbytes())
        return out

    def __enter__(self):
        def seen(mod, args) -> None:
            self.forward_dtypes.append(sorted({str(getattr(m.weight, "_qdata", m.weight).dtype) for m in self.targets}))

        self._hook = self.denoiser.register_forward_pre_hook(seen)
        return self

    def __exit__(self, *exc):
        self._hook.remove()
        return False

    def report(self) -> dict:
        after = self.snapshot()
        return {"n_fp8_params": len(self.before), "fp8_bytes": sum(v[2] for v in self.before.values()),
                "stored_dtypes": sorted({v[0] for v in after.values()}),
                "storage_unchanged": after == self.before,
                "train_forward_weight_dtypes": sorted({d for f in self.forward_dtypes for d in f}),
                "n_train_forwards": len(self.forward_dtypes)}


@contextlib.contextmanager
def swapped_weights(denoiser: torch.nn.Module, values: dict[str, torch.Tensor]):
    """Each named parameter replaced by `values[name]` (frozen) while inside; the originals put back after."""
    modules = dict(denoiser.named_modules())
    saved = []
    try:
        for name, v in values.items():
            owner, _, leaf = name.rpartition(".")
            m = modules[owner]
            saved.append((m, leaf, m._parameters[leaf]))
            m._parameters[leaf] = torch.nn.Parameter(v, requires_grad=False)
        yield
    finally:
        for m, leaf, p in reversed(saved):
            m._parameters[leaf] = p


def cosine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Cosine of two gradient sets over all their entries, and max |a - b| / max |b|."""
    ka = sorted(a)
    if ka != sorted(b):
        raise RuntimeError(f"different gradients: {set(a) ^ set(b)}")
    va = torch.cat([a[k].double().reshape(-1) for k in ka])
    vb = torch.cat([b[k].double().reshape(-1) for k in ka])
    cos = float(va @ vb / (va.norm() * vb.norm()))
    return cos, float((va - vb).abs().max() / vb.abs().max())


def merge_slope(patched) -> dict:
    """ComfyUI's LoRA merged into fp8 weights at load (a fully loaded patched model: patch_weight_to_device, the sum
    in float32 rounded back to fp8 stochastically, or requantized for a scaled-fp8 layer): over every patched weight,
    the least-squares slope of the change the merge made (merged - base) on the exact change (ComfyUI's own
    calculate_weight in float32, unrounded). Stochastic rounding is unbiased, so the slope is ~1 although most single
    elements land on the base value or its fp8 neighbour."""
    import comfy.lora
    import comfy.utils

    num = den = 0.0
    changed = total = 0
    for key, backup in patched.backup.items():
        merged = comfy.utils.get_attr(patched.model, key)
        base = upcast(backup.weight, torch.float32)
        exact = comfy.lora.calculate_weight(patched.patches[key], base.clone(), key) - base
        got = upcast(merged, torch.float32) - base
        num += float((got.double() * exact.double()).sum())
        den += float((exact.double() ** 2).sum())
        changed += int((got != 0).sum())
        total += got.numel()
    return {"merge_slope": num / den, "merge_changed_fraction": changed / max(1, total), "merged_weights": len(patched.backup)}


def comfy_patched_outputs(patched, vae, out) -> dict:
    """The trained model's output through ComfyUI's patched fp8 model, both ways ComfyUI runs it: `cast_time`, every
    layer loaded as ComfyUI loads a model that does not fit (ModelPatcher.load with no memory to spare: each layer's
    LowVramPatch adds the LoRA to the weight its cast op upcast, the stored fp8 untouched), and `merged`, fully loaded
    (load_models_gpu force_full_load: the LoRA merged into the fp8 weights, stochastically rounded), with the merge's
    slope (merge_slope). `out(model)` is the check's prediction of a ComfyModel."""
    import comfy.model_management as mm
    from trainer.models.comfy import ComfyModel

    dev = mm.get_torch_device()
    with torch.inference_mode():  # as ComfyUI's nodes run (a scaled-fp8 model moved outside it cannot be read inside)
        mm.unload_all_models()
        patched.patch_model(device_to=dev, lowvram_model_memory=1, load_weights=True, force_patch_weights=False)
    n_cast_time = patched.lowvram_patch_counter()
    with torch.inference_mode(False):
        cast_time = out(ComfyModel(patched, None, vae))
    with torch.inference_mode():
        patched.unpatch_model(device_to=patched.offload_device)
    with torch.inference_mode(False):
        full = ComfyModel(patched, None, vae)
        full.ensure_loaded()
        merged = out(full)
    return {"cast_time": cast_time, "merged": merged, "n_cast_time_patches": n_cast_time, **merge_slope(patched)}
