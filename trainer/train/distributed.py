"""Data-parallel training over several processes: `torchrun --nproc_per_node N -m trainer job.yaml`.

One job: the ranks of a launch (torchrun and accelerate set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
as one process group (nccl on CUDA, each rank on cuda:LOCAL_RANK; gloo on the CPU), and what the loop and the CLI
need from it: this rank's share of a global batch, the ranks' gradients summed after backward, the main rank's
work (saves, previews, the run folder) with the others waiting for it, and every rank told when another one fails.

Why not torch's DistributedDataParallel: it wraps the module that runs forward and syncs the grads of that module's
own parameters. Here the trained parameters are the network's, hooked beside a frozen base model (networks/), and
the base moves (block swap, compile) under them; summing the network's gradients directly, in one flat bucket per
step, is simpler and exact. A LoRA's gradients are small: one all_reduce of a few MB a step.

Waits for the main rank (caches, saves, previews: minutes for a video preview) go through the launch's key-value
store and watch the other ranks, so they need no timeout; collectives (a step's all_reduce) have
`train.distributed_timeout`. A rank that fails records its message in the store before it exits; the others stop
with it (a collective with a departed rank fails at once on gloo; the launcher ends the rest on any backend).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable, NoReturn, TypeVar

import torch

from ..config import JobConfig
from ..errors import ConfigError, UserError

T = TypeVar("T")
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
POLL_S = 0.1  # how often a waiting rank looks at the store
LINGER_S = 5.0  # how long a failed rank that hosts the store stays for the others to read its message


class RankLost(RuntimeError):
    """Another rank failed or went away: this rank stops too (the main rank keeps what it trained). Not a UserError,
    so the loop saves on it as on an interrupt."""


def launched_world() -> int:
    """WORLD_SIZE of a torchrun / accelerate launch; 1 in a plain process."""
    return _env_int("WORLD_SIZE", "1")


def _env_int(name: str, default: str | None = None) -> int:
    raw = (os.environ.get(name) or default or "").strip()
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"{name}={raw!r} in the environment (set by the launcher) is not a whole number") from None


def require_single_process(what: str) -> None:
    """Hosts that train in one process (the ComfyUI nodes' sessions, the demo) refuse a multi-process launch."""
    world = launched_world()
    if world > 1:
        raise UserError(f"{what} trains in one process, but WORLD_SIZE is {world} (a torchrun / accelerate launch);"
                        " train on several GPUs with `torchrun --nproc_per_node N -m trainer job.yaml` (a YAML job:"
                        " the nodes' Export Training Job writes one), or start this without the launcher")


def start(job: JobConfig, device: torch.device) -> "Distributed | None":
    """The process group of this launch, or None for one process (train.distributed: auto without a launch).
    `device`: the job's device (job.pick_device); on CUDA each rank takes cuda:LOCAL_RANK."""
    tc = job.process.train
    key = "config.process[0].train.distributed"
    if tc.distributed == "auto" and launched_world() <= 1:
        return None
    missing = [v for v in LAUNCH_VARS if not os.environ.get(v)]
    if missing:
        mode = "ddp" if tc.distributed == "auto" else tc.distributed
        raise ConfigError(f"{key}: {mode} needs a multi-process launch, and {', '.join(missing)} is not set; run"
                          " `torchrun --nproc_per_node N -m trainer job.yaml` (or accelerate launch), or set it to auto")
    world, rank, local = (_env_int(v) for v in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    if device.type == "cuda":
        if device.index is not None and world > 1:
            raise ConfigError(f"config.process[0].device: {device} names one card, but each of the {world} ranks trains"
                              " on its own (cuda:LOCAL_RANK); leave device unset or write cuda")
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local}: this machine has {torch.cuda.device_count()} CUDA devices; launch"
                            " at most that many processes per machine (--nproc_per_node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=tc.distributed_timeout)
    import torch.distributed as dist

    try:
        store, rank, world = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        ours = dist.PrefixStore(f"eridiffusion/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        ours.set(f"proc/{rank}", f"{socket.gethostname()} {os.getpid()}")  # read by the others to tell a lost rank
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.PrefixStore("pg", store),
                                rank=rank, world_size=world, timeout=timeout)
    except (RuntimeError, ValueError) as e:  # torch's store and rendezvous errors are RuntimeErrors
        raise UserError(f"rank {rank} of {world}: the process group did not form (the ranks wait for each other up to"
                        f" train.distributed_timeout, {tc.distributed_timeout} s): {_first_line(e)}") from None
    # without torchrun's agent (a plain env launch) rank 0's process serves the store: it must outlive its message
    hosts = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    return Distributed(rank, world, device, ours, hosts_store=hosts, sharded=tc.distributed == "fsdp")


class Distributed:
    """This rank in its process group; `is_main` (rank 0) is the one that writes."""

    def __init__(self, rank: int, world: int, device: torch.device, store, hosts_store: bool = False,
                 sharded: bool = False) -> None:
        self.rank, self.world, self.device = rank, world, device
        self.sharded = sharded  # train.distributed fsdp: the base's blocks are sharded over the ranks (sharding.py)
        self.store = store
        self.hosts_store = hosts_store
        self.peaks: list[float] = [0.0] * world  # each rank's peak memory (GiB) at the last step
        self._failed = self._told = False
        self._procs = {r: self.store.get(f"proc/{r}").decode().split() for r in range(world)}

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world}"

    # --- the step ------------------------------------------------------------------------------
    def share(self, n: int) -> slice:
        """This rank's part of a global batch of `n` items: contiguous, as even as it can be (a short last batch
        may leave a rank none)."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def sum_gradients(self, params: list[torch.nn.Parameter], loss: float, peak_gib: float) -> float:
        """Sum the ranks' gradients of `params` in place and return the summed loss. Each rank's loss is its items'
        sum over the global batch's size, so the sums are the global batch's mean and its gradient: the step one
        process with the whole batch takes. Each rank's peak memory rides along (`peaks`). One all_reduce."""
        dev = params[0].device
        flat = [p.grad.detach().reshape(-1).float() if p.grad is not None else torch.zeros(p.numel(), device=dev)
                for p in params]
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=dev)
        stats = torch.zeros(1 + self.world, dtype=torch.float32, device=dev)
        stats[0], stats[1 + self.rank] = loss, peak_gib
        bucket = torch.cat(flat + [has, stats])
        self._collective(lambda: torch.distributed.all_reduce(bucket), "a step's gradient sum")
        sizes = [p.numel() for p in params]
        n = sum(sizes)
        given = bucket[n:n + len(params)].tolist()
        for p, g, any_rank in zip(params, bucket[:n].split(sizes), given):
            if any_rank:  # a parameter no rank has a gradient for keeps none (the optimizer skips it, as alone)
                p.grad = g.view_as(p).to(p.dtype)
        tail = bucket[n + len(params):].tolist()
        self.peaks = tail[1:]
        return tail[0]

    def broadcast_from_main(self, params: list[torch.nn.Parameter]) -> None:
        """Every rank starts from the main rank's weights (they are built alike; this makes sure)."""
        if not params:
            return
        bucket = torch.cat([p.detach().reshape(-1).float() for p in params])
        self._collective(lambda: torch.distributed.broadcast(bucket, 0), "the starting weights")
        with torch.no_grad():
            for p, v in zip(params, bucket.split([p.numel() for p in params])):
                p.copy_(v.view_as(p))

    def _collective(self, op: Callable[[], object], what: str) -> None:
        try:
            op()
        except RuntimeError as e:  # gloo / nccl errors: a rank went away, or no answer within the timeout
            why = _first_line(e)
            if "timed out" in why.lower() or "timeout" in why.lower():
                why = f"no answer within train.distributed_timeout ({why})"
            news = self.news()
            raise RankLost(f"{what} failed: " + (news or f"lost the other ranks: {why}")) from None

    # --- the main rank's work ------------------------------------------------------------------
    def main_runs(self, what: str, fn: Callable[[], T]) -> T | None:
        """`fn` on the main rank (a save, a preview); the others wait until it is done. Returns fn's result on the
        main rank, None on the others."""
        key = f"done/{what}"
        if self.is_main:
            out = fn()
            self.store.set(key, "1")
            return out
        self._wait(key, what)
        return None

    def main_first(self, what: str, fn: Callable[[], T]) -> T:
        """`fn` on the main rank first, then on the others (caches: the main rank writes the disk cache, the others
        read it)."""
        out = self.main_runs(what, fn)
        return out if self.is_main else fn()

    def _wait(self, key: str, what: str) -> None:
        """Until the main rank sets `key`, however long its work takes, unless a rank fails or is lost."""
        while True:
            try:
                if self.store.check([key]):
                    return
            except RuntimeError as e:
                raise RankLost(f"lost the job's store while waiting for rank 0 ({what}): {_first_line(e)}") from None
            news = self.news()
            if news:
                raise RankLost(f"waiting for rank 0 ({what}): {news}")
            time.sleep(POLL_S)

    # --- failures ------------------------------------------------------------------------------
    def news(self) -> str:
        """What became of the other ranks: the failures they recorded, else those of this machine whose process is
        gone; empty if nothing is known to be wrong."""
        try:
            out = []
            if self.store.add("failures", 0) > 0:
                for r in range(self.world):
                    if r != self.rank and self.store.check([f"failed/{r}"]):
                        out.append(f"rank {r} failed: {self.store.get(f'failed/{r}').decode()}")
            if out:
                if not self._told:  # a failed rank that serves the store waits for this (abort)
                    self._told = True
                    self.store.add("told", 1)
                return "; ".join(out)
        except RuntimeError as e:
            return f"the job's store is gone ({_first_line(e)})"
        here = socket.gethostname()
        return "; ".join(f"rank {r} (process {pid}) is gone, without a message (killed? out of host memory?)"
                         for r, (host, pid) in self._procs.items()
                         if r != self.rank and host == here and not _alive(int(pid)))

    def abort(self, message: str, code: int) -> NoReturn:
        """This rank failed: record `message` for the others, say it (with what is known of the others) and leave at
        once. os._exit, not a return: with a peer gone, the group's threads can hold a normal exit; the launcher
        then ends the other ranks."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the launcher's teardown must not cut the message short
        if not self._failed:
            self._failed = True
            try:
                self.store.set(f"failed/{self.rank}", message)
                self.store.add("failures", 1)
            except RuntimeError:
                pass  # the store is gone with the launcher: the message below is all there is
        news = self.news()
        text = f"{self}: {message}" + (f" ({news})" if news and news not in message else "")
        sys.stdout.flush()
        print(f"error: {text}", file=sys.stderr, flush=True)
        if self.hosts_store:
            self._linger()
        os._exit(code)

    def _linger(self) -> None:
        """Keep the store up until every other rank has read a failure, failed itself or is gone (LINGER_S at
        most). A gloo group is taken down first, so a rank blocked in a collective with this one fails at once and
        comes to read; an NCCL group is left alone (taking it down can wait on the peers)."""
        if self.device.type != "cuda" and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        here = socket.gethostname()
        others = [(host, int(pid)) for r, (host, pid) in self._procs.items() if r != self.rank]
        deadline = time.monotonic() + LINGER_S
        while time.monotonic() < deadline:
            try:
                known = self.store.add("told", 0) + self.store.add("failures", 0) - 1
            except RuntimeError:
                return
            gone = sum(host == here and not _alive(pid) for host, pid in others)
            if known + gone >= len(others):
                return
            time.sleep(0.05)

    def close(self) -> None:
        """The end of a run every rank finished: the group is taken down."""
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _alive(pid: int) -> bool:
    """Whether process `pid` of this machine still runs (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
