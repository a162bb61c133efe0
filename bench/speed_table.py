"""The speed issue's table in one command: every row, ours, on this machine's GPU, as JSON lines.

Each row runs the benchmark that measures it, in its own process (so one row's memory and compile caches do not
reach the next), and prints one JSON line: {"row", "s_per_step", "peak_gib", "source", ...the benchmark's own
fields}. Flux rows go through `python -m trainer` end to end (bench/flux_e2e.py: full-size random files on disk,
median after warm-up); SDXL and SD 3.5 through the step benchmarks (the trainer's model, network and loss code on
random full-size weights). Peak memory is each benchmark's own torch.cuda.max_memory_allocated.

    python3 bench/speed_table.py --work /tmp/speed                     # every row
    python3 bench/speed_table.py --only sdxl sd3                       # some families
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
    "flux_1024_fp8_compile": ("flux", ["flux_e2e.py", "--work", "{work}/flux", "--res", "1024", "--variants",
                                       "fp8_compile"]),
    "flux_512_bf16_compile": ("flux", ["flux_e2e.py", "--work", "{work}/flux", "--res", "512", "--variants",
                                       "compile"]),
    "sdxl_1024_ckpt_and_none": ("sdxl", ["sdxl_step.py", "--res", "1024", "--ckpt", "1", "0"]),
    "sdxl_1024_cuda_graph": ("sdxl", ["sdxl_graph_step.py", "--res", "1024", "--ckpt", "0", "1"]),
    "sd35_large_1024": ("sd3", ["sd3_step.py", "--variant", "large", "--res", "1024"]),
}


def run_row(row: str, work: str) -> list[dict]:
    _, cmd = ROWS[row]
    args = [a.replace("{work}", work) for a in cmd]
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/speed_table")
    ap.add_argument("--only", nargs="+", default=None, help="families: flux sdxl sd3")
    a = ap.parse_args()
    for row, (family, _) in ROWS.items():
        if a.only and family not in a.only:
            continue
        for r in run_row(row, a.work):
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
