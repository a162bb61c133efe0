"""One rank of tests/test_fsdp.py's family check, started by torchrun (gloo, two CPU ranks).

For each job given (a family's demo model and data): the trainer is built as one process builds it, one micro-batch's
loss and LoRA gradients are taken on the whole model, then the denoiser is sharded over the two ranks
(train/sharding.py) and the same micro-batch is run again, with and without grad. Both ranks take the same batch, so
each rank's sharded run must give the whole model's numbers by itself. One JSON line per job into OUT/rank<r>.jsonl.

usage: fsdp_rank.py OUT job.yaml [job.yaml ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from launch_helpers import rel
from trainer.config import load_job_dict
from trainer.job import build_trainer
from trainer.train.sharding import shard_denoiser


def run(trainer, inputs: tuple, n: int) -> tuple[float, list[torch.Tensor], float]:
    torch.manual_seed(3)
    loss = float(trainer.forward_backward((*inputs, n, 1)))
    # a parameter no item reaches keeps no gradient (as zeros here; the sharded run must leave the same ones)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in trainer.params]
    trainer.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():  # the previews' forward
        torch.manual_seed(3)
        value = float(trainer.loss_of(*inputs, n))
    return loss, grads, value


def main() -> None:
    out, paths = Path(sys.argv[1]), sys.argv[2:]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    with (out / f"rank{rank}.jsonl").open("w") as log:
        for path in paths:
            d = yaml.safe_load(Path(path).read_text())
            proc = d["config"]["process"][0]
            proc["training_folder"] = str(out / f"rank{rank}" / Path(path).stem)  # each rank its own run folder
            job = load_job_dict(d)
            trainer = build_trainer(job, report=lambda _m: None)
            trainer.network.train()
            trainer.model.set_train_hooks(True)
            inputs = trainer.batch_inputs(0, torch.Generator().manual_seed(1))
            n = len(trainer.plan.batch(0))
            loss, grads, value = run(trainer, inputs, n)
            said: list[str] = []
            local, total = shard_denoiser(trainer.model, torch.device("cpu"), said.append)
            s_loss, s_grads, s_value = run(trainer, inputs, n)
            log.write(json.dumps({
                "job": Path(path).stem, "arch": job.arch, "network": job.process.network.type,
                "loss": loss, "sharded_loss": s_loss, "value": value, "sharded_value": s_value,
                "grad_rel": rel(dict(enumerate(s_grads)), dict(enumerate(grads))),
                "grad_norm": float(torch.cat([g.flatten() for g in grads]).norm()),
                "local_bytes": local, "total_bytes": total, "report": said,
            }) + "\n")
            log.flush()
            dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
