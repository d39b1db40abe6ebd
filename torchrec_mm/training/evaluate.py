"""Evaluation of rankers: predictions on the test splits and metrics by slice.

Slices (each a set of test samples):

* ``test``: every test sample; ``warm``: items seen in training (the time-based test);
  ``cold``: new items, with no training interaction;
* ``L1`` .. ``L6``: popularity groups of the *target item* by its number of training
  impressions (QARM Table 5; ``torchrec_mm.metrics.slices.popularity_groups``), cold
  items included in L1 since they have no training count;
* ``age<1d``, ``age:1d-7d``, ``age:7d-30d``, ``age>=30d``: item age at impression time
  (timestamp minus the item's first appearance in the log; the IDProxy paper's "new
  notes" view).

A multi-task ranker (``RankerConfig.tasks``) is scored on its click column everywhere;
each extra task adds ``<task>:test``, ``<task>:warm``, ``<task>:cold``.

Metrics per slice: AUC, UAUC, GAUC (``torchrec_mm.metrics.ranking``), log-loss, CTR and
counts.
"""

import math
import os
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from torchrec_mm.data.batching import SPLIT_TEST_COLD, SPLIT_TEST_WARM, SPLIT_TRAIN, RankingSamples
from torchrec_mm.training.distributed import DistContext

NUM_POPULARITY_GROUPS = 6


@torch.no_grad()
def predict(model: nn.Module, samples: RankingSamples, rows: np.ndarray, batch_size: int,
            ctx: DistContext) -> Dict[str, np.ndarray]:
    """Scores of ``rows`` under a (sharded) ``RankerTrain`` model.

    Every rank must call it with the same rows. Each step gives every rank a
    non-empty slice (padded by repeating a row, then dropped), as the sharded
    all-to-alls require; scores are all-gathered so every rank returns all of them.

    Returns:
        ``{"score", "label", "user_id", "item_id", "split", "row"}`` arrays in ``rows`` order.
    """
    rows = np.asarray(rows, dtype=np.int64)
    was_training = model.training
    model.eval()
    world, rank = ctx.world_size, ctx.rank
    n = len(rows)
    per_step = batch_size * world
    steps = max(1, math.ceil(n / per_step))
    local_scores, local_pos = [], []
    for s in range(steps):
        chunk = rows[s * per_step:(s + 1) * per_step]
        size = max(1, math.ceil(len(chunk) / world))
        mine = chunk[rank * size:(rank + 1) * size]
        first = s * per_step + rank * size
        valid = len(mine)
        if valid < size:
            mine = np.concatenate([mine, np.full(size - valid, rows[0] if n else 0)])
        if n == 0:
            # nothing to score, but the collectives of one step still have to run
            mine = np.zeros(1, dtype=np.int64)
            valid = 0
        batch = samples.make_batch(mine, "all")
        _, (_, logits, _) = model(batch.to(ctx.device))
        local_scores.append(torch.sigmoid(logits.float()).cpu())
        pos = torch.full((size,), -1, dtype=torch.long)
        pos[:valid] = torch.arange(first, first + valid)
        local_pos.append(pos)
    scores, pos = torch.cat(local_scores), torch.cat(local_pos)
    if world > 1:
        # every rank ran the same number of equal-sized steps: equal lengths
        all_s = [torch.empty_like(scores) for _ in range(world)]
        all_p = [torch.empty_like(pos) for _ in range(world)]
        dist.all_gather(all_s, scores)
        dist.all_gather(all_p, pos)
        scores, pos = torch.cat(all_s), torch.cat(all_p)
    keep = pos >= 0
    order = torch.argsort(pos[keep])
    model.train(was_training)
    scores = scores[keep][order].numpy()
    out = {"score": scores, "label": samples.label[rows],
           "user_id": samples.user[rows], "item_id": samples.item[rows],
           "split": samples.split[rows], "row": rows}
    if scores.ndim == 2:  # multi-task ranker: column 0 is the click
        out["score"] = scores[:, 0]
        out["task_score"] = scores
        out["task_label"] = samples.task_labels(rows)
    return out


def training_item_counts(samples: RankingSamples) -> np.ndarray:
    """[num_items] training impressions per item."""
    train = samples.split == SPLIT_TRAIN
    return np.bincount(samples.item[train], minlength=samples.layout.num_items)


