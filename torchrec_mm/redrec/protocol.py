"""The RED-Rec retrieval evaluation protocol (paper ``001_42c7267e32b49bc6`` §4.3, §5.1,
appendix D).

**Cases** (:func:`make_eval_cases`). For every user ``u`` a cutoff is drawn uniformly at
random (seeded) among the positions ``c`` of its time-ordered events with

- at least ``min_history`` events before ``c`` (the input sequence ``S_u^input``),
- at least ``min_targets`` (default 1) target-eligible events from ``c`` on,
- a strict time boundary: ``t_c > t_{c-1}``, so ``S_u^input = {events: t < t_cut}`` with
  ``t_cut = t_c`` is exactly the events before ``c``, and every target is strictly later
  than every history event (events sharing a timestamp are never split),
- event ``c`` target-eligible (``target_rows``, default every event).

The targets ``G_u`` are the items of the next ``num_targets`` (paper: 3) target-eligible
events from ``c`` on (``{i_tcut, i_tcut+1, i_tcut+2}``); an item repeated among them
counts once (``G_u`` is a set), so a user may have fewer than ``num_targets`` targets
(``-1`` padding). Users without such a cutoff are not evaluated; ``max_users`` (paper:
10,000 test users) keeps a seeded random subset.

**Candidate pool.** The paper ranks against *one* pool ``C`` "of random platform
samples" (about 1 million notes, §5.1) combined with the ground-truth targets: the
candidates of user ``u`` are ``C ∪ G_u``. ``C`` is drawn uniformly without replacement
from ``[0, num_items)`` (all items when ``pool_size >= num_items``: full-catalog
ranking) and shared by every user. A pool item that happens to be one of ``u``'s
targets is *not* removed from the catalog sample for others; for ``u`` it simply is a
target (counted once), so ``u`` has ``|C \\ G_u|`` negatives.
``pool_size`` defaults to the paper's 1,000,000 (clamped to the catalog); note that a
pool of only 1,000 would make HR@1000 = 1 trivially.

The candidate matrix of :meth:`EvalCases.candidates` is ``[U', P + T]``: columns
``0..P-1`` are the pool (entries equal to one of the user's targets replaced by ``-1``),
columns ``P..P+T-1`` the targets (``-1`` padding). ``-1`` entries are ignored.

Seeds: cutoffs, the user subset and the pool use independent streams derived from
``seed`` (``numpy.random.default_rng([seed, stream])``); the pool depends only on
``seed``, ``pool_size`` and ``num_items``, so methods evaluated on the same catalog
share it.

**Metrics** (:func:`evaluate_scores`, :func:`evaluate_multi_interest`), appendix D with
several targets, computed by :func:`torchrec_mm.metrics.retrieval.retrieval_metrics_per_user`:

- ``HR@K`` (A1): 1 if *any* target is in the top K (``rank_i`` = rank of the first
  target);
- ``NDCG@K`` (A2–A3): ``DCG = Σ_{j≤K} rel_j / log2(j+1)`` with ``rel_j = 1`` for every
  target, divided by the ideal ``IDCG = Σ_{j ≤ min(|G_u|, K)} 1/log2(j+1)``;
- ``MRR@K`` (A4): ``1/rank`` of the first target, 0 beyond K; ``MRR``: the same without a
  cutoff (the paper's "MRR" column, which it multiplies by 100; values here are
  fractions).

Ties are pessimistic: a target scored exactly like a non-target ranks below it. Means
are over evaluated users. Only the top ``max(ks)`` negatives of each user matter for the
``@K`` metrics, so each chunk keeps those plus the targets (exact).
The score is the cosine ``cos(u, v_i)`` (§4.3); for K interest vectors the max over
interests (:func:`evaluate_multi_interest`).
"""

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from torchrec_mm.metrics.retrieval import retrieval_metrics_per_user

__all__ = [
    "EvalCases",
    "ProtocolConfig",
    "ScoreFn",
    "evaluate_multi_interest",
    "evaluate_scores",
    "make_eval_cases",
]

