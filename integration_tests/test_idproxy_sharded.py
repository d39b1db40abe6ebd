"""2-rank DistributedModelParallel training with the ``idproxy`` plugin matches
single-process training (the pattern and gradient reasoning of
``test_sharded_parity.py``).

Each case trains an unmodified ranker whose item-ID collection is wrapped by the
plugin (built by ``trainer.build_model`` from a YAML spec) for a few steps on 2 gloo
ranks (per-rank batch B) and, in this process, unsharded on the same global batches
(2B). Losses of every step and the final predictions must agree.

Gradient semantics: the fine-proxy adaptor is a dense module, so DDP averages its
gradients (= the global-batch mean) and it trains at the dense lr in both. Sharded
embedding rows also receive the global-batch mean: the backward all-to-all sums the
two ranks' per-rank-mean gradients *and divides by the world size*
(``torchrec.distributed.comm_ops.GRADIENT_DIVISION``, True by default). So the
unsharded reference uses the same learning rates as the sharded run. (This contradicts
the x2 embedding-lr reasoning of ``test_sharded_parity.py``; that test does not notice
because at its embedding lr 0.5 the ID-row updates move losses and scores by less than
its tolerance. Here the embedding lr is large enough that the x2 reference is *refuted*
— checked in the test — so the gradient semantics are really tested.) The frozen
proxy inputs (p_coarse and the layer-group states) are one embedding table,
``t_idproxy_inputs``, sharded by the planner like the ID tables; their lookup is
detached, so they never move. With ``history_refresh`` the history's proxies are a
second frozen table, ``t_idproxy_history``, that each rank rewrites in its own shards
from the (DDP-replicated) adaptor: the table put together from both ranks must be the
single process's.
"""

import json
import os
from typing import Optional

import numpy as np
import pytest
import torch
import yaml

from torch.distributed._shard.sharded_tensor import ShardedTensor

from torchrec_mm.idproxy.artifacts import Proxies, save_proxies
from torchrec_mm.idproxy.modules import HISTORY_TABLE
from torchrec_mm.models.rankers import RankerConfig
from torchrec_mm.testing import (
    pipelined_sgd_losses,
    random_samples,
    reference_sgd_run,
    sharded_sgd_run,
)
from torchrec_mm.training.distributed import init_distributed, spawn
from torchrec_mm.training.checkpoint import save_checkpoint
from torchrec_mm.training.trainer import TrainConfig, build_model

WORLD = 2
B = 64
STEPS = 10
EMB_LR = 50.0  # large: ID-row updates must matter beyond the tolerance (see below)
DENSE_LR = 0.1
DIM = 8
NUM_ITEMS = 200
COLD_THRESHOLD = 15  # cold_only: about a third of the items take their proxy
CASES = [
    ("target_attention", "table_wise", "augment"),
    ("target_attention", "row_wise", "swap"),
    ("dlrm", "table_wise", "augment"),
    ("dlrm", "row_wise", "swap"),
    ("target_attention", "row_wise", "cold_only"),
    ("dlrm", "table_wise", "cold_only"),
    # augment with history_grad false: the adaptor's gradient from the targets only
    ("target_attention", "table_wise", "augment_target_grad"),
    ("dlrm", "row_wise", "augment_target_grad"),
    # stored fine proxies (fine_run): DLRM's slots from one frozen, MEAN-pooled table
    # (t_idproxy_stored), row-wise sharded; target attention reads t_idproxy_inputs
    ("dlrm", "row_wise", "augment_stored"),
    ("target_attention", "table_wise", "augment_stored"),
    # history_refresh: the history's proxies from a table the adaptor rewrites every
    # REFRESH steps (each rank its own shards), the targets' live
    ("dlrm", "row_wise", "augment_cached"),
    ("target_attention", "row_wise", "augment_cached"),
    # table-wise: one rank holds the whole cache, the other no row of it
    ("dlrm", "table_wise", "augment_cached"),
]
REFRESH = 3
#: the frozen proxy tables the planner must shard
FROZEN_TABLES = {("dlrm", "augment_stored"): ["t_idproxy_stored"]}
for _kind in ("dlrm", "target_attention"):
    FROZEN_TABLES[(_kind, "augment_cached")] = ["t_idproxy_inputs", "t_idproxy_history"]