def slice_metrics(samples: RankingSamples, pred: Dict[str, np.ndarray],
                  num_groups: int = NUM_POPULARITY_GROUPS) -> Dict[str, Dict[str, float]]:
    """Metrics on every slice of the module docstring."""
    from torchrec_mm.metrics.slices import (
        first_appearance,
        item_age_slices,
        popularity_slices,
        sliced_ranking_metrics,
    )

    split = torch.from_numpy(pred["split"])
    masks: Dict[str, torch.Tensor] = {
        "test": torch.ones_like(split, dtype=torch.bool),
        "warm": split == SPLIT_TEST_WARM,
        "cold": split == SPLIT_TEST_COLD,
    }
    item_ids = torch.from_numpy(pred["item_id"])
    counts = torch.from_numpy(training_item_counts(samples))
    masks.update(popularity_slices(item_ids, counts, num_groups))
    if "row" in pred:  # item age at impression: the paper's "new notes" view
        first = first_appearance(torch.from_numpy(samples.item), torch.from_numpy(
            samples.timestamp), samples.layout.num_items)
        ts = torch.from_numpy(samples.timestamp[pred["row"]])
        masks.update(item_age_slices(item_ids, ts, first))
    scores = torch.from_numpy(pred["score"]).double()
    labels = torch.from_numpy(pred["label"]).double()
    users = torch.from_numpy(pred["user_id"])
    out = sliced_ranking_metrics(scores, labels, users, masks, include_all=False)
    eps = 1e-7
    p = scores.clamp(eps, 1 - eps)
    ll = -(labels * p.log() + (1 - labels) * (1 - p).log())
    for name, m in masks.items():
        k = int(m.sum())
        out[name]["logloss"] = float(ll[m].mean()) if k else float("nan")
        out[name]["ctr"] = float(labels[m].mean()) if k else float("nan")
    if "task_score" in pred:
        # the extra tasks of a multi-task ranker on the main slices: "<task>:<slice>"
        for t, task in enumerate(samples.task_names, start=1):
            task_masks = {f"{task}:{k}": masks[k] for k in ("test", "warm", "cold")}
            out.update(sliced_ranking_metrics(
                torch.from_numpy(pred["task_score"][:, t]).double(),
                torch.from_numpy(pred["task_label"][:, t]).double(), users, task_masks,
                include_all=False))
    return out


def evaluate_model(model: nn.Module, samples: RankingSamples, batch_size: int,
                   ctx: DistContext) -> Dict[str, Dict[str, float]]:
    """Predicts every test sample and returns :func:`slice_metrics`."""
    pred = predict(model, samples, samples.rows("test"), batch_size, ctx)
    return slice_metrics(samples, pred)


def evaluate_run(run: str, data: Optional[str] = None, batch_size: int = 4096,
                 out: Optional[str] = None, attention: str = "learned") -> Dict[str, Any]:
    """Loads the latest checkpoint of a ``train`` run and evaluates it (one process).

    For a ranker with target attention the metrics also hold ``attention``: the mean
    normalised entropy and effective fraction of its learned weights over the test
    samples (:class:`~torchrec_mm.models.target_attention.AttentionProbe`); with
    ``attention="uniform"`` the model is scored with those weights replaced by mean
    pooling, which shows what the learned weights contribute.

    Writes ``eval_metrics.json`` to ``out`` (default: the run directory; with uniform
    weights ``eval_metrics_uniform_attention.json``, so the run's own metrics stay).
    """
    from torchrec_mm.models.target_attention import (
        ATTENTION_WEIGHTS,
        TargetAttention,
        probe_attention,
    )
    from torchrec_mm.training import checkpoint as ckpt
    from torchrec_mm.training.distributed import init_distributed
    from torchrec_mm.training.trainer import build_model, load_run_config, shard_model
    from torchrec_mm.utils.io import write_json

    if attention not in ATTENTION_WEIGHTS:
        raise ValueError(f"attention must be one of {ATTENTION_WEIGHTS}, got '{attention}'")
    cfg = load_run_config(run, data)
    if attention == "uniform" and cfg.ranker.kind != "target_attention":
        raise ValueError(f"{run}: attention 'uniform' needs a ranker with target attention; "
                         f"this run's ranker is '{cfg.ranker.kind}'")
    latest = ckpt.latest_checkpoint(os.path.join(run, "checkpoints"))
    if latest is None:
        raise FileNotFoundError(f"{run}/checkpoints has no checkpoint to evaluate")
    owns_pg = not dist.is_initialized()
    ctx = init_distributed(0, 1)
    try:
        samples = RankingSamples.from_dataset(cfg.data, cfg.history_length)
        model, plugins = build_model(cfg, samples.layout, samples)
        model = shard_model(model, cfg, ctx, plugins)
        step, skeleton, tensors = ckpt.read_checkpoint(latest)
        model.load_state_dict(ckpt.restore(model.state_dict(), ckpt.child(skeleton, "model"),
                                           tensors, "/model", values_from_checkpoint=False))
        metrics: Dict[str, Any] = {"run": run, "checkpoint": latest, "step": step}
        if any(isinstance(m, TargetAttention) for m in model.modules()):
            with probe_attention(model, uniform=attention == "uniform") as probe:
                metrics["slices"] = evaluate_model(model, samples, batch_size, ctx)
            metrics["attention"] = {"weights": attention, **probe.summary()}
        else:
            metrics["slices"] = evaluate_model(model, samples, batch_size, ctx)
        name = "eval_metrics.json" if attention == "learned" else \
            "eval_metrics_uniform_attention.json"
        write_json(os.path.join(out or run, name), metrics)
        return metrics
    finally:
        if owns_pg and dist.is_initialized():
            dist.destroy_process_group()
