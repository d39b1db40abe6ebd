"""Small generated inputs for tests and benchmarks (no dataset on disk needed)."""

from typing import Dict

import numpy as np

from torchrec_mm.data.batching import FeatureLayout, RankingSamples


def random_samples(
    num_interactions: int = 20000,
    num_users: int = 300,
    num_items: int = 600,
    num_scenarios: int = 3,
    history_length: int = 20,
    seed: int = 0,
    cold_frac: float = 0.1,
    test_frac: float = 0.1,
    item_zipf: float = 0.0,
) -> RankingSamples:
    """A :class:`RankingSamples` with a planted signal: users and items have one of 8
    latent groups; a click is likely when the groups match (so an ID model learns it
    and the target-item/history interaction carries it). ``item_zipf`` > 0: items are
    drawn by a Zipf popularity ``∝ rank^-item_zipf`` (ranks a random permutation of
    the items) instead of uniformly, as in a real log's impressions."""
    rng = np.random.default_rng(seed)
    user_group = rng.integers(0, 8, num_users)
    item_group = rng.integers(0, 8, num_items)
    u = rng.integers(0, num_users, num_interactions)
    # impressions biased towards the user's group so histories are informative
    same = rng.random(num_interactions) < 0.4
    by_group = [np.nonzero(item_group == g)[0] for g in range(8)]
    if item_zipf > 0:
        pop = np.empty(num_items)
        pop[rng.permutation(num_items)] = np.arange(1, num_items + 1, dtype=np.float64) \
            ** -item_zipf
        it = rng.choice(num_items, num_interactions, p=pop / pop.sum())
    else:
        it = rng.integers(0, num_items, num_interactions)
    for g in range(8):
        m = same & (user_group[u] == g)
        if len(by_group[g]):
            p = None if item_zipf <= 0 else pop[by_group[g]] / pop[by_group[g]].sum()
            it[m] = rng.choice(by_group[g], int(m.sum()), p=p)
    logit = np.where(user_group[u] == item_group[it], 1.5, -2.0)
    label = (rng.random(num_interactions) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    ts = np.sort(rng.integers(0, 30 * 86400, num_interactions))
    cols: Dict[str, np.ndarray] = {
        "user_id": u, "item_id": it, "scenario": rng.integers(0, num_scenarios, num_interactions),
        "timestamp": ts, "label": label}
    cold_items = rng.random(num_items) < cold_frac
    cut = np.quantile(ts, 1 - test_frac)
    split = np.where(cold_items[it], 2, np.where(ts >= cut, 1, 0)).astype(np.int8)
    layout = FeatureLayout(num_users=num_users, num_items=num_items,
                           num_scenarios=num_scenarios, user_attrs={"attr_group": 8},
                           history_length=history_length)
    return RankingSamples(cols, split, {"attr_group": user_group}, layout)


def sharded_sgd_run(cfg, samples: RankingSamples, ctx, steps: int,
                    eval_rows: np.ndarray, probe=None) -> Dict[str, object]:
    """Trains ``cfg`` (plugins included) for ``steps`` under DMP on this rank's share of
    each global batch and predicts ``eval_rows``: the sharded side of a parity test.
    ``probe(model)``, when given, is called on every rank after the training steps,
    before the prediction.

    Returns ``{"loss": [global mean loss per step], "score": [...], "plan": str,
    "probe": probe's value or None}``.
    """
    import torch.distributed as dist

    from torchrec_mm.data.batching import RankingBatchDataset
    from torchrec_mm.training.evaluate import predict
    from torchrec_mm.training.trainer import build_model, make_optimizer, shard_model

    model, plugins = build_model(cfg, samples.layout, samples)
    dmp = shard_model(model, cfg, ctx, plugins)
    opt = make_optimizer(dmp, cfg)
    ds = RankingBatchDataset(samples, "train", cfg.batch_size, seed=0, rank=ctx.rank,
                             world_size=ctx.world_size)
    losses = []
    for _, batch in zip(range(steps), ds):
        loss, _ = dmp(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / ctx.world_size)
    probed = probe(dmp) if probe is not None else None
    pred = predict(dmp, samples, eval_rows, 32, ctx)
    return {"loss": losses, "score": pred["score"].tolist(), "plan": str(dmp.plan),
            "probe": probed}


def pipelined_sgd_losses(cfg, samples: RankingSamples, ctx, steps: int) -> list:
    """Trains ``cfg`` (plugins included) for ``steps`` under DMP through
    ``TrainPipelineSparseDist`` on this rank's share of each global batch.

    Returns the global mean loss per step (to compare with :func:`sharded_sgd_run`).
    """
    import torch.distributed as dist
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from torchrec_mm.data.batching import RankingBatchDataset
    from torchrec_mm.training.trainer import build_model, make_optimizer, shard_model

    model, plugins = build_model(cfg, samples.layout, samples)
    dmp = shard_model(model, cfg, ctx, plugins)
    pipeline = TrainPipelineSparseDist(dmp, make_optimizer(dmp, cfg), ctx.device)
    ds = RankingBatchDataset(samples, "train", cfg.batch_size, seed=0, rank=ctx.rank,
                             world_size=ctx.world_size)
    it = iter([b for _, b in zip(range(steps), ds)])
    losses = []
    while True:
        try:
            loss = pipeline.progress(it)[0]
        except StopIteration:
            break
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / ctx.world_size)
    return losses


def reference_sgd_run(cfg, samples: RankingSamples, world_size: int, steps: int,
                      eval_rows: np.ndarray, emb_lr_scale: float = 1.0, probe=None):
    """The single-process side of a parity test: the same model, plain SGD (embedding
    lr ``cfg.embedding_lr * emb_lr_scale``, dense lr ``cfg.dense_lr``) on the global
    batches (``world_size * cfg.batch_size``). Scores are computed in eval mode, as
    ``predict`` does; ``probe(model)`` is called after the training steps, before the
    final scores (as in :func:`sharded_sgd_run`).

    Returns ``(model, losses, final scores, initial scores)`` (scores of ``eval_rows``).
    """
    import torch

    from torchrec_mm.data.batching import RankingBatchDataset
    from torchrec_mm.training.trainer import build_model, embedding_parameters

    model, _ = build_model(cfg, samples.layout, samples)
    emb = embedding_parameters(model)
    emb_ids = {id(p) for p in emb}
    dense = [p for p in model.parameters() if id(p) not in emb_ids]
    opt = torch.optim.SGD([{"params": emb, "lr": cfg.embedding_lr * emb_lr_scale},
                           {"params": dense, "lr": cfg.dense_lr}])
    ds = RankingBatchDataset(samples, "train", cfg.batch_size * world_size, seed=0)
    eval_batch = samples.make_batch(eval_rows, "all")

    def scores() -> np.ndarray:
        model.eval()
        with torch.no_grad():
            out = torch.sigmoid(model(eval_batch)[1][1]).numpy()
        model.train()
        return out

    initial = scores()
    losses = []
    for _, batch in zip(range(steps), ds):
        loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    if probe is not None:
        probe(model)
    return model, losses, scores(), initial
