"""Process-group set-up: one entry point for `torchrun` and for local spawning."""

import contextlib
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass
class DistContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(rank: int, world_size: int, backend: str = "auto") -> DistContext:
    """Initialises the default process group (gloo on CPU, nccl on GPU).

    Rendezvous from MASTER_ADDR/MASTER_PORT (set by torchrun or :func:`spawn`).
    """
    use_cuda = torch.cuda.is_available() and backend in ("auto", "nccl")
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistContext(rank=rank, world_size=world_size, device=device)


def _entry(rank: int, world_size: int, port: int, fn: Callable[..., Any],
           args: Sequence[Any]) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(rank)
    # two ranks on a 2-core machine: one intra-op thread each avoids oversubscription
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        fn(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # the work is done and written: leave without the interpreter's teardown, where a
    # C++ thread left by the finished job (gloo / TrainPipelineSparseDist runs) can
    # abort the process after a successful run ("terminate called without an active
    # exception" with no Python frame, about 1 run in 4 of the 2-rank pipelined tests)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn: Callable[..., Any], world_size: int, args: Sequence[Any] = ()) -> None:
    """Runs ``fn(*args)`` in ``world_size`` fresh processes on this host (loopback
    rendezvous); each process reads its rank from ``RANK``. Raises if any fails."""
    mp.start_processes(_entry, args=(world_size, free_port(), fn, tuple(args)),
                       nprocs=world_size, join=True, start_method="spawn")