# elements of one scoring chunk (users x candidates [x interests]) when batch_size is auto
_CHUNK_ELEMENTS = 1 << 22

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ProtocolConfig:
    """Configuration of the RED-Rec evaluation protocol.

    Attributes:
        num_targets: targets per user, the next events after the cutoff (paper: 3).
        pool_size: random catalog items in the shared candidate pool (paper: about 1
            million, §5.1); clamped to the catalog size.
        ks: cutoffs K of HR/NDCG/MRR (paper: 10, 50, 100, 1000).
        seed: seed of the cutoffs, the user subset and the pool.
        min_history: events required before the cutoff.
        min_targets: target-eligible events required from the cutoff on.
        max_users: evaluate a seeded random subset of at most this many users
            (paper: 10,000 test samples); None = every eligible user.
    """

    num_targets: int = 3
    pool_size: int = 1_000_000
    ks: Tuple[int, ...] = (10, 50, 100, 1000)
    seed: int = 0
    min_history: int = 1
    min_targets: int = 1
    max_users: Optional[int] = None

    def __post_init__(self) -> None:
        self.ks = tuple(int(k) for k in self.ks)
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"ProtocolConfig.ks: expected positive cutoffs, got {self.ks}")
        if self.num_targets < 1:
            raise ValueError(f"ProtocolConfig.num_targets: expected >= 1, got {self.num_targets}")
        if self.pool_size < 0:
            raise ValueError(f"ProtocolConfig.pool_size: expected >= 0, got {self.pool_size}")
        if self.min_history < 0:
            raise ValueError(f"ProtocolConfig.min_history: expected >= 0, got {self.min_history}")
        if not 1 <= self.min_targets <= self.num_targets:
            raise ValueError(
                f"ProtocolConfig.min_targets: expected 1..num_targets ({self.num_targets}), "
                f"got {self.min_targets}")
        if self.max_users is not None and self.max_users < 0:
            raise ValueError(f"ProtocolConfig.max_users: expected >= 0, got {self.max_users}")


@dataclass
class EvalCases:
    """Evaluation cases: one per evaluated user (``U'`` of them).

    Attributes:
        users: [U'] int64 user ids (ascending).
        cutoff_index: [U'] int64 log row of the cutoff event (the first target event);
            the input history of case ``i`` is log rows
            ``[history_start[i], cutoff_index[i])``.
        history_start: [U'] int64 first log row of the user (``log_user_offsets[u]``).
        cutoff_time: [U'] int64 ``t_cut``: history = the user's events with ``t < t_cut``.
        targets: [U', T] int64 target item ids, ``-1`` padding (distinct within a row,
            at least one per row).
        pool: [P] int64 the shared random candidate pool, ascending item ids.
        num_items: catalog size N.
        config: the :class:`ProtocolConfig` used.
    """

    users: torch.Tensor
    cutoff_index: torch.Tensor
    history_start: torch.Tensor
    cutoff_time: torch.Tensor
    targets: torch.Tensor
    pool: torch.Tensor
    num_items: int
    config: ProtocolConfig = field(default_factory=ProtocolConfig)

    def __len__(self) -> int:
        return int(self.users.shape[0])

    @property
    def num_candidates(self) -> int:
        """Columns of the candidate matrix, ``P + T``."""
        return int(self.pool.shape[0] + self.targets.shape[1])

    @property
    def history_length(self) -> torch.Tensor:
        """[U'] events before the cutoff."""
        return self.cutoff_index - self.history_start

    def pool_target_mask(self, lo: int = 0, hi: Optional[int] = None) -> torch.Tensor:
        """[R, P] bool: pool entry ``p`` is one of case ``lo + r``'s targets."""
        tg = self.targets[lo:hi]
        pool = self.pool
        out = torch.zeros(tg.shape[0], pool.shape[0], dtype=torch.bool)
        if pool.numel() == 0 or tg.numel() == 0:
            return out
        pos = torch.searchsorted(pool, tg.clamp(min=0)).clamp(max=pool.shape[0] - 1)
        hit = (pool[pos] == tg) & (tg >= 0)
        rows = torch.arange(tg.shape[0])[:, None].expand_as(tg)
        out[rows[hit], pos[hit]] = True
        return out

    def candidates(self, lo: int = 0, hi: Optional[int] = None) -> torch.Tensor:
        """[R, P + T] int64 candidate items of cases ``lo:hi`` (all by default): the pool
        with the case's own targets blanked to ``-1``, then its targets (``-1`` padded)."""
        tg = self.targets[lo:hi]
        pool = self.pool[None, :].expand(tg.shape[0], -1)
        pool = pool.masked_fill(self.pool_target_mask(lo, hi), -1)
        return torch.cat([pool, tg], 1)


