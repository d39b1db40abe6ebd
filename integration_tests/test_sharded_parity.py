"""2-rank DistributedModelParallel training matches single-process training.

Each ranker kind is trained for a few steps under several sharding types on 2 gloo
ranks (per-rank batch B) and, in this process, unsharded on the same global batches
(2B). Losses of every step and the final predictions must agree.

TorchRec's gradient semantics make the comparison exact: dense gradients are averaged
by DDP, and the backward all-to-all of sharded tables divides by the world size
(``torchrec.distributed.comm_ops`` GRADIENT_DIVISION, on by default), so every
parameter gets the global-batch mean gradient, as in the single process. The embedding
learning rate is large so that a wrong gradient scale (e.g. x2) is far outside the
tolerance: the test checks that too.
"""

import json
import os

import numpy as np
import pytest

from torchrec_mm.models.rankers import RankerConfig
from torchrec_mm.testing import random_samples, reference_sgd_run, sharded_sgd_run
from torchrec_mm.training.distributed import init_distributed, spawn
from torchrec_mm.training.trainer import TrainConfig

WORLD = 2
B = 64
STEPS = 12
EMB_LR = 50.0
DENSE_LR = 0.1
CASES = [
    ("dlrm", "table_wise"),
    ("dlrm", "row_wise"),
    ("dlrm", "column_wise"),
    ("dlrm", "data_parallel"),
    ("dlrm_dcn", "table_wise"),
    ("target_attention", "table_wise"),
    ("target_attention", "row_wise"),
    ("target_attention", "column_wise"),
]


def _config(kind: str, sharding: str) -> TrainConfig:
    return TrainConfig(
        data="-", out="-", ranker=RankerConfig(kind=kind, embedding_dim=8),
        history_length=10, batch_size=B, embedding_optimizer="sgd", embedding_lr=EMB_LR,
        dense_optimizer="sgd", dense_lr=DENSE_LR, sharding_type=sharding, seed=3,
        progress=False)


def _samples():
    return random_samples(num_interactions=4000, num_users=120, num_items=200,
                          history_length=10, seed=1)


def _eval_rows(samples) -> np.ndarray:
    return samples.rows("test")[:150]


def _worker(out_dir: str) -> None:
    rank = int(os.environ["RANK"])
    ctx = init_distributed(rank, WORLD)
    samples = _samples()
    results = {f"{kind}/{sharding}": sharded_sgd_run(_config(kind, sharding), samples, ctx,
                                                     STEPS, _eval_rows(samples))
               for kind, sharding in CASES}
    if rank == 0:
        with open(os.path.join(out_dir, "sharded.json"), "w") as f:
            json.dump(results, f)


def _reference(kind: str, sharding: str, samples, scale: float = 1.0):
    _, losses, final, initial = reference_sgd_run(_config(kind, sharding), samples, WORLD,
                                                  STEPS, _eval_rows(samples), scale)
    return losses, final, initial


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("parity")
    spawn(_worker, WORLD, (str(out),))
    with open(out / "sharded.json") as f:
        return json.load(f)


@pytest.mark.parametrize("kind,sharding", CASES)
def test_two_rank_matches_single_process(sharded, kind, sharding):
    samples = _samples()
    ref_loss, ref_score, initial = _reference(kind, sharding, samples)
    _, wrong_score, _ = _reference(kind, sharding, samples, scale=2.0)
    got = sharded[f"{kind}/{sharding}"]
    assert sharding in got["plan"] or sharding == "auto"
    np.testing.assert_allclose(got["loss"], ref_loss, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["score"], ref_score, rtol=0, atol=1e-5)
    # training moved the model well beyond the tolerance (not two no-ops compared)
    assert np.abs(ref_score - initial).max() > 5e-3
    # ... and the embedding gradient scale matters at this learning rate
    assert np.abs(np.asarray(got["score"]) - wrong_score).max() > 1e-3
