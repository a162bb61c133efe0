"""Predicted s/step of the README's 24 GB recipes on an RTX 4090 and an RTX 3090, from what the H200 measured.

Nothing here runs a model: it reads the measured H200 step (bench/*_h200.log, bench/speed_table_h200.jsonl), the
FLOPs per step the benches count, and the bytes a step moves over PCIe (block swap: each swapped block loaded
twice, forward and the backward's recompute; activation offload: every block's input down and back up), and
scales them to another card:

  GPU time on the H200  = the measured step - its exposed transfers (below). For SDXL, whose eager step is bound
                          by the host (launches, Python), the CUDA-graph step is the GPU time and the eager step
                          the host's floor, which a consumer PC is taken to match.
  matmul part           = FLOPs / 790 TFLOP/s (the H200's measured bf16 rate): what cannot run faster;
  the rest              = GPU time - matmul part: attention below peak, norms, pointwise, fp8 dequantize, LoRA,
                          optimizer. Scaled two ways, which bound the prediction:
                            low:  at the card's memory-bandwidth ratio (the rest as memory-bound work)
                            high: at the card's FLOP ratio (the rest as compute at the same efficiency)
  card GPU time         = FLOPs / card rate + the rest scaled; the step = max(host floor, GPU time) + exposed
                          transfers.
  exposed transfers     = activation offload: all of it (torch's save_on_cpu copies on the compute stream:
                          nothing overlaps); block swap: a fixed cost per block load as measured on the H200
                          (Wan 14B, 26 swapped blocks, 52 loads: 18.628 s against 18.569 s without swap, 1.1 ms a
                          load), plus whatever the loads take beyond the compute of the blocks they hide under.

The same model with the H200's own numbers must give back the H200's measurements (`check` lines): exactly for
the GPU part (it is read from them), and as a prediction for the transfer part (Wan 14B with and without
activation offload, from the step without it).

    python3 bench/predict_4090.py               # JSON lines: one per recipe and card, then the checks
    python3 bench/predict_4090.py --markdown    # the README's table
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

GB = 1e9
GIB = 2**30


@dataclass(frozen=True)
class Card:
    name: str
    tflops: float  # dense bf16 with fp32 accumulation
    mem_tb_s: float  # achievable copy bandwidth (datasheet x the 0.9 the H200 reached of its 4.8)
    pcie_gb_s: float  # host <-> card, each direction
    mem_gib: float


# H200: 790 TFLOP/s and 4.3 TB/s measured (KINDS.md); its PCIe rate measured by bench/pcie_bw.py (see PCIE_H200)
PCIE_H200 = 50.0  # GB/s, PCIe 5.0 x16 as nominally sustained; bench/pcie_bw.py measures it on the device
CARDS = {
    "H200": Card("NVIDIA H200", 790.0, 4.3, PCIE_H200, 139.8),
    "RTX 4090": Card("RTX 4090", 165.0, 1.008 * 0.9, 25.0, 23.99),
    "RTX 3090": Card("RTX 3090", 71.0, 0.936 * 0.9, 25.0, 23.99),
}
SWAP_LOAD_COST_S = (18.628 - 18.569) / 52  # Wan 14B on the H200: 26 swapped blocks, loaded twice a step
CONTEXT_GIB = 0.5  # CUDA context and cuBLAS workspace beside the allocator's peak on a consumer card


@dataclass(frozen=True)
class Recipe:
    name: str
    s_h200: float  # measured s/step on the H200 (the source says which bench and run)
    tflop: float  # FLOPs per step, as the bench counts them
    peak_gib: float  # the H200's peak under the 24 GiB cap
    source: str
    swap_blocks: int = 0
    swap_block_gb: float = 0.0  # bytes of one swapped block as stored (fp8 linears)
    offload_gb: float = 0.0  # activation bytes sent to the host per step (and as many back)
    graph_s: float | None = None  # the CUDA-graph step (GPU time without launch gaps), where measured
    blocks: int = 1  # the repeated blocks, of which swap_blocks are swapped


def _wan14b_block_gb() -> float:
    d, f = 5120, 13824
    return (8 * d * d + 2 * d * f) / GB  # self + cross attention q/k/v/o, the FFN; fp8: a byte each


def _hunyuan_single_block_gb() -> float:
    d = 3072
    return 15 * d * d / GB  # linear1 (qkv + MLP in: 7d²), linear2 (5d²), modulation (3d²), fp8


def _block_inputs_gb(blocks: int, tokens: int, hidden: int) -> float:
    return blocks * tokens * hidden * 2 / GB  # bf16, batch 1


RECIPES = [
    Recipe("Flux 1024², fp8 base, compile", 0.650, 247.0, 14.6, "speed_table_h200.jsonl (python -m trainer)"),
    Recipe("Flux 1024², fp8 base, compile, cuda_graphs, 85% checkpointed", 0.520, 235.4, 21.9,
           "speed_rows_h200_2026-12-03_second.jsonl (python -m trainer, 23 GiB cap)"),
    Recipe("SD 3.5 Large 1024², checkpointing", 0.896, 105.2, 17.8,
           "speed_rows_h200_2026-12-03_second.jsonl (python -m trainer, 24 GiB cap)"),
    Recipe("SD 3.5 Large 1024², compile, cuda_graphs", 0.341, 105.2, 18.0,
           "speed_rows_h200_2026-12-03_second.jsonl (python -m trainer, 23 GiB cap)"),
    Recipe("SDXL 1024², checkpointing", 0.933, 20.87, 6.0, "speed_table_h200.jsonl; graph: sdxl_graph_step",
           graph_s=0.150),
    Recipe("SDXL 1024², no checkpointing", 0.568, 14.74, 11.9, "speed_table_h200.jsonl; graph: sdxl_graph_step",
           graph_s=0.113),
    Recipe("Wan 1.3B 832x480x81, bf16", 3.878, 1150.3, 9.9, "wan_step_h200.log"),
    Recipe("Wan 14B 832x480x81, fp8, offload, swap 26/40", 18.628, 6374.2, 17.4, "wan_step_h200.log",
           swap_blocks=26, swap_block_gb=_wan14b_block_gb(), offload_gb=_block_inputs_gb(40, 32760, 5120), blocks=40),
    Recipe("LTX-Video 13B 768x512x97, fp8", 1.451, 429.4, 16.6, "ltxv_step_h200.log"),
    Recipe("HunyuanVideo 13B 960x544x33, fp8, swap 6/60", 6.191, 1887.8, 22.7, "hunyuan_video_step_h200.log",
           swap_blocks=6, swap_block_gb=_hunyuan_single_block_gb(), blocks=60),
    Recipe("HunyuanVideo 13B 960x544x33, fp8, offload", 6.403, 1887.8, 17.2, "hunyuan_video_step_h200.log",
           offload_gb=_block_inputs_gb(60, 18360 + 128, 3072)),
    Recipe("HiDream-I1 Full 1024², fp8, offload", 2.012, 247.7, 18.4, "hidream_step_h200.log",
           offload_gb=_block_inputs_gb(48, 4096 + 3 * 128, 2560)),
    Recipe("Sana 1.6B 1024², no checkpointing, compile", 0.076, 8.9, 6.2, "sana_step_h200.log"),
    Recipe("OmniGen2 4B 1024², compile", 0.318, 106.3, 10.6, "omnigen2_step_h200.log"),
]


def transfers(r: Recipe, card: Card, gpu_s: float) -> float:
    """Seconds of a step the PCIe traffic adds on `card`, the step's GPU time being `gpu_s`."""
    offload = 2 * r.offload_gb / card.pcie_gb_s
    loads = 2 * r.swap_blocks
    swap_s = loads * r.swap_block_gb / card.pcie_gb_s
    # the loads hide under the compute of the blocks they precede: the swapped share of the blocks' time
    hide = gpu_s * r.swap_blocks / r.blocks
    return offload + loads * SWAP_LOAD_COST_S + max(0.0, swap_s - hide)