# --------------------------------------------------------------------------- cases


def _int_array(x: Any, name: str) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name}: expected integers, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def _user_of(offsets: np.ndarray, row: int) -> int:
    return int(np.searchsorted(offsets, row, side="right") - 1)


def make_eval_cases(
    log_user_offsets: Any,
    item: Any,
    timestamp: Any,
    num_items: int,
    cfg: Optional[ProtocolConfig] = None,
    target_rows: Optional[Any] = None,
) -> EvalCases:
    """Draws the RED-Rec evaluation cases from an interaction log.

    Args:
        log_user_offsets: [U + 1] int CSR offsets: user ``u``'s events are log rows
            ``offsets[u]:offsets[u+1]`` (the log sorted by ``(user_id, timestamp)``, e.g.
            ``load_interaction_columns(..., sort_by_user_time=True)``).
        item: [E] int item id of each event, in ``[0, num_items)``.
        timestamp: [E] int timestamps, non-decreasing within each user.
        num_items: catalog size N (pool items are drawn from ``[0, N)``).
        cfg: :class:`ProtocolConfig` (defaults: the paper's).
        target_rows: optional [E] bool, events allowed as targets (e.g. clicks only, or
            one scenario for a "for Homefeed" evaluation); the history keeps every event.

    Returns:
        :class:`EvalCases`.

    Raises:
        ValueError: malformed inputs, naming the argument, user and row.
    """
    cfg = cfg or ProtocolConfig()
    off = _int_array(log_user_offsets, "log_user_offsets")
    it = _int_array(item, "item")
    ts = _int_array(timestamp, "timestamp")
    n_ev = it.shape[0]
    if num_items < 1:
        raise ValueError(f"num_items: expected >= 1, got {num_items}")
    if off.shape[0] < 1 or off[0] != 0 or off[-1] != n_ev:
        raise ValueError(
            f"log_user_offsets: expected [U + 1] offsets from 0 to the number of events "
            f"({n_ev}), got {off.shape[0]} value(s)"
            + (f" from {off[0]} to {off[-1]}" if off.size else ""))
    dec = np.flatnonzero(np.diff(off) < 0)
    if dec.size:
        raise ValueError(f"log_user_offsets: decreasing at user {int(dec[0])} "
                         f"({off[dec[0]]} > {off[dec[0] + 1]})")
    if ts.shape[0] != n_ev:
        raise ValueError(f"timestamp: {ts.shape[0]} values for {n_ev} events (item)")
    bad = np.flatnonzero((it < 0) | (it >= num_items))
    if bad.size:
        r = int(bad[0])
        raise ValueError(f"item: {bad.size} id(s) outside [0, {num_items}); first at row {r} "
                         f"(user {_user_of(off, r)}): {it[r]}")
    num_users = off.shape[0] - 1
    lengths = np.diff(off)
    user_of_row = np.repeat(np.arange(num_users, dtype=np.int64), lengths)
    pos = np.arange(n_ev, dtype=np.int64) - off[:-1][user_of_row]
    same_user = np.zeros(n_ev, dtype=bool)
    same_user[1:] = pos[1:] > 0
    unsorted = np.flatnonzero(same_user[1:] & (ts[1:] < ts[:-1])) + 1
    if unsorted.size:
        r = int(unsorted[0])
        raise ValueError(
            f"timestamp: not sorted within user {_user_of(off, r)}: row {r} has "
            f"{ts[r]} < {ts[r - 1]} at row {r - 1} (sort the log by (user_id, timestamp))")
    if target_rows is None:
        eligible = np.ones(n_ev, dtype=bool)
    else:
        eligible = (target_rows.detach().cpu().numpy() if isinstance(target_rows, torch.Tensor)
                    else np.asarray(target_rows))
        if eligible.dtype != bool or eligible.shape != (n_ev,):
            raise ValueError(f"target_rows: expected a bool [E={n_ev}] array, got "
                             f"{eligible.dtype} {eligible.shape}")

    # eligible events from each row to the end of its user (inclusive)
    elig_cum = np.concatenate([[0], np.cumsum(eligible)])  # [E + 1]
    user_end = off[1:][user_of_row]
    after = elig_cum[user_end] - elig_cum[np.arange(n_ev)]
    boundary = np.ones(n_ev, dtype=bool)
    boundary[1:] = ~same_user[1:] | (ts[1:] > ts[:-1])
    cut_ok = eligible & boundary & (pos >= cfg.min_history) & (after >= cfg.min_targets)
    count = np.bincount(user_of_row[cut_ok], minlength=num_users)

    draw = np.random.default_rng([cfg.seed, 0]).random(num_users)  # one draw per user
    users = np.flatnonzero(count > 0)
    if cfg.max_users is not None and users.shape[0] > cfg.max_users:
        rng_u = np.random.default_rng([cfg.seed, 2])
        users = np.sort(rng_u.choice(users, cfg.max_users, replace=False))
    choice = np.minimum((draw[users] * count[users]).astype(np.int64), count[users] - 1)
    cut_cum = np.cumsum(cut_ok)
    base = np.concatenate([[0], cut_cum])[off[:-1][users]]
    rows = np.searchsorted(cut_cum, base + choice + 1, side="left").astype(np.int64)

    # targets: the next num_targets eligible events from the cutoff row on
    t = cfg.num_targets
    elig_rows = np.flatnonzero(eligible)
    k0 = np.searchsorted(elig_rows, rows)  # eligible index of the cutoff row
    kk = k0[:, None] + np.arange(t)[None, :]
    in_range = kk < elig_rows.shape[0]
    trow = elig_rows[np.minimum(kk, elig_rows.shape[0] - 1)] if users.size else kk
    in_range &= trow < off[1:][users][:, None]  # still this user's events
    tg = np.where(in_range, it[trow], -1)
    for j in range(1, t):  # G_u is a set: blank repeats (T is small)
        dup = (tg[:, :j] == tg[:, j:j + 1]).any(1) & (tg[:, j] >= 0)
        tg[dup, j] = -1
    order = np.argsort(tg < 0, axis=1, kind="stable")  # padding last
    tg = np.take_along_axis(tg, order, 1)

    p = min(int(cfg.pool_size), int(num_items))
    if p >= num_items:
        pool = np.arange(num_items, dtype=np.int64)
    else:
        pool = np.sort(np.random.default_rng([cfg.seed, 1]).choice(num_items, p, replace=False))
    return EvalCases(
        users=torch.from_numpy(users.astype(np.int64)),
        cutoff_index=torch.from_numpy(rows),
        history_start=torch.from_numpy(off[:-1][users].copy()),
        cutoff_time=torch.from_numpy(ts[rows].copy()),
        targets=torch.from_numpy(np.ascontiguousarray(tg, dtype=np.int64)),
        pool=torch.from_numpy(pool.astype(np.int64)),
        num_items=int(num_items),
        config=cfg,
    )


