"""The speed issue's table in one command: every row, ours, on this machine's GPU, as JSON lines.

Each row runs the benchmark that measures it, in its own process (so one row's memory and compile caches do not
reach the next), and prints one JSON line: {"row", "s_per_step", "peak_gib", "source", ...the benchmark's own
fields}. Every row goes through `python -m trainer` end to end (bench/flux_e2e.py, sdxl_e2e.py, sd3_e2e.py: full-size
random files on disk, the run's own metrics.jsonl, median after warm-up, peak GiB, MFU against 790 TFLOP/s); the
rows of the families' step benches (the trainer's model, network and loss code on random full-size weights, no
data loading) stay available as families sdxl_step and sd3_step, run only when asked for.

    python3 bench/speed_table.py --work /tmp/speed                     # every end-to-end row
    python3 bench/speed_table.py --only sdxl sd3                       # some families
    python3 bench/speed_table.py --rows sdxl_1024_ckpt_cuda_graph      # some rows
    python3 bench/speed_table.py --only sdxl_step sd3_step             # the step benches' rows
    python3 bench/speed_table.py --tiny                                # CPU smoke test of every row's bench
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# row -> (family, command after `python3`); {work} is the scratch folder
ROWS = {
    "flux_1024_bf16_compile": ("flux", ["flux_e2e.py", "--work", "{work}/flux", "--res", "1024", "--variants",
                                        "compile"]),
    "flux_1024_bf16_compile_half_ckpt": ("flux", ["flux_e2e.py", "--work", "{work}/flux", "--res", "1024",
                                                  "--variants", "compile_ckpt05"]),
    "flux_1024_bf16_compile_cuda_graph": ("flux", ["flux_e2e.py", "--work", "{work}/flux", "--res", "1024",
                                                   "--variants", "compile_graph"]),
    "flux_1024_fp8_compile": ("flux", ["flux_e2e.py", "--work", "{work}/flux", "--res", "1024", "--variants",
                                       "fp8_compile"]),
    "flux_1024_fp8_compile_cap24": ("flux", ["flux_e2e.py", "--work", "{work}/flux", "--res", "1024", "--cap-gib",
                                             "24", "--variants", "fp8_compile", "fp8_compile_graph"]),
    # fp8 weights, graphs, 9 of 57 blocks unchecked: the fastest with whole blocks checkpointed within 23 GiB
    "flux_1024_fp8_compile_cuda_graph_ckpt085_cap23": ("flux", ["flux_e2e.py", "--work", "{work}/flux", "--res",
                                                                "1024", "--cap-gib", "23", "--ckpt", "0.85",
                                                                "--variants", "fp8_compile_graph"]),
    # the same with the matmuls in fp8 (model.fp8_matmul, opt-in)
    "flux_1024_fp8mm_compile_cuda_graph_ckpt085_cap23": ("flux", ["flux_e2e.py", "--work", "{work}/flux", "--res",
                                                                  "1024", "--cap-gib", "23", "--ckpt", "0.85",
                                                                  "--variants", "fp8mm_compile_graph"]),
    # no block checkpointed, inductor's partitioner recomputing within train.compile_memory_budget instead: the
    # fastest steps measured within 23 GiB (0.3; at 1024² 0.15 kept 3 GiB less for 7% more time)
    "flux_1024_fp8mm_compile_cuda_graph_budget03_cap23": ("flux", ["flux_e2e.py", "--work", "{work}/flux", "--res",
                                                                   "1024", "--cap-gib", "23", "--ckpt", "0",
                                                                   "--memory-budget", "0.3", "--variants",
                                                                   "fp8_compile_graph", "fp8mm_compile_graph"]),
    "flux_512_fp8mm_compile_cuda_graph_budget03_cap23": ("flux", ["flux_e2e.py", "--work", "{work}/flux", "--res",
                                                                  "512", "--cap-gib", "23", "--ckpt", "0",
                                                                  "--memory-budget", "0.3", "--variants",
                                                                  "fp8mm_compile_graph"]),
    "flux_512_bf16_compile": ("flux", ["flux_e2e.py", "--work", "{work}/flux", "--res", "512", "--variants",
                                       "compile"]),
    "flux_512_bf16_compile_cuda_graph": ("flux", ["flux_e2e.py", "--work", "{work}/flux", "--res", "512",
                                                  "--variants", "compile_graph"]),
    # no checkpointing (bf16 at 512² fits beside the 22 GiB of weights on a card of more than 24 GB), and the
    # same with torch's foreach AdamW instead of the fused default
    "flux_512_bf16_compile_cuda_graph_ckpt0": ("flux", ["flux_e2e.py", "--work", "{work}/flux", "--res", "512",
                                                        "--ckpt", "0", "--variants", "compile_graph",
                                                        "compile_graph_foreach"]),
    "sdxl_1024_ckpt_and_none": ("sdxl", ["sdxl_e2e.py", "--work", "{work}/sdxl", "--res", "1024", "--variants",
                                         "ckpt", "none"]),
    "sdxl_1024_cuda_graph": ("sdxl", ["sdxl_e2e.py", "--work", "{work}/sdxl", "--res", "1024", "--variants",
                                      "none_graph"]),
    "sdxl_1024_ckpt_cuda_graph": ("sdxl", ["sdxl_e2e.py", "--work", "{work}/sdxl", "--res", "1024", "--variants",
                                           "ckpt_graph"]),
    "sdxl_1024_cap24": ("sdxl", ["sdxl_e2e.py", "--work", "{work}/sdxl", "--res", "1024", "--cap-gib", "24",
                                 "--variants", "ckpt", "ckpt_graph"]),
    "sd35_large_1024": ("sd3", ["sd3_e2e.py", "--work", "{work}/sd3", "--res", "1024", "--variants", "base"]),
    "sd35_large_1024_compile_graph": ("sd3", ["sd3_e2e.py", "--work", "{work}/sd3", "--res", "1024", "--variants",
                                              "compile_graph"]),
    "sd35_large_1024_cap24": ("sd3", ["sd3_e2e.py", "--work", "{work}/sd3", "--res", "1024", "--cap-gib", "24",
                                      "--variants", "base", "compile_graph"]),
    "sd35_large_1024_compile_cuda_graph_cap23": ("sd3", ["sd3_e2e.py", "--work", "{work}/sd3", "--res", "1024",
                                                         "--cap-gib", "23", "--variants", "compile_graph"]),
    "sd35_large_1024_compile_auto_cap23": ("sd3", ["sd3_e2e.py", "--work", "{work}/sd3", "--res", "1024",
                                                   "--cap-gib", "23", "--variants", "compile_auto"]),
    # the step benches' rows (the model's step alone), before the end-to-end ones
    "sdxl_1024_step_bench": ("sdxl_step", ["sdxl_step.py", "--res", "1024", "--ckpt", "1", "0"]),
    "sdxl_1024_cuda_graph_step_bench": ("sdxl_step", ["sdxl_graph_step.py", "--res", "1024", "--ckpt", "0", "1"]),
    "sd35_large_1024_step_bench": ("sd3_step", ["sd3_step.py", "--variant", "large", "--res", "1024"]),
}
# families run when neither --only nor --rows names them
ON_REQUEST = {"sdxl_step", "sd3_step"}


def run_row(row: str, work: str, tiny: bool = False) -> list[dict]:
    _, cmd = ROWS[row]
    args = [a.replace("{work}", work) for a in cmd] + (["--tiny"] if tiny else [])
    proc = subprocess.run([sys.executable, str(HERE / args[0]), *args[1:]], cwd=str(HERE), capture_output=True,
                          text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return [{"row": row, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]}]
    out = []
    for ln in lines:
        r = json.loads(ln)
        r["row"] = row
        r.setdefault("s_per_step", r.get("median_s_per_step"))
        r["source"] = args[0]
        out.append(r)
    return out


def chosen(only: list[str] | None, rows: list[str] | None) -> list[str]:
    """The rows to run, in table order: those named, those of the families named, else every end-to-end row."""
    if not only and not rows:
        return [r for r, (family, _) in ROWS.items() if family not in ON_REQUEST]
    return [r for r, (family, _) in ROWS.items() if r in (rows or []) or family in (only or [])]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/speed_table")
    ap.add_argument("--only", nargs="+", default=None, choices=sorted({f for f, _ in ROWS.values()}),
                    help="families: flux sdxl sd3 (end to end), sdxl_step sd3_step (the step benches)")
    ap.add_argument("--rows", nargs="+", default=None, choices=list(ROWS), help="rows by name")
    ap.add_argument("--tiny", action="store_true", help="every row's benchmark with --tiny: a CPU smoke test")
    a = ap.parse_args()
    for row in chosen(a.only, a.rows):
        for r in run_row(row, a.work, a.tiny):
            print(json.dumps(r), flush=True)

if __name__ == "__main__":
    main()