# also trained through TrainPipelineSparseDist (swap feeds the EBC a filtered KJT, so
# that EBC's input dist is not prefetched; training must still be the same)
PIPELINED = [("target_attention", "table_wise", "augment"), ("dlrm", "row_wise", "swap"),
             ("dlrm", "row_wise", "augment_cached")]


def _write_inputs(out_dir: str) -> None:
    g = torch.Generator().manual_seed(5)
    has = torch.ones(NUM_ITEMS, dtype=torch.bool)
    has[::9] = False
    save_proxies(os.path.join(out_dir, "proxies"), Proxies(
        p_coarse=torch.nn.functional.normalize(torch.randn(NUM_ITEMS, DIM, generator=g), dim=1),
        z_groups=torch.randn(NUM_ITEMS, 3, 12, generator=g), has_content=has))
    for mode in ("augment", "swap", "cold_only", "augment_target_grad", "augment_stored",
                 "augment_cached"):
        options = {"proxies": os.path.join(out_dir, "proxies"), "mode": mode, "hidden_dim": 16}
        if mode == "cold_only":
            options["cold_threshold"] = COLD_THRESHOLD
        if mode == "augment_target_grad":
            options.update(mode="augment", history_grad=False)
        if mode == "augment_stored":
            options.update(mode="augment", fine_run=os.path.join(out_dir, "v5_run"))
        if mode == "augment_cached":
            options.update(mode="augment", history_grad=False, history_refresh=REFRESH)
        spec = {"plugins": [{"name": "idproxy", "options": options}]}
        with open(os.path.join(out_dir, f"{mode}.yaml"), "w") as f:
            yaml.safe_dump(spec, f)
    # the stage-2 run fine_run reads: a v5 model whose adaptor is away from its init
    model, _ = build_model(_config("dlrm", "row_wise", "augment", out_dir),
                           _samples().layout)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "source.fine." in name:
                prm.add_(0.3 * torch.randn(prm.shape, generator=g))
    save_checkpoint(os.path.join(out_dir, "v5_run", "checkpoints"), 1,
                    {"model": model.state_dict()}, keep=1)


def _config(kind: str, sharding: str, mode: str, out_dir: str) -> TrainConfig:
    return TrainConfig(
        data="-", out="-", ranker=RankerConfig(kind=kind, embedding_dim=DIM),
        history_length=10, batch_size=B, embedding_optimizer="sgd", embedding_lr=EMB_LR,
        dense_optimizer="sgd", dense_lr=DENSE_LR, sharding_type=sharding, seed=3,
        progress=False, plugins=os.path.join(out_dir, f"{mode}.yaml"))


def _samples():
    return random_samples(num_interactions=4000, num_users=120, num_items=NUM_ITEMS,
                          history_length=10, seed=1)


def _eval_rows(samples) -> np.ndarray:
    return samples.rows("test")[:150]


def _history_table(model) -> Optional[list]:
    """The whole ``t_idproxy_history`` table [N, 2d] of ``model`` (sharded: gathered on
    rank 0, None on the others; every rank must call it)."""
    table = next(t for k, t in model.state_dict().items() if HISTORY_TABLE in k)
    if isinstance(table, ShardedTensor):
        rank0 = torch.distributed.get_rank() == 0
        full = torch.zeros(table.size()) if rank0 else None
        table.gather(dst=0, out=full)
        table = full
    return None if table is None else table[:, :2 * DIM].tolist()


def _worker(out_dir: str) -> None:
    rank = int(os.environ["RANK"])
    ctx = init_distributed(rank, WORLD)
    samples = _samples()
    results = {}
    for case in PIPELINED:
        results["pipelined/" + "/".join(case)] = pipelined_sgd_losses(
            _config(*case, out_dir), samples, ctx, STEPS)
    for kind, sharding, mode in CASES:
        results[f"{kind}/{sharding}/{mode}"] = sharded_sgd_run(
            _config(kind, sharding, mode, out_dir), samples, ctx, STEPS, _eval_rows(samples),
            probe=_history_table if mode == "augment_cached" else None)
    if rank == 0:
        with open(os.path.join(out_dir, "sharded.json"), "w") as f:
            json.dump(results, f)