# --------------------------------------------------------------------------- metrics


def _chunk_metrics(
    neg_scores: torch.Tensor,
    neg_valid: torch.Tensor,
    tgt_scores: torch.Tensor,
    tgt_valid: torch.Tensor,
    ks: Sequence[int],
) -> Dict[str, torch.Tensor]:
    """Per-user metrics of one chunk from pool scores [R, P] and target scores [R, T]."""
    kmax = max(ks)
    neg = torch.where(neg_valid, neg_scores.to(torch.float64),
                      torch.full_like(neg_scores, -math.inf, dtype=torch.float64))
    tgt = torch.where(tgt_valid, tgt_scores.to(torch.float64),
                      torch.full_like(tgt_scores, -math.inf, dtype=torch.float64))
    best = tgt.amax(1)
    rank_full = 1 + ((neg >= best[:, None]) & neg_valid).sum(1)
    kk = min(kmax, neg.shape[1])
    top = torch.topk(neg, kk, dim=1).values if kk > 0 else neg[:, :0]
    top_valid = top > -math.inf
    scores = torch.cat([top, tgt], 1)
    valid = torch.cat([top_valid, tgt_valid], 1)
    target_mask = torch.cat([torch.zeros_like(top_valid), tgt_valid], 1)
    per = retrieval_metrics_per_user(torch.where(valid, scores, torch.zeros_like(scores)),
                                     target_mask, ks, valid)
    has = tgt_valid.any(1)
    per["MRR"] = torch.where(has, 1.0 / rank_full.to(torch.float64),
                             torch.full_like(best, math.nan))
    per["rank"] = torch.where(has, rank_full, torch.zeros_like(rank_full))
    return per


