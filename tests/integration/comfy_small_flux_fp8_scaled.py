"""Flux.1 on ComfyUI's MODEL from a scaled-fp8 checkpoint, as ComfyUI's own "fp8 scaled" files carry them: every
linear weight of the blocks in float8_e4m3fn with its per-tensor `scale_weight` (float32; the weight is fp8 * scale),
the `scaled_fp8` marker key, the rest (embedders, norms, final layer) in the file's bf16. Written from the `flux`
fixture (comfy_fixtures.flux_files), each scale its tensor's amax over e4m3's largest value (448), loaded as
UNETLoader loads it (weight_dtype default): ComfyUI converts the old scaled keys (convert_old_quants: `comfy_quant`,
`weight_scale`) and builds the model with its mixed-precision ops, each such layer holding a QuantizedTensor (fp8 data
and scale) that it dequantizes to the compute dtype in its forward (its fp8 matmul is off where the device lacks fp8
compute, the CPU); the other layers at ComfyUI's unet dtype (float32 on the CPU)."""

from __future__ import annotations

from pathlib import Path

import torch

from comfy_small import SmallFamily

EXPECT = {"detected": "Flux", "model_class": "Flux", "stacks": ["double_blocks", "single_blocks"],
          "text_keys": ["cross_attn", "cross_attn__shape", "pooled_output", "pooled_output__shape"],
          "fp8": {"weight_dtype": "torch.float8_e4m3fn", "scaled": True, "ops": "mixed_precision_ops.<locals>.MixedPrecisionOps.Linear"}}
VERSION = 1


def scaled_fp8_file(src: str, path: Path) -> None:
    """The bf16 Flux file at `src` as a scaled-fp8 checkpoint at `path`."""
    import comfy.utils
    from comfy_fixtures import _save

    fp8 = torch.float8_e4m3fn
    out = {}
    for k, v in comfy.utils.load_torch_file(src).items():
        if k.endswith(".weight") and v.dim() == 2 and k.startswith(("double_blocks.", "single_blocks.")):
            scale = v.float().abs().amax() / torch.finfo(fp8).max
            out[k] = (v.float() / scale).to(fp8)
            out[k[:-len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[k] = v
    out["scaled_fp8"] = torch.empty((0,), dtype=fp8)  # ComfyUI's marker (fp8: the format; 0 entries: fp8 matmul allowed)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(out, path)


def build(cache: Path, comfyui: str) -> SmallFamily:
    import comfy_fixtures
    from comfy_small_flux_fp8 import load_fp8

    files = dict(comfy_fixtures.flux_files(cache))
    scaled = cache / f"flux_v{comfy_fixtures.VERSION}" / f"unet_scaled_fp8_v{VERSION}.safetensors"
    if not scaled.exists():
        scaled_fp8_file(files["unet"], scaled)
    reference = files["unet"]
    files["unet"] = str(scaled)
    patcher, clip, vae = load_fp8(files, None)
    return SmallFamily(patcher, clip, vae, latent_shape=(1, 16, 8, 8), reference_file=reference)
