"""The most-popular baseline on the RED-Rec protocol.

Every user gets the same ranking: items ordered by their number of positive events in
the *train* split (every event, or those with one of ``target_actions``). It is not
personalised and reads nothing a retrieval model could not: it is the floor every
method of an ablation should beat, and it shows how much of a data set's HR@K is item
popularity alone (on the generated data, whose impressions partly follow a Zipf
popularity, it is a strong HR@10). Items without a train event tie at 0, and ties are
pessimistic (:func:`~torchrec_mm.redrec.protocol.evaluate_scores`).

Example::

    metrics = evaluate_popularity("out/synth", ProtocolConfig(max_users=1000),
                                  split="test", target_actions=["is_click"])
"""

import time
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from torchrec_mm.redrec.protocol import ProtocolConfig, evaluate_scores, make_eval_cases
from torchrec_mm.redrec.sequences import EventLog

__all__ = ["evaluate_popularity", "popularity_counts"]


def popularity_counts(log: EventLog, num_items: int,
                      target_actions: Optional[Sequence[str]] = None,
                      events: Optional[np.ndarray] = None) -> np.ndarray:
    """[num_items] float64 event count of every item in ``log`` (only the events with
    one of ``target_actions`` when given; only those of the [E] bool mask ``events``
    when given, e.g. the train split's)."""
    keep = np.ones(log.num_events, bool) if events is None else np.asarray(events, bool)
    if target_actions is not None:
        keep = keep & log.action_mask(target_actions, "popularity (target_actions)")
    items = log.item[keep]
    if items.size and int(items.max()) >= num_items:
        raise ValueError(f"popularity: item_id {int(items.max())} outside "
                         f"[0, num_items={num_items})")
    return np.bincount(items, minlength=num_items).astype(np.float64)


def evaluate_popularity(data: str, protocol_cfg: Optional[ProtocolConfig] = None,
                        split: str = "test",
                        target_actions: Optional[Sequence[str]] = None,
                        progress: bool = False,
                        scenarios: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Protocol metrics of the most-popular ranking on a dataset (module doc).

    Args:
        data: dataset directory with ``split.json`` (counts from its train split,
            evaluation cases from the whole log, as RED-Rec's and SASRec's).
        protocol_cfg: the cases' :class:`ProtocolConfig`.
        split: which events may be targets (``"test"``, ``"test_warm"``,
            ``"test_cold"``).
        target_actions: positives: counted in training, eligible as targets.
        scenarios: targets only from these scenarios (``RedRecConfig.target_scenarios``;
            the counts stay those of every scenario).
        progress: tqdm bar over case chunks.

    Returns:
        ``{"HR@K", "NDCG@K", "MRR@K", "MRR", "num_users", "num_candidates",
        "pool_size", "num_train_events", "seconds"}``.
    """
    from torchrec_mm.data.io import load_meta
    from torchrec_mm.data.split import TRAIN, load_split
    from torchrec_mm.redrec.train import eval_target_rows

    t0 = time.time()
    cfg = protocol_cfg or ProtocolConfig()
    num_items = load_meta(data).num_items
    log = EventLog.from_dataset(data)  # read once: train counts and evaluation cases
    part = load_split(data).assign(log.item, log.timestamp, log.user)
    train = part == TRAIN
    counts = torch.from_numpy(popularity_counts(log, num_items, target_actions, train))
    rows = eval_target_rows(log, data, split, target_actions, part, scenarios)
    cases = make_eval_cases(log.user_offsets, log.item, log.timestamp, num_items, cfg,
                            target_rows=rows)
    if len(cases) == 0:
        raise ValueError(f"{data}: no user has a {split} event to evaluate")

    def score_fn(users: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        return counts[cand.clamp(min=0)]

    out = evaluate_scores(score_fn, cases, progress=progress)
    out["num_train_events"] = int(train.sum())
    out["seconds"] = time.time() - t0
    return out
