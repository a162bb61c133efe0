"""Which families' training steps a CUDA graph captures (train.cuda_graphs), and whether the graphed run trains the
same LoRA as the plain one: each family's demo model (trainer/demo, tiny and random), its demo dataset, 8 steps
in fp32 with TF32 off and deterministic kernels, plain (twice: the run-to-run noise) and graphed, on this machine's GPU.

    python3 bench/cuda_graph_families.py --work /tmp/graph_families [--only sdxl flux]

One JSON line per family: {"arch", "graphs", "replays", "eager" (why a shape ran without a graph), "lora_rel"
(max relative difference of the LoRA's tensors, graphed vs plain), "plain_lora_rel" (plain vs plain),
"loss_rel_max"}. A family whose step reads
host memory inside the step shows up here with its reason, and trains eagerly (never wrongly).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import load_job_dict  # noqa: E402
from trainer.demo import DEMO_WRITERS, demo_job, make_dataset  # noqa: E402
from trainer.demo.videos import make_video_dataset  # noqa: E402
from trainer.job import build_trainer  # noqa: E402
from trainer.models import registry  # noqa: E402


def files_for(arch: str, folder: Path) -> tuple[dict, Path, Path | None, Path | None]:
    """The demo's model files and dataset (as `python -m trainer demo` writes them), written once per family."""
    family = registry.get_family(arch)
    model = DEMO_WRITERS[arch](folder / "models")
    controls = start = None
    if family.video:
        data = make_video_dataset(folder / "dataset", n=2, size=(64, 48), frames=9, fps=16)
        if family.takes_control:  # image-to-video: the clips' first frames condition
            from trainer.data.media import read_frames

            start = folder / "start_image.png"
            read_frames(data / "clip_00.mp4", [0])[0].save(start)
    else:
        controls = folder / "dataset_control" if family.takes_control else None
        data = make_dataset(folder / "dataset", n=4, controls=controls)
    return model, data, controls, start


def run(arch: str, work: Path, steps: int) -> dict:
    out = {"arch": arch}
    model, data, controls, start = files_for(arch, work / arch)
    video = registry.get_family(arch).video
    lora, losses = {}, {}
    for run_name in ("plain", "plain_again", "graph"):
        graphs = run_name == "graph"
        d = demo_job(f"{arch}_{run_name}", model, data, work / arch, steps, controls, video, start)
        p = d["config"]["process"][0]
        p["device"] = "cuda"
        p["train"].update({"dtype": "fp32", "cuda_graphs": graphs, "disable_sampling": True, "steps": steps})
        p["save"]["save_every"] = 10**6
        trainer = build_trainer(load_job_dict(d), report=lambda s: None)
        state = trainer.train()
        lora[run_name] = {k: v.detach().float().cpu() for k, v in trainer.network.state_dict().items()}
        losses[run_name] = list(state.losses)
        if graphs:
            g = trainer.graphs
            out.update(graphs=len(g.graphs), replays=g.replays, eager=sorted(set(g.eager.values())))
        del trainer
        torch.cuda.empty_cache()
    for name, other in (("lora_rel", "graph"), ("plain_lora_rel", "plain_again")):  # graphed, and run-to-run
        a, b = lora[other], lora["plain"]
        out[name] = max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) for k in b)
    out["loss_rel_max"] = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(losses["graph"], losses["plain"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/graph_families")
    ap.add_argument("--only", nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--nondeterministic", action="store_true", help="the default kernels (run-to-run noise)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    if not a.nondeterministic:  # deterministic kernels: what differs is the graph's doing, not the kernels' noise
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        torch.use_deterministic_algorithms(True, warn_only=True)
    for arch in a.only or list(DEMO_WRITERS):
        try:
            r = run(arch, Path(a.work), a.steps)
        except Exception as e:  # one family's failure is its line, the others still run
            r = {"arch": arch, "error": f"{type(e).__name__}: {str(e)[:400]}",
                 "where": traceback.format_exc().splitlines()[-3:]}
        r.update(device=torch.cuda.get_device_name(), torch=torch.__version__)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