def h200_split(r: Recipe) -> tuple[float, float, float]:
    """(GPU time, matmul part, host floor) of the H200 step."""
    h = CARDS["H200"]
    if r.graph_s is not None:
        gpu, host = r.graph_s, r.s_h200
    else:
        gpu = r.s_h200
        for _ in range(20):  # the exposed transfers depend on the GPU time they hide under: a fixed point
            gpu = r.s_h200 - transfers(r, h, gpu)
        host = 0.0
    return gpu, r.tflop / h.tflops, host


def predict(r: Recipe, card: Card) -> dict:
    gpu_h, mm_h, host = h200_split(r)
    h = CARDS["H200"]
    rest = max(0.0, gpu_h - mm_h)
    mm = r.tflop / card.tflops
    low_gpu = mm + rest * h.mem_tb_s / card.mem_tb_s
    high_gpu = mm + rest * h.tflops / card.tflops
    low = max(host, low_gpu) + transfers(r, card, low_gpu)
    high = max(host, high_gpu) + transfers(r, card, high_gpu)
    fits = r.peak_gib + CONTEXT_GIB <= card.mem_gib
    return {"recipe": r.name, "card": card.name, "s_per_step": round((low + high) / 2, 3),
            "low": round(low, 3), "high": round(high, 3), "fits_24gb": fits,
            "pcie_gb_per_step": round(2 * r.offload_gb + 2 * r.swap_blocks * r.swap_block_gb, 1),
            "h200_measured": r.s_h200, "tflop": r.tflop, "source": r.source}


