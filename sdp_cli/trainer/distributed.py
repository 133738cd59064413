"""Trainer ranks over torch.distributed: who is who, the rendezvous, the command channel from
rank 0 to the others, and the local rank processes that this process starts and watches.

One process per node runs `sdp train`; it is the node's local rank 0 and spawns local ranks
1..world_size-1 with torch.multiprocessing. Global rank 0 (node 0's first process) owns the
servers, the rollouts, the event log and the dashboard; every other rank only trains, doing what
rank 0 tells it over the channel (docs/design.md, Beyond one process and one machine).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sdp_cli.config.server_settings import Device
from sdp_cli.config.train_settings import TrainConfig, TrainDtype
from sdp_cli.errors import ConfigError, SdpError

_PR_SET_PDEATHSIG = 1


class TrainerRankDied(SdpError):
    """A trainer rank exited while the run needed it; the whole trainer stops."""

    exit_code = 1


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def total_ranks(train: TrainConfig) -> int:
    return train.world_size * train.nnodes


def rank_info(train: TrainConfig, local_rank: int) -> RankInfo:
    return RankInfo(
        rank=train.node_rank * train.world_size + local_rank,
        world_size=total_ranks(train),
        local_rank=local_rank,
    )


def trainer_on_cuda(train: TrainConfig) -> bool:
    if train.device == Device.auto:
        return torch.cuda.is_available()
    return train.device == Device.cuda


def compute_dtype(train: TrainConfig) -> torch.dtype:
    """bfloat16 parameters and compute on CUDA, float32 on CPU, unless train.dtype says."""
    if train.dtype == TrainDtype.auto:
        return torch.bfloat16 if trainer_on_cuda(train) else torch.float32
    if train.dtype == TrainDtype.bfloat16 and not trainer_on_cuda(train):
        raise ConfigError(
            "train.dtype", "bfloat16 is for a CUDA trainer", "set train.dtype=float32 or auto"
        )
    return torch.bfloat16 if train.dtype == TrainDtype.bfloat16 else torch.float32


def uses_sharded_trainer(train: TrainConfig) -> bool:
    """FSDP2 for more than one rank, and for bfloat16 on CUDA (its mixed precision policy keeps
    float32 master weights and reduces gradients in float32); the plain actor otherwise."""
    return total_ranks(train) > 1 or compute_dtype(train) != torch.float32


def backend_for(train: TrainConfig) -> str:
    return "nccl" if trainer_on_cuda(train) else "gloo"


def cuda_device_of(train: TrainConfig, local_rank: int) -> int:
    """The CUDA device index of `local_rank` among the visible devices."""
    return train.gpu_ids[local_rank] if train.gpu_ids else local_rank


def init_rank(train: TrainConfig, info: RankInfo) -> dist.ProcessGroup:
    """Join the trainer's process group; returns the gloo group the command channel uses (the
    default group itself on CPU; a gloo group beside NCCL on CUDA, for pickled objects)."""
    if trainer_on_cuda(train):
        torch.cuda.set_device(cuda_device_of(train, info.local_rank))
    timeout = timedelta(seconds=train.dist_timeout_s)
    dist.init_process_group(
        backend_for(train),
        init_method=f"tcp://{train.master_addr}:{train.master_port}",
        rank=info.rank,
        world_size=info.world_size,
        timeout=timeout,
    )
    if backend_for(train) == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo", timeout=timeout)


def leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class Command(StrEnum):
    train = "train"
    export = "export"
    save = "save"
    load = "load"
    stop = "stop"


class RankChannel:
    """Rank 0 → every rank: a command with a small payload, the parts of a batch, and the
    statistics back. Objects travel pickled over gloo on CPU tensors."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        info: RankInfo,
        before_send: Callable[[], None] | None = None,
    ) -> None:
        self.group = group
        self.info = info
        # Raises when a rank is known to be gone, instead of waiting on it.
        self.before_send = before_send

    def send(self, command: Command, payload: Any = None) -> None:
        if self.before_send is not None:
            self.before_send()
        dist.broadcast_object_list([command.value, payload], src=0, group=self.group)

    def receive(self) -> tuple[Command, Any]:
        message: list[Any] = [None, None]
        dist.broadcast_object_list(message, src=0, group=self.group)
        return Command(message[0]), message[1]

    def scatter(self, parts: list[Any] | None) -> Any:
        """Rank 0 passes one part per rank; every rank gets its own."""
        received: list[Any] = [None]
        dist.scatter_object_list(received, parts, src=0, group=self.group)
        return received[0]

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's `value`, in rank order, on rank 0; None elsewhere."""
        gathered: list[Any] | None = [None] * self.info.world_size if self.info.is_main else None
        dist.gather_object(value, gathered, dst=0, group=self.group)
        return gathered

    def all_reduce(self, value: float, op: dist.ReduceOp.RedOpType) -> float:
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor, op=op, group=self.group)
        return float(tensor.item())


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when the process that started it dies (even by
    SIGKILL), so a rank never outlives its owner; then check that the owner did not die
    before the request was made."""
    parent = os.getppid()
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent or parent == 1:
        os._exit(1)


def redirect_output(log_path: Path) -> None:
    """A rank's prints and tracebacks go to its log: the terminal belongs to rank 0's
    dashboard."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def rank_log(log_dir: Path, rank: int) -> Path:
    return log_dir / f"trainer-rank{rank}.log"


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class LocalRanks:
    """Local ranks 1..world_size-1 of this node, spawned with torch.multiprocessing.

    Rank 0 checks them before each command it sends (`check()`), so a rank that died while
    rank 0 waited for rollouts stops the run at the next step with its name; one that dies in
    the middle of a collective makes gloo raise on rank 0, and `dead_rank()` then names it."""

    def __init__(self, train: TrainConfig, log_dir: Path) -> None:
        self.train = train
        self.log_dir = log_dir
        self.context: mp.ProcessContext | None = None

    def start(self, entry: Callable[..., None], *args: Any) -> None:
        """Run `entry(index, *args)` in world_size - 1 new processes; index 0 is local rank 1."""
        count = self.train.world_size - 1
        if count < 1:
            return
        self.context = mp.start_processes(
            entry, args=args, nprocs=count, join=False, start_method="spawn"
        )

    def _global_rank(self, index: int) -> int:
        return rank_info(self.train, index + 1).rank

    def dead_rank(self, wait_s: float = 0.0) -> TrainerRankDied | None:
        """The first local rank that has exited, waiting up to `wait_s` for one to be reaped
        (a rank whose sockets just closed may not have been reaped yet)."""
        if self.context is None:
            return None
        deadline = time.monotonic() + wait_s
        while True:
            for index, process in enumerate(self.context.processes):
                if process.exitcode is not None:
                    rank = self._global_rank(index)
                    return TrainerRankDied(
                        f"trainer rank {rank} (pid {process.pid}) "
                        f"{_describe_exit(process.exitcode)}; the trainer stops. "
                        f"Its log: {rank_log(self.log_dir, rank)}"
                    )
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def check(self) -> None:
        failure = self.dead_rank()
        if failure is not None:
            raise failure

    def stop(self, grace_s: float = 10.0) -> None:
        """Wait up to `grace_s` for the ranks to exit (after a stop command), then kill them."""
        if self.context is None:
            return
        deadline = time.monotonic() + grace_s
        for process in self.context.processes:
            process.join(timeout=max(deadline - time.monotonic(), 0.0))
        for process in self.context.processes:
            if process.is_alive():
                process.kill()
                process.join(timeout=5.0)