def _raise_nonfinite(name: str, s: torch.Tensor, valid: torch.Tensor, cases: EvalCases,
                     lo: int, cand: torch.Tensor) -> None:
    bad = valid & ~torch.isfinite(s)
    if bool(bad.any()):
        r, c = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"{name}: {int(bad.sum())} non-finite score(s) (NaN/Inf) in this chunk; first at "
            f"case {lo + r} (user {int(cases.users[lo + r])}), candidate column {c} "
            f"(item {int(cand[r, c])}): {float(s[r, c])}")


def _reduce(chunks: List[Dict[str, torch.Tensor]], ks: Sequence[int], cases: EvalCases,
            return_per_user: bool) -> Dict[str, Any]:
    keys = [f"{m}@{k}" for m in ("HR", "NDCG", "MRR") for k in ks] + ["MRR", "num_targets",
                                                                         "rank"]
    if chunks:
        per = {k: torch.cat([c[k] for c in chunks]) for k in keys}
    else:
        per = {k: torch.zeros(0, dtype=torch.float64) for k in keys}
    evaluated = per["num_targets"] > 0 if chunks else torch.zeros(0, dtype=torch.bool)
    n = int(evaluated.sum())
    out: Dict[str, Any] = {}
    for k in keys[:-2]:
        out[k] = float(per[k][evaluated].mean()) if n else math.nan
    out["num_users"] = n
    out["num_candidates"] = cases.num_candidates
    out["pool_size"] = int(cases.pool.shape[0])
    if return_per_user:
        out["per_user"] = per
    return out


def _ks(ks: Optional[Sequence[int]], cases: EvalCases) -> Tuple[int, ...]:
    ks = tuple(int(k) for k in (ks if ks is not None else cases.config.ks))
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks: expected positive cutoffs, got {list(ks)}")
    return ks


