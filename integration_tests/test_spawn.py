"""`spawn`: a worker that finishes leaves with exit code 0 (without the interpreter's
teardown), one that raises makes `spawn` raise with the worker's message."""

import os

import pytest
import torch.distributed as dist

from torchrec_mm.training.distributed import init_distributed, spawn


def _ok(path: str) -> None:
    ctx = init_distributed(int(os.environ["RANK"]), 2)
    dist.barrier()
    with open(f"{path}.{ctx.rank}", "w") as f:
        f.write("done")


def _fails() -> None:
    init_distributed(int(os.environ["RANK"]), 2)
    raise ValueError("worker failed on purpose")


def test_spawn_returns_after_success_and_raises_a_worker_error(tmp_path):
    path = str(tmp_path / "out")
    spawn(_ok, 2, (path,))
    for rank in (0, 1):  # what a worker wrote before its hard exit is on disk
        with open(f"{path}.{rank}") as f:
            assert f.read() == "done"
    with pytest.raises(Exception, match="worker failed on purpose"):
        spawn(_fails, 2)