def checks() -> list[dict]:
    """The model with the H200's numbers, against what the H200 measured: each recipe (its GPU part is read from
    it, so these agree by construction), then the transfer part predicted from a step measured without it."""
    h = CARDS["H200"]
    out = [{"check": r.name, "predicted": predict(r, h)["s_per_step"], "measured": r.s_h200} for r in RECIPES]
    wan_off = _block_inputs_gb(40, 32760, 5120)
    hy_off = _block_inputs_gb(60, 18360 + 128, 3072)
    hd_off = _block_inputs_gb(48, 4096 + 3 * 128, 2560)
    # (name, the step measured without, its own exposed transfers, the step measured with, the recipe with)
    pairs = [
        ("Wan 14B fp8 + offload, from fp8 alone (17.973)", 17.973, 0.0, 18.569,
         Recipe("", 0, 6374.2, 0, "", offload_gb=wan_off)),
        ("Wan 14B fp8 + offload + swap 26, from fp8 alone (17.973)", 17.973, 0.0, 18.628,
         Recipe("", 0, 6374.2, 0, "", swap_blocks=26, swap_block_gb=_wan14b_block_gb(), offload_gb=wan_off,
                blocks=40)),
        ("HunyuanVideo fp8 + offload, from fp8 + swap 6 (6.191)", 6.191, 12 * SWAP_LOAD_COST_S, 6.403,
         Recipe("", 0, 1887.8, 0, "", offload_gb=hy_off)),
        ("HiDream fp8 + offload, from fp8 alone (2.147)", 2.147, 0.0, 2.012,
         Recipe("", 0, 247.7, 0, "", offload_gb=hd_off)),
    ]
    for name, without, own, measured, r in pairs:
        gpu = without - own
        out.append({"check": name, "predicted": round(gpu + transfers(r, h, gpu), 3), "measured": measured})
    return out


def markdown() -> str:
    rows = ["| recipe | H200 measured | H200 from the model | RTX 4090 predicted | RTX 3090 predicted | PCIe GB/step |",
            "| --- | --- | --- | --- | --- | --- |"]
    for r in RECIPES:
        p = {c: predict(r, CARDS[c]) for c in CARDS}

        def cell(c: str) -> str:
            q = p[c]
            rng = f" ({q['low']:.2f}–{q['high']:.2f})" if q["high"] - q["low"] > 0.05 * q["s_per_step"] else ""
            tight = "" if q["fits_24gb"] else ", tight: peak + context near 24 GB"
            return f"{q['s_per_step']:.2f}{rng}{tight}"

        rows.append(f"| {r.name} | {r.s_h200:.3f} | {p['H200']['s_per_step']:.3f} | {cell('RTX 4090')} |"
                    f" {cell('RTX 3090')} | {p['H200']['pcie_gb_per_step']:.0f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    if a.markdown:
        print(markdown())
        return
    for r in RECIPES:
        for c in ("RTX 4090", "RTX 3090"):
            print(json.dumps(predict(r, CARDS[c])))
    for c in checks():
        print(json.dumps(c))


if __name__ == "__main__":
    main()