def _chunk_starts(n: int, batch_size: int, progress: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    starts = range(0, n, batch_size)
    return tqdm(starts, desc=desc, unit="chunk", leave=False,
                disable=not progress or len(starts) <= 1)


def evaluate_scores(
    scores: Union[torch.Tensor, ScoreFn],
    cases: EvalCases,
    ks: Optional[Sequence[int]] = None,
    batch_size: Optional[int] = None,
    progress: bool = True,
    return_per_user: bool = False,
) -> Dict[str, Any]:
    """HR@K, NDCG@K, MRR@K and MRR of arbitrary scores under the RED-Rec protocol.

    Args:
        scores: either a [U', P + T] tensor whose column ``j`` scores
            ``cases.candidates()[:, j]`` (higher = better), or a callable
            ``score_fn(users [R] int64, candidates [R, P + T] int64) -> [R, P + T]``
            called on chunks of cases (``users`` = ``cases.users[lo:hi]``; users are
            unique and ascending, so ``torch.searchsorted(cases.users, users)`` gives the
            case rows, e.g. to find ``cases.cutoff_time``). Scores at ``-1`` candidates
            are ignored (may be anything); every other score must be finite.
        cases: from :func:`make_eval_cases`.
        ks: cutoffs (default ``cases.config.ks``).
        batch_size: cases per chunk (default: about 4M scores per chunk).
        progress: tqdm bar over chunks.
        return_per_user: also return ``"per_user"``: ``{metric: [U'] tensor, "rank": [U']
            rank of the first target, "num_targets": [U']}``.

    Returns:
        ``{"HR@K", "NDCG@K", "MRR@K" for K in ks, "MRR", "num_users", "num_candidates",
        "pool_size"}`` (fractions, means over the evaluated users).
    """
    ks = _ks(ks, cases)
    u, c = len(cases), cases.num_candidates
    p = int(cases.pool.shape[0])
    if isinstance(scores, torch.Tensor):
        if scores.shape != (u, c):
            raise ValueError(f"scores: expected [U'={u}, P+T={c}] (one row per case, one "
                             f"column per candidate), got {tuple(scores.shape)}")
        if scores.dtype == torch.bool or scores.is_complex():
            raise ValueError(f"scores: expected real scores, got {scores.dtype}")
    elif not callable(scores):
        raise TypeError(f"scores: expected a [U', P+T] tensor or a callable, got "
                        f"{type(scores).__name__}")
    bs = int(batch_size) if batch_size else max(1, _CHUNK_ELEMENTS // max(c, 1))
    if bs < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    chunks: List[Dict[str, torch.Tensor]] = []
    for lo in _chunk_starts(u, bs, progress, "redrec eval"):
        hi = min(lo + bs, u)
        cand = cases.candidates(lo, hi)
        if isinstance(scores, torch.Tensor):
            s = scores[lo:hi].detach().cpu()
        else:
            s = scores(cases.users[lo:hi], cand)
            if not isinstance(s, torch.Tensor) or s.shape != cand.shape:
                raise ValueError(
                    f"score_fn: expected a [{hi - lo}, {c}] tensor for cases {lo}:{hi}, got "
                    f"{tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__}")
            s = s.detach().cpu()
        s = s.to(torch.float64)
        valid = cand >= 0
        _raise_nonfinite("scores", s, valid, cases, lo, cand)
        chunks.append(_chunk_metrics(s[:, :p], valid[:, :p], s[:, p:], valid[:, p:], ks))
    return _reduce(chunks, ks, cases, return_per_user)


def evaluate_multi_interest(
    user_vecs: torch.Tensor,
    item_emb: torch.Tensor,
    cases: EvalCases,
    ks: Optional[Sequence[int]] = None,
    batch_size: Optional[int] = None,
    progress: bool = True,
    return_per_user: bool = False,
    item_bias: Optional[torch.Tensor] = None,
    scale: float = 1.0,
) -> Dict[str, Any]:
    """Protocol metrics of a (multi-interest) two-tower model: the score of item ``i``
    for case ``u`` is ``max_k cos(user_vecs[u, k], item_emb[i])`` (§4.3 with the max over
    interests, the usual multi-interest retrieval rule), computed exactly in chunks;
    with ``item_bias`` [N] it is ``scale · max_k cos + item_bias[i]`` (a model trained
    with an item bias: ``scale`` = 1/τ, the training logit).

    Args:
        user_vecs: [U', K, d] interest vectors per case (row ``i`` = ``cases.users[i]``
            with its history cut at ``cases.cutoff_time[i]``), or [U', d] single vectors.
        item_emb: [N, d] item vectors indexed by item id (N = ``cases.num_items``).
        cases, ks, batch_size, progress, return_per_user: as in :func:`evaluate_scores`.
        item_bias / scale: see above.

    Returns:
        As :func:`evaluate_scores`, plus the merge diagnostics ``interest_top1_share``
        ([K] list: the share of cases whose top pool item came from interest k),
        ``distinct_top10_items`` (distinct pool items over every case's top 10: how
        personal the head of the ranking is) and ``interest_user_cosine`` ([K] list:
        the mean cosine between two cases' interest-k vectors; 1.0: the same for
        everyone).
    """
    ks = _ks(ks, cases)
    if not isinstance(user_vecs, torch.Tensor) or user_vecs.dim() not in (2, 3):
        raise ValueError(f"user_vecs: expected [U', K, d] or [U', d], got "
                         f"{getattr(user_vecs, 'shape', type(user_vecs).__name__)}")
    if not isinstance(item_emb, torch.Tensor) or item_emb.dim() != 2:
        raise ValueError(f"item_emb: expected [N, d], got "
                         f"{getattr(item_emb, 'shape', type(item_emb).__name__)}")
    uv = user_vecs.detach().cpu()
    if uv.dim() == 2:
        uv = uv[:, None, :]
    u, k, d = uv.shape
    if u != len(cases):
        raise ValueError(f"user_vecs: {u} rows for {len(cases)} cases")
    if k == 0:
        raise ValueError("user_vecs: K = 0 interest vectors")
    if item_emb.shape[0] != cases.num_items or item_emb.shape[1] != d:
        raise ValueError(f"item_emb: expected [N={cases.num_items}, d={d}], got "
                         f"{tuple(item_emb.shape)}")
    dtype = torch.promote_types(torch.promote_types(uv.dtype, item_emb.dtype), torch.float32)
    if not dtype.is_floating_point:
        raise ValueError(f"user_vecs/item_emb: expected floating point, got {dtype}")
    bad_u = ~torch.isfinite(uv).flatten(1).all(1)
    if bool(bad_u.any()):
        i = int(bad_u.nonzero()[0, 0])
        raise ValueError(f"user_vecs: {int(bad_u.sum())} case(s) with NaN/Inf; first case {i} "
                         f"(user {int(cases.users[i])})")
    items = item_emb.detach().cpu()
    needed = torch.unique(torch.cat([cases.pool, cases.targets[cases.targets >= 0]]))
    bad_i = ~torch.isfinite(items[needed]).all(1)
    if bool(bad_i.any()):
        raise ValueError(f"item_emb: {int(bad_i.sum())} candidate item(s) with NaN/Inf; first "
                         f"item {int(needed[bad_i][0])}")
    bias = None
    if item_bias is not None:
        bias = item_bias.detach().cpu().to(dtype).flatten()
        if bias.numel() != cases.num_items:
            raise ValueError(f"item_bias: expected {cases.num_items} finite values, got "
                             f"{bias.numel()}")
        if not bool(torch.isfinite(bias).all()):
            raise ValueError(f"item_bias: expected {cases.num_items} finite values, got "
                             f"NaN/Inf at item {int((~torch.isfinite(bias)).nonzero()[0, 0])}")
    uv = F.normalize(uv.to(dtype), dim=-1)
    pool_emb = F.normalize(items[cases.pool].to(dtype), dim=-1)  # [P, d]
    p, t = int(cases.pool.shape[0]), int(cases.targets.shape[1])
    bs = int(batch_size) if batch_size else max(1, _CHUNK_ELEMENTS // max(k * (p + t), 1))
    if bs < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    chunks: List[Dict[str, torch.Tensor]] = []
    top_interest = torch.zeros(k, dtype=torch.long)
    top_items: List[torch.Tensor] = []
    for lo in _chunk_starts(u, bs, progress, "redrec eval"):
        hi = min(lo + bs, u)
        q = uv[lo:hi]  # [R, K, d]
        tg = cases.targets[lo:hi]
        per_interest = torch.einsum("rkd,pd->rkp", q, pool_emb)
        neg, winner = per_interest.max(1)  # [R, P]: merged score, interest that gives it
        tgt_emb = F.normalize(items[tg.clamp(min=0)].to(dtype), dim=-1)  # [R, T, d]
        pos = torch.einsum("rkd,rtd->rkt", q, tgt_emb).amax(1)
        if bias is not None:
            neg = neg * scale + bias[cases.pool]
            pos = pos * scale + bias[tg.clamp(min=0)]
        pool_ok = ~cases.pool_target_mask(lo, hi)
        chunks.append(_chunk_metrics(neg, pool_ok, pos, tg >= 0, ks))
        top = neg.masked_fill(~pool_ok, -math.inf).topk(min(_TOP, p), dim=1).indices
        top_interest += torch.bincount(winner.gather(1, top[:, :1]).flatten(), minlength=k)
        top_items.append(cases.pool[top].flatten())
    out = _reduce(chunks, ks, cases, return_per_user)
    out.update(_personalisation(uv, top_interest, top_items))
    return out


#: the head whose spread over the cases :func:`evaluate_multi_interest` reports
_TOP = 10


def _personalisation(uv: torch.Tensor, top_interest: torch.Tensor,
                     top_items: List[torch.Tensor]) -> Dict[str, Any]:
    """How much the ranking depends on the user, from the [U', K, d] unit interests, the
    [K] count of cases whose top pool item each interest gave and every case's top
    items:

    * ``interest_user_cosine`` [K] — the mean cosine between two cases' interest-k
      vectors, ``(|Σ_u v_uk|² - U') / (U'(U' - 1))``: 1.0 means the tower gives every
      user the same interest whatever the history (NaN with one case);
    * ``interest_top1_share`` [K] — the share of cases whose top-ranked pool item came
      from interest k (one interest near 1.0: the others never surface in the merged
      list);
    * ``distinct_top10_items`` — distinct pool items over every case's top 10 (a ranking
      that is the same for everyone has 10).
    """
    n, k = uv.shape[0], uv.shape[1]
    total = uv.double().sum(0)  # [K, d]
    cosine = (((total.pow(2).sum(1) - n) / (n * (n - 1))).tolist() if n > 1
              else [math.nan] * k)
    distinct = int(torch.unique(torch.cat(top_items)).numel()) if top_items else 0
    return {"interest_user_cosine": cosine,
            "interest_top1_share": (top_interest.double() / max(n, 1)).tolist(),
            f"distinct_top{_TOP}_items": distinct}
