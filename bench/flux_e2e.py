"""End-to-end benchmark through `python -m trainer`: full-size random FLUX.1-dev files on disk, a job at
1024², and the trainer's own metrics.jsonl. Reports median s/step after warm-up, peak GiB and MFU per variant
(bench/e2e_run.py: the job, the run, the JSON line; FLOPs counted on the meta device).

The transformer's 11.9B weights are drawn in bf16 on the card (e2e_run.random_state) and written in the original
single-file layout; CLIP-L (768) and T5-XXL (4096) at their real widths, one layer each (--t5-layers for more).

    python3 bench/flux_e2e.py --work /tmp/e2e --steps 30 [--variants base compile ckpt0 compile_ckpt0]
    python3 bench/flux_e2e.py --tiny          # CPU smoke test: tiny files, 3 steps (cuda_graphs variants skipped)
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import e2e_run

VARIANTS = {
    "base": {},
    "compile": {"compile": True},
    "ckpt0": {"gradient_checkpointing": False},
    "compile_ckpt0": {"compile": True, "gradient_checkpointing": False},
    # train.cudnn_attention: unset (the variants above) runs the attention self-test; these force it
    "compile_cudnn_off": {"compile": True, "cudnn_attention": False},
    "compile_cudnn_on": {"compile": True, "cudnn_attention": True},
    "compile_ckpt05": {"compile": True, "gradient_checkpointing": 0.5},
    # model.quantize: block linears in fp8 (the 24 GB recipe)
    "fp8": {"model": {"quantize": True}},
    "fp8_compile": {"compile": True, "model": {"quantize": True}},
    "fp8_compile_ckpt05": {"compile": True, "gradient_checkpointing": 0.5, "model": {"quantize": True}},
    "fp8_compile_ckpt025": {"compile": True, "gradient_checkpointing": 0.25, "model": {"quantize": True}},
    # model.fp8_matmul: the same fp8 weights, their matmuls in fp8 (torch._scaled_mm); loss curves: bench/fp8_curve.py
    "fp8mm": {"model": {"quantize": True, "fp8_matmul": True}},
    "fp8mm_compile": {"compile": True, "model": {"quantize": True, "fp8_matmul": True}},
    # train.cuda_graphs: each step's forward and backward replayed from a CUDA graph per bucket shape
    "compile_graph": {"compile": True, "cuda_graphs": True},
    # AdamW with torch's foreach kernels, not the trainer's fused default on the card (the A/B of that default)
    "compile_graph_foreach": {"compile": True, "cuda_graphs": True, "optimizer_params": {"foreach": True}},
    "compile_ckpt0_graph": {"compile": True, "gradient_checkpointing": False, "cuda_graphs": True},
    "fp8_compile_graph": {"compile": True, "cuda_graphs": True, "model": {"quantize": True}},
    "fp8_compile_ckpt05_graph": {"compile": True, "gradient_checkpointing": 0.5, "cuda_graphs": True,
                                 "model": {"quantize": True}},
    "fp8mm_compile_graph": {"compile": True, "cuda_graphs": True, "model": {"quantize": True, "fp8_matmul": True}},
    # train.gradient_checkpointing auto: the blocks the card (or --cap-gib) has room for left unchecked
    # (not beside cuda_graphs: the trainer refuses the two together)
    "compile_auto": {"compile": True, "gradient_checkpointing": "auto"},
    "fp8_compile_auto": {"compile": True, "gradient_checkpointing": "auto", "model": {"quantize": True}},
    # the eager step with cuDNN attention forced off (bench/flux_eager_cudnn_h200.jsonl)
    "fp8_cudnn_off": {"cudnn_attention": False, "model": {"quantize": True}},
}
# transformer (hidden, head dim, double, single blocks), CLIP-L width (the pooled input), T5 width (the context),
# VAE widths and layers, T5 tokens
SIZES = {
    "real": dict(hidden=3072, head_dim=128, double=19, single=38, clip=768, t5=4096, vae=([128, 256, 512, 512], 2),
                 t5_tokens=512),
    "tiny": dict(hidden=128, head_dim=32, double=2, single=2, clip=32, t5=64, vae=([32, 32, 32, 32], 1),
                 t5_tokens=16),
}


def flux_cfg(size: dict) -> dict:
    from trainer.demo import flux as demo_flux

    return demo_flux.flux_diffusers_config(hidden=size["hidden"], head_dim=size["head_dim"], double=size["double"],
                                           single=size["single"], context_dim=size["t5"], pooled_dim=size["clip"],
                                           guidance=True)


def build_files(folder: Path, t5_layers: int = 1, size: dict = SIZES["real"], res: int = 1024) -> dict:
    from diffusers import FluxTransformer2DModel

    from trainer.demo import make_dataset
    from trainer.demo import tiny
    from trainer.fileio import save_safetensors_atomic
    from trainer.models.flux_layout import diffusers_to_original

    tiny_size = size is SIZES["tiny"]
    dtype = torch.float32 if tiny_size else torch.bfloat16
    folder.mkdir(parents=True, exist_ok=True)
    flux = folder / "flux1-dev-random.safetensors"
    if not flux.exists():
        t0 = time.time()
        cfg = flux_cfg(size)
        sd = e2e_run.random_state(tiny.module_shapes(FluxTransformer2DModel, cfg), dtype, seed=4)
        params = sum(v.numel() for v in sd.values()) / 1e9
        save_safetensors_atomic(diffusers_to_original(sd, cfg), flux)
        del sd
        ct = tiny.build_tokenizer(folder / "tok_clip", "clip")
        tiny.build_tokenizer(folder / "tok_t5", "t5")
        # real widths where the transformer reads them (768 pooled, 4096 context), one layer each
        tiny.make_clip_file(folder / "clip_l.safetensors", len(ct), hidden=size["clip"], layers=1, dtype=dtype)
        widths, layers = size["vae"]
        tiny.make_vae_file(folder / "ae.safetensors", widths, layers=layers, latent=16, dtype=dtype)
        make_dataset(folder / "data", n=4, size=(res, res) if tiny_size else (1024, 1024))
        print(f"# files written in {time.time() - t0:.0f}s (transformer {params:.2f}B parameters drawn on"
              f" {e2e_run.build_device().type})", flush=True)
    # T5 at real width; --t5-layers 24 is T5-XXL's full depth (9.5 GB in bf16), to see the load-time peak
    t5 = folder / f"t5_{t5_layers}l.safetensors"
    if not t5.exists():
        tt = tiny.build_tokenizer(folder / "tok_t5", "t5")
        d = size["t5"]
        kw = dict(d_model=d) if tiny_size else dict(d_model=d, heads=64, d_kv=64, d_ff=10240)
        tiny.make_t5_file(t5, len(tt), layers=t5_layers, dtype=dtype, **kw)
    return {"arch": "flux", "name_or_path": str(flux),
            "text_encoder_paths": [str(folder / "clip_l.safetensors"), str(t5)],
            "vae_path": str(folder / "ae.safetensors"),
            "tokenizer_paths": [str(folder / "tok_clip"), str(folder / "tok_t5")], "t5_max_length": size["t5_tokens"]}


def count_flops(size: dict, res: int, ckpt: float) -> float:
    """FLOPs of one LoRA step at res² (the T5 tokens padded to t5_max_length), counted on the meta device."""
    from diffusers import FluxTransformer2DModel

    from trainer.models.flux import FluxModel

    transformer = e2e_run.meta_module(FluxTransformer2DModel, flux_cfg(size), torch.bfloat16)
    model = FluxModel(transformer, e2e_run.VAE_8X, None, None, None, None, size["t5_tokens"], torch.device("meta"),
                      torch.bfloat16)
    cond = {"t5": torch.zeros(1, size["t5_tokens"], size["t5"]), "pooled": torch.zeros(1, size["clip"])}
    return e2e_run.step_flops(model, (1, 16, res // 8, res // 8), cond, ckpt)


def main() -> None:
    def size(a) -> dict:
        return SIZES["tiny" if a.tiny else "real"]

    e2e_run.bench_main("flux", VARIANTS, lambda folder, a: build_files(folder, a.t5_layers, size(a), a.res),
                       lambda a, ckpt: count_flops(size(a), a.res, ckpt),
                       lambda a, v: f"e2e_{v}_{a.res}_t5x{a.t5_layers}",
                       more_args=lambda ap: ap.add_argument("--t5-layers", type=int, default=1),
                       fields=lambda a: {"t5_layers": a.t5_layers})


if __name__ == "__main__":
    main()
