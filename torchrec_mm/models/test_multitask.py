"""The multi-task MMoE head: formula vs a loop reference, every ranker kind, the
weighted loss, task labels from the action bits, errors, and (end to end on generated
data) that the extra task is learned."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrec_mm.models.multitask import MultiTaskOverArch
from torchrec_mm.models.rankers import RankerConfig, RankerTrain, build_ranker
from torchrec_mm.testing import random_samples


@settings(max_examples=20, deadline=None)
@given(tasks=st.integers(1, 3), experts=st.integers(1, 4), batch=st.integers(1, 6),
       seed=st.integers(0, 1000))
def test_mmoe_matches_loop_reference(tasks, experts, batch, seed):
    torch.manual_seed(seed)
    head = MultiTaskOverArch(5, [7, 3], tasks, experts)
    x = torch.randn(batch, 5)
    got = head(x)
    assert got.shape == (batch, tasks)
    gates = head.gates(x).view(batch, tasks, experts)
    for b in range(batch):
        outs = [e(x[b:b + 1])[0] for e in head.experts]
        for t in range(tasks):
            g = torch.softmax(gates[b, t], dim=0)
            mixed = sum(g[e] * outs[e] for e in range(experts))
            ref = float(mixed @ head.tower_weight[t] + head.tower_bias[t])
            assert abs(float(got[b, t]) - ref) < 1e-5


@pytest.fixture(scope="module")
def samples():
    s = random_samples(num_interactions=3000, history_length=8, seed=0)
    # plant a second action bit: "like" on a deterministic subset of the clicks
    rng = np.random.default_rng(0)
    like = (s.label > 0) & (rng.random(len(s)) < 0.5)
    s.actions = s.label.astype(np.int64) | (like.astype(np.int64) << 1)
    s.action_names = ["is_click", "is_like"]
    return s


@pytest.mark.parametrize("kind", ["dlrm", "dlrm_dcn", "target_attention"])
def test_every_ranker_gets_one_logit_per_task_and_the_weighted_loss(samples, kind):
    torch.manual_seed(0)
    cfg = RankerConfig(kind=kind, tasks=["is_like"], num_experts=3, task_weights=[1.0, 0.5])
    model = RankerTrain(build_ranker(samples.layout, cfg), cfg.num_tasks, cfg.task_weights)
    samples.set_tasks(cfg.tasks)
    try:
        rows = samples.rows("train")[:64]
        batch = samples.make_batch(rows)
        expected = samples.task_labels(rows)
        np.testing.assert_array_equal(batch.task_labels.numpy(), expected)
        assert expected[:, 1].sum() > 0 and (expected[:, 1] <= expected[:, 0]).all()
        loss, (_, logits, labels) = model(batch)
        assert logits.shape == (64, 2)
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        ref = bce(logits[:, 0], batch.task_labels[:, 0]) + \
            0.5 * bce(logits[:, 1], batch.task_labels[:, 1])
        assert abs(float(loss) - float(ref)) < 1e-6
        loss.backward()
        assert all(p.grad is not None for n, p in model.named_parameters()
                   if "over_arch.gates" in n)
    finally:
        samples.set_tasks([])


def test_task_errors(samples):
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['is_share'\].*is_click"):
        samples.set_tasks(["is_share"])
    bare = random_samples(num_interactions=500, seed=1)
    with pytest.raises(ValueError, match="'actions' column"):
        bare.set_tasks(["is_like"])
    with pytest.raises(ValueError, match="task_weights needs 2"):
        RankerConfig(tasks=["is_like"], task_weights=[1.0])
    model = RankerTrain(build_ranker(samples.layout, RankerConfig(kind="dlrm",
                                                                  tasks=["is_like"])), 2)
    with pytest.raises(ValueError, match="needs batch.task_labels"):
        model(samples.make_batch(samples.rows("train")[:8]))


def test_learns_a_planted_like_task():
    """Likes planted on the clicks of even items: a 2-task DLRM trained a few epochs
    ranks likes on held-out samples well above chance (and above what the click head
    alone gives), and the evaluation reports the task's slices."""
    from torchrec_mm.data.batching import RankingBatchDataset
    from torchrec_mm.training.distributed import DistContext
    from torchrec_mm.training.evaluate import evaluate_model
    from torchrec_mm.training.trainer import TrainConfig, build_model

    s = random_samples(num_interactions=10_000, num_items=300, history_length=8, seed=4)
    s.actions = s.label.astype(np.int64) | (((s.label > 0) & (s.item % 2 == 0))
                                            .astype(np.int64) << 1)
    s.action_names = ["is_click", "is_like"]
    cfg = TrainConfig(data="-", out="-", ranker=RankerConfig(kind="dlrm", embedding_dim=8,
                                                             tasks=["is_like"]), seed=0)
    model, _ = build_model(cfg, s.layout, s)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.05)
    for epoch in range(2):
        for batch in RankingBatchDataset(s, "train", 128, seed=epoch):
            loss, _ = model(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
    ev = evaluate_model(model, s, 4096, DistContext(rank=0, world_size=1,
                                                    device=torch.device("cpu")))
    assert {"is_like:test", "is_like:warm", "is_like:cold"} <= set(ev)
    assert ev["is_like:warm"]["auc"] > 0.75, ev["is_like:warm"]
    assert ev["test"]["auc"] > 0.6
    s.set_tasks([])


def test_cli_tasks_flag():
    import argparse

    from torchrec_mm.training import cli

    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    cli.register(sub)
    args = p.parse_args(["train", "--data", "d", "--out", "o", "--tasks", "is_like,is_share"])
    assert cli.config_from_args(args).ranker.tasks == ["is_like", "is_share"]