def _reference(kind: str, sharding: str, mode: str, out_dir: str, samples,
               emb_lr_scale: float = 1.0, probe=None):
    cfg = _config(kind, sharding, mode, out_dir)
    model, losses, final, initial = reference_sgd_run(
        cfg, samples, WORLD, STEPS, _eval_rows(samples), emb_lr_scale, probe)
    fine = {n: p for n, p in model.named_parameters() if "source.fine." in n}
    if mode == "augment_stored":
        assert not fine, "stored fine proxies have no adaptor"
        return losses, final, initial
    assert fine, "the fine-proxy adaptor must be trained as a dense module"
    torch.manual_seed(cfg.seed)
    untrained, _ = build_model(cfg, samples.layout, samples)
    fine_before = dict(untrained.named_parameters())
    assert any(not torch.equal(fine_before[n], p) for n, p in fine.items())
    return losses, final, initial


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("idproxy_parity")
    _write_inputs(str(out))
    spawn(_worker, WORLD, (str(out),))
    return str(out)


@pytest.mark.parametrize("kind,sharding,mode", CASES)
def test_two_rank_idproxy_matches_single_process(shared_dir, kind, sharding, mode):
    with open(os.path.join(shared_dir, "sharded.json")) as f:
        got = json.load(f)[f"{kind}/{sharding}/{mode}"]
    samples = _samples()
    ref_loss, ref_score, initial = _reference(kind, sharding, mode, shared_dir, samples)
    assert sharding in got["plan"]
    # the frozen proxy inputs are a table the planner shards, not replicated buffers
    for table in FROZEN_TABLES.get((kind, mode), ["t_idproxy_inputs"]):
        assert table in got["plan"], table
    # fbgemm's fused kernels sum in another order than nn.EmbeddingBag: float drift
    np.testing.assert_allclose(got["loss"], ref_loss, rtol=0, atol=1e-4)
    np.testing.assert_allclose(got["score"], ref_score, rtol=0, atol=5e-4)
    assert np.abs(ref_score - initial).max() > 5e-3
    # the comparison is sensitive to the embedding-gradient semantics: a reference
    # whose ID rows moved twice as far is clearly off
    _, x2_score, _ = _reference(kind, sharding, mode, shared_dir, samples,
                                emb_lr_scale=float(WORLD))
    assert np.abs(np.asarray(got["score"]) - x2_score).max() > 1e-3


@pytest.mark.parametrize("kind,sharding", [(k, s) for k, s, m in CASES
                                           if m == "augment_cached"])
def test_history_cache_is_written_on_every_rank(shared_dir, kind, sharding):
    """``history_refresh``: after the training steps the sharded history cache, put
    together from both ranks' shards, is the reference's — each rank rewrote its rows
    at the same steps (the losses alone barely see the history's staleness) — and it
    is the adaptor of its last write, not the current one."""
    with open(os.path.join(shared_dir, "sharded.json")) as f:
        got = np.asarray(json.load(f)[f"{kind}/{sharding}/augment_cached"]["probe"])
    probed = {}

    def probe(model):
        probed["table"] = np.asarray(_history_table(model))
        source = next(m for m in model.modules() if hasattr(m, "write_history_cache"))
        source.write_history_cache()  # what the adaptor of now would write
        probed["now"] = np.asarray(_history_table(model))

    _reference(kind, sharding, "augment_cached", shared_dir, _samples(), probe=probe)
    assert got.shape == (NUM_ITEMS, 2 * DIM) and np.abs(got).max() > 0.1
    np.testing.assert_allclose(got, probed["table"], rtol=0, atol=1e-5)
    # one step of the adaptor at DENSE_LR moves the table by ~1.3e-4, over 10x the
    # tolerance above: a write one step early or late would not match
    assert np.abs(probed["now"] - probed["table"]).max() > 5e-5


@pytest.mark.parametrize("kind,sharding,mode", PIPELINED)
def test_pipelined_training_matches(shared_dir, kind, sharding, mode):
    with open(os.path.join(shared_dir, "sharded.json")) as f:
        results = json.load(f)
    plain = results[f"{kind}/{sharding}/{mode}"]["loss"]
    piped = results[f"pipelined/{kind}/{sharding}/{mode}"]
    assert len(piped) == STEPS
    np.testing.assert_allclose(piped, plain, rtol=0, atol=1e-5)
