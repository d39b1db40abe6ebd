"""A training-free content baseline on the RED-Rec protocol: the mean of the history's
content.

Every case's user vector is the mean of the frozen item vectors (a content store: the
``encode`` step's MiniLM ``[EMB]`` states, say) of its mixed input sequence — the events
a RED-Rec user tower would read, chosen by the same mixing policy and ``last_n`` — and
every candidate is scored by its cosine with that mean. The item vectors are centred by
the catalogue mean and unit-normalised first: MiniLM's ``[EMB]`` states of different
items share a large common component (mean cosine 0.8-0.95), which would otherwise
dominate every cosine. A case without input events has a zero vector (every candidate
ties; ties are pessimistic, :func:`~torchrec_mm.redrec.protocol.evaluate_scores`).

It learns nothing. It is the reference a trained content tower should beat, and per
mixing policy it shows what the kept events' content alone carries.

Example::

    metrics = evaluate_content_mean("out/synth", "out/content", ProtocolConfig(),
                                    mix_cfg=MixConfig(policy="2d", last_n=32),
                                    target_actions=["is_click"])
"""

import time
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from torchrec_mm.redrec.protocol import (ProtocolConfig, evaluate_multi_interest,
                                         make_eval_cases)
from torchrec_mm.redrec.sequences import EventLog, MixConfig, mix
from torchrec_mm.utils import jagged

__all__ = ["centred_unit", "evaluate_content_mean", "history_means"]


def centred_unit(vectors: torch.Tensor) -> torch.Tensor:
    """[N, D] item vectors -> [N, D] float32, centred by their mean, unit rows (a zero row
    stays zero)."""
    v = vectors.float()
    return torch.nn.functional.normalize(v - v.mean(0, keepdim=True), dim=1)


def history_means(items: np.ndarray, item_vectors: torch.Tensor) -> torch.Tensor:
    """Mean item vector of every row of a padded sequence batch.

    Args:
        items: [B, N] item ids, ``-1`` padding (:attr:`MixedSequences.item`).
        item_vectors: [num_items, d].

    Returns:
        [B, d]; zero for rows without events.
    """
    ids = torch.from_numpy(np.asarray(items, np.int64))
    valid = ids >= 0
    return jagged.gather_pool(item_vectors, ids[valid], valid.sum(1), "mean")


def evaluate_content_mean(data: str, content_store: str,
                          protocol_cfg: Optional[ProtocolConfig] = None,
                          split: str = "test",
                          target_actions: Optional[Sequence[str]] = None,
                          mix_cfg: Optional[MixConfig] = None,
                          field: str = "emb_token", batch_size: int = 1024,
                          progress: bool = False,
                          scenarios: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Protocol metrics of the mean-of-history content ranking (module doc).

    Args:
        data: dataset directory with ``split.json`` (evaluation cases from the whole
            log, as RED-Rec's, SASRec's and the popularity baseline's).
        content_store: a content store covering the dataset's catalogue
            (``torchrec-mm content encode``); ``field``: its vector field.
        protocol_cfg: the cases' :class:`ProtocolConfig`.
        split / target_actions: which events may be targets (as
            :func:`~torchrec_mm.redrec.popularity.evaluate_popularity`).
        mix_cfg: which events of the history are read (default 2-D mixing, last 128).
        batch_size: cases mixed at a time.
        scenarios: targets only from these scenarios (``RedRecConfig.target_scenarios``).

    Returns:
        ``{"HR@K", "NDCG@K", "MRR@K", "MRR", "num_users", "num_candidates",
        "pool_size", "seconds"}``.
    """
    from torchrec_mm.data.io import load_meta
    from torchrec_mm.redrec.train import content_vectors, eval_target_rows

    t0 = time.time()
    cfg = protocol_cfg or ProtocolConfig()
    mix_cfg = mix_cfg or MixConfig()
    num_items = load_meta(data).num_items
    vectors = centred_unit(content_vectors(content_store, field, num_items, data))
    log = EventLog.from_dataset(data)
    rows = eval_target_rows(log, data, split, target_actions, scenarios=scenarios)
    cases = make_eval_cases(log.user_offsets, log.item, log.timestamp, num_items, cfg,
                            target_rows=rows)
    if len(cases) == 0:
        raise ValueError(f"{data}: no user has a {split} event to evaluate")
    users, cut = cases.users.numpy(), cases.cutoff_time.numpy()
    means = torch.cat([history_means(mix(log, users[i:i + batch_size],
                                         cut[i:i + batch_size], mix_cfg).item, vectors)
                       for i in range(0, len(cases), batch_size)])
    out = evaluate_multi_interest(means, vectors, cases, progress=progress)
    out["seconds"] = time.time() - t0
    return out
