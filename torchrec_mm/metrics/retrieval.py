"""Retrieval metrics HR@K, NDCG@K and MRR@K (RED-Rec paper, appendix D, eq. A1–A4).

For user ``i`` with target set ``G_i`` (one or more held-out items) ranked inside a
candidate pool:

- ``HR@K   = 1/N Σ_i 1[rank_i ≤ K]`` (A1), ``rank_i`` = position (from 1) of the *first*
  target in the ranked list, so a hit means any target is in the top K;
- ``DCG_i@K = Σ_{j=1..K} rel_ij / log2(j + 1)`` (A2) with ``rel_ij = 1`` for every target;
  ``IDCG_i@K`` = the DCG of the ideal list, i.e. ``Σ_{j=1..min(|G_i|, K)} 1/log2(j + 1)``;
  ``NDCG@K = 1/N Σ_i DCG_i@K / IDCG_i@K`` (A3);
- ``MRR@K  = 1/N Σ_i 1/rank_i``, with ``1/rank_i = 0`` when ``rank_i > K`` (A4).

``N`` counts the users that have at least one target; users without targets are left
out (``num_users`` reports how many were evaluated). When ``K`` exceeds the pool size the
whole pool is the top K. A target that is not in its user's pool (``add_targets_to_pool``
off) can never be hit but still counts in ``IDCG``. Ties: a target scored exactly like a
non-target is ranked *below* it (pessimistic), so a constant scorer earns nothing.
The paper reports MRR×100 (``MRR_{*100}``); values here are fractions.

Two entry points:

- :func:`retrieval_metrics_from_scores` — a dense ``[U, C]`` score matrix and a target
  mask (vectorised torch).
- :func:`evaluate_retrieval` — user and item embeddings; a shared candidate pool is
  searched with faiss (``IndexFlatIP`` over L2-normalised vectors for ``"cosine"``; IVF or
  HNSW by option), a per-user pool is scored exactly in user chunks. Only the top
  ``max(ks)`` non-targets matter for metrics at ``K ≤ max(ks)``, so the search keeps those
  plus the user's targets and scores them exactly (float64).
"""

import math
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "DEFAULT_KS",
    "RetrievalIndexOptions",
    "evaluate_retrieval",
    "retrieval_metrics_from_scores",
    "retrieval_metrics_per_user",
]

DEFAULT_KS: Tuple[int, ...] = (10, 50, 100, 1000)
METRICS = ("cosine", "ip")
INDEXES = ("flat", "ivf", "hnsw")


def _check_ks(ks: Sequence[int]) -> Tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks: expected positive cutoffs, got {list(ks)}")
    return ks


def retrieval_metrics_per_user(
    scores: torch.Tensor,
    target_mask: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    valid_mask: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """Per-user HR/NDCG/MRR at every cutoff.

    Args:
        scores: [U, C] candidate scores (higher = better), finite where valid.
        target_mask: [U, C] bool, True for a user's targets.
        ks: cutoffs K.
        valid_mask: optional [U, C] bool; False marks padding of ragged pools. A target
            outside ``valid_mask`` is a target missing from the pool: it counts in IDCG but
            is never hit.

    Returns:
        ``{"HR@K", "NDCG@K", "MRR@K": [U] float64, "num_targets": [U] int64,
        "first_rank": [U] int64 (0 = no target in the pool)}``; users with
        ``num_targets == 0`` have NaN metrics.
    """
    ks = _check_ks(ks)
    if scores.dim() != 2 or target_mask.shape != scores.shape:
        raise ValueError(
            f"scores/target_mask: expected equal [U, C] shapes, got {tuple(scores.shape)} "
            f"and {tuple(target_mask.shape)}"
        )
    if target_mask.dtype != torch.bool:
        raise ValueError(f"target_mask: expected bool, got {target_mask.dtype}")
    s = scores.detach().to(torch.float64)
    tm = target_mask.detach().to(s.device)
    if valid_mask is None:
        valid = torch.ones_like(tm)
    else:
        if valid_mask.shape != s.shape or valid_mask.dtype != torch.bool:
            raise ValueError("valid_mask: expected a bool tensor shaped like scores")
        valid = valid_mask.detach().to(s.device)
    bad = valid & ~torch.isfinite(s)
    if bool(bad.any()):
        u, c = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"scores: {int(bad.sum())} non-finite value(s) (NaN/Inf) in valid entries; "
            f"first at user {u}, candidate {c}: {s[u, c].item()}"
        )
    num_u, num_c = s.shape
    rel = tm & valid
    s = torch.where(valid, s, torch.full_like(s, -math.inf))
    # Sort by (score desc, non-target first): stable sort by the minor key, then the major.
    o1 = torch.argsort(rel.to(torch.int8), dim=1, stable=True)
    o2 = torch.argsort(s.gather(1, o1), dim=1, descending=True, stable=True)
    rel_sorted = rel.gather(1, o1.gather(1, o2))
    kmax = max(ks)
    disc = 1.0 / torch.log2(torch.arange(2, kmax + 2, dtype=torch.float64, device=s.device))
    cum_disc = torch.cumsum(disc, 0)
    num_targets = tm.sum(1)
    has_hit = rel_sorted.any(1)
    if num_c == 0:
        first_rank = torch.zeros_like(num_targets)
    else:
        first_rank = torch.where(
            has_hit, rel_sorted.to(torch.int8).argmax(1) + 1, torch.zeros_like(num_targets)
        )
    evaluated = num_targets > 0
    nan = torch.full((num_u,), math.nan, dtype=torch.float64, device=s.device)
    out: Dict[str, torch.Tensor] = {}
    for k in ks:
        kk = min(k, num_c)
        in_k = has_hit & (first_rank <= k)
        dcg = (rel_sorted[:, :kk].to(torch.float64) * disc[:kk]).sum(1)
        ideal_n = num_targets.clamp(min=1, max=k)
        idcg = cum_disc[ideal_n - 1]
        out[f"HR@{k}"] = torch.where(evaluated, in_k.to(torch.float64), nan)
        out[f"NDCG@{k}"] = torch.where(evaluated, dcg / idcg, nan)
        rr = torch.where(in_k, 1.0 / first_rank.clamp(min=1).to(torch.float64),
                         torch.zeros_like(nan))
        out[f"MRR@{k}"] = torch.where(evaluated, rr, nan)
    out["num_targets"] = num_targets
    out["first_rank"] = first_rank
    return out


def _reduce(per_user: Dict[str, torch.Tensor], ks: Sequence[int]) -> Dict[str, float]:
    evaluated = per_user["num_targets"] > 0
    n = int(evaluated.sum())
    out: Dict[str, float] = {}
    for name in ("HR", "NDCG", "MRR"):
        for k in ks:
            v = per_user[f"{name}@{k}"][evaluated]
            out[f"{name}@{k}"] = float(v.mean()) if n else math.nan
    out["num_users"] = n
    return out


def retrieval_metrics_from_scores(
    scores: torch.Tensor,
    target_mask: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    valid_mask: Optional[torch.Tensor] = None,
) -> Dict[str, float]:
    """Mean HR@K, NDCG@K, MRR@K over users with at least one target.

    Args:
        scores: [U, C]; target_mask: [U, C] bool; ks: cutoffs; valid_mask: optional
            [U, C] bool (see :func:`retrieval_metrics_per_user`).

    Returns:
        ``{"HR@10": .., "NDCG@10": .., "MRR@10": .., ..., "num_users": N}``.
    """
    ks = _check_ks(ks)
    return _reduce(retrieval_metrics_per_user(scores, target_mask, ks, valid_mask), ks)


# --------------------------------------------------------------------------- faiss path


@dataclass
class RetrievalIndexOptions:
    """Options of the faiss index used on a shared pool.

    Attributes:
        ivf_nlist: IVF lists (at most pool size / 39); ivf_nprobe: lists probed.
        hnsw_m: HNSW graph degree; hnsw_ef_search: search beam (raised to the number of
            neighbours requested).
        seed: seed of the IVF k-means.
        batch_size: users per search / scoring chunk.
        progress: show a tqdm bar when there is more than one chunk.
    """

    ivf_nlist: int = 100
    ivf_nprobe: int = 10
    hnsw_m: int = 32
    hnsw_ef_search: int = 128
    seed: int = 0
    batch_size: int = 128
    progress: bool = True


JaggedIds = Union[torch.Tensor, Sequence[Sequence[int]], Sequence[torch.Tensor]]


def _to_padded(x: JaggedIds, name: str, num_rows: Optional[int]) -> torch.Tensor:
    """Jagged ids (list of id lists, or a 2-D tensor padded with -1, or 1-D: one id per
    row) → [R, L] int64 padded with -1."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"{name}: expected integer item ids, got {t.dtype}")
        t = t.to(torch.int64)
        if t.dim() == 1:
            t = t[:, None]
        if t.dim() != 2:
            raise ValueError(f"{name}: expected [U, L] padded ids, got shape {tuple(t.shape)}")
    else:
        rows = [torch.as_tensor(r, dtype=torch.int64).reshape(-1) for r in x]
        width = max((r.shape[0] for r in rows), default=0)
        t = torch.full((len(rows), width), -1, dtype=torch.int64)
        if rows:
            lengths = torch.tensor([r.shape[0] for r in rows])
            mask = torch.arange(width)[None, :] < lengths[:, None]
            t[mask] = torch.cat(rows) if width else t[mask]
    if num_rows is not None and t.shape[0] != num_rows:
        raise ValueError(f"{name}: {t.shape[0]} rows, expected one per user ({num_rows})")
    return t


def _is_scalar(x: Any) -> bool:
    return (isinstance(x, torch.Tensor) and x.dim() == 0) or not hasattr(x, "__len__")


def _dedupe_rows(t: torch.Tensor) -> torch.Tensor:
    """Replaces repeated ids within a row by -1 (padding)."""
    if t.shape[1] <= 1:
        return t
    srt, _ = torch.sort(t, dim=1)
    dup = torch.zeros_like(srt, dtype=torch.bool)
    dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
    return torch.where(dup, torch.full_like(srt, -1), srt)


def _check_ids(t: torch.Tensor, n: int, name: str) -> None:
    bad = (t < -1) | (t >= n)
    if bool(bad.any()):
        r, c = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"{name}: {int(bad.sum())} id(s) outside [0, {n}) (-1 = padding); first at "
            f"row {r}, position {c}: {int(t[r, c])}"
        )


def _prepare(emb: Any, name: str, metric: str, allow_3d: bool = False) -> torch.Tensor:
    e = (emb if isinstance(emb, torch.Tensor) else torch.as_tensor(emb)).detach().cpu()
    if e.dim() != 2 and not (allow_3d and e.dim() == 3):
        want = "[U, D] or [U, I, D]" if allow_3d else "[n, D]"
        raise ValueError(f"{name}: expected {want}, got shape {tuple(e.shape)}")
    e = e.to(torch.float64)
    bad = ~torch.isfinite(e).reshape(e.shape[0], -1).all(1)
    if bool(bad.any()):
        raise ValueError(
            f"{name}: {int(bad.sum())} row(s) with NaN/Inf; first row {int(bad.nonzero()[0, 0])}"
        )
    if metric == "cosine":
        e = torch.nn.functional.normalize(e, dim=-1)
    return e


def _build_index(vectors: torch.Tensor, index: str, opts: RetrievalIndexOptions) -> Any:
    import faiss

    x = vectors.to(torch.float32).contiguous().numpy()
    n, d = x.shape
    if index == "flat":
        idx = faiss.IndexFlatIP(d)
    elif index == "ivf":
        nlist = max(1, min(opts.ivf_nlist, n // 39))  # faiss wants >= 39 points per list
        quantizer = faiss.IndexFlatIP(d)
        idx = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        idx.cp.seed = opts.seed
        idx.cp.min_points_per_centroid = 1
        idx.train(x)
        idx.nprobe = max(1, min(opts.ivf_nprobe, nlist))
    else:
        idx = faiss.IndexHNSWFlat(d, opts.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    idx.add(x)
    return idx


def evaluate_retrieval(
    user_emb: Any,
    item_emb: Any,
    candidate_pools: Optional[JaggedIds],
    targets: JaggedIds,
    ks: Sequence[int] = DEFAULT_KS,
    metric: str = "cosine",
    index: str = "flat",
    options: Optional[RetrievalIndexOptions] = None,
    add_targets_to_pool: bool = True,
    return_per_user: bool = False,
) -> Dict[str, Any]:
    """HR/NDCG/MRR@K of user embeddings against item embeddings.

    Args:
        user_emb: [U, D] one vector per evaluated user, or [U, I, D] with I interest
            vectors per user (RED-Rec's multi-interest queries): an item's score is then
            the max over the user's interests. With a shared pool each interest is searched
            for the top ``max(ks) + T`` items and the union is rescored, which is exact
            for the max-score ranking (an item in the top k by max score is in the top k
            of the interest that attains its max).
        item_emb: [N, D] item vectors, indexed by item id.
        candidate_pools: ``None`` (all N items), one shared pool (1-D ids [C]), or one pool
            per user (2-D ``[U, C]`` padded with -1, or a list of U id lists).
        targets: per-user target item ids: a list of U id lists, a ``[U, T]`` tensor
            padded with -1, or 1-D ``[U]`` (one target each).
        ks: cutoffs K.
        metric: ``"cosine"`` (L2-normalised inner product, the RED-Rec score) or ``"ip"``.
        index: ``"flat"`` (exact), ``"ivf"`` or ``"hnsw"`` (approximate; shared pool only).
            Approximate search can miss high-scoring non-targets, which biases metrics up.
        options: :class:`RetrievalIndexOptions`.
        add_targets_to_pool: the RED-Rec protocol (pool = sampled items + targets). When
            False, a target outside the pool is a miss that still counts in IDCG.
        return_per_user: also return ``"per_user": {name: [U] tensor}``.

    Returns:
        ``{"HR@K", "NDCG@K", "MRR@K" for K in ks, "num_users"}`` (+ ``"per_user"``).
    """
    ks = _check_ks(ks)
    if metric not in METRICS:
        raise ValueError(f"metric: {metric!r} is not one of {METRICS}")
    if index not in INDEXES:
        raise ValueError(f"index: {index!r} is not one of {INDEXES}")
    opts = options or RetrievalIndexOptions()
    users = _prepare(user_emb, "user_emb", metric, allow_3d=True)
    items = _prepare(item_emb, "item_emb", metric)
    if users.dim() == 2:
        users = users[:, None, :]  # [U, I=1, D]
    num_u, num_i, num_n = users.shape[0], users.shape[1], items.shape[0]
    if users.shape[2] != items.shape[1]:
        raise ValueError(
            f"user_emb/item_emb: dimensions differ ({users.shape[2]} vs {items.shape[1]})"
        )
    tgt = _dedupe_rows(_to_padded(targets, "targets", num_u))
    _check_ids(tgt, num_n, "targets")
    kmax = max(ks)

    shared: Optional[torch.Tensor] = None
    per_user_pool: Optional[torch.Tensor] = None
    if candidate_pools is None:
        shared = torch.arange(num_n)
    elif isinstance(candidate_pools, torch.Tensor) and candidate_pools.dim() == 1:
        shared = candidate_pools
    elif not isinstance(candidate_pools, torch.Tensor) and (
        len(candidate_pools) == 0 or _is_scalar(candidate_pools[0])
    ):
        shared = torch.as_tensor([int(x) for x in candidate_pools], dtype=torch.int64)
    else:
        per_user_pool = _dedupe_rows(_to_padded(candidate_pools, "candidate_pools", num_u))
        _check_ids(per_user_pool, num_n, "candidate_pools")

    chunks: List[Dict[str, torch.Tensor]] = []
    short_users = 0
    k_search = 0
    if shared is not None:
        pool = shared.detach().cpu().to(torch.int64).reshape(-1)
        _check_ids(pool[None, :], num_n, "candidate_pools")
        pool = torch.unique(pool)
        in_pool = torch.zeros(num_n, dtype=torch.bool)
        in_pool[pool] = True
        k_search = min(kmax + tgt.shape[1], pool.shape[0])
        idx = _build_index(items[pool], index, opts) if k_search > 0 else None
        if idx is not None and index == "hnsw":
            idx.hnsw.efSearch = max(opts.hnsw_ef_search, k_search)
        for lo in _chunks(num_u, opts):
            hi = min(lo + opts.batch_size, num_u)
            t = tgt[lo:hi]
            if idx is not None:
                queries = users[lo:hi].reshape(-1, users.shape[2]).to(torch.float32)
                _, found = idx.search(queries.contiguous().numpy(), k_search)
                found = torch.from_numpy(found).to(torch.int64).reshape(hi - lo, -1)
                short_users += int((found < 0).any(1).sum())
                neg = torch.where(found >= 0, pool[found.clamp(min=0)], torch.full_like(found, -1))
                if num_i > 1:  # union of the interests' neighbours
                    neg = _dedupe_rows(neg)
            else:
                neg = torch.full((hi - lo, 0), -1, dtype=torch.int64)
            reachable = (t >= 0) & (add_targets_to_pool | in_pool[t.clamp(min=0)])
            chunks.append(_score_chunk(users[lo:hi], items, neg, t, reachable, ks, kmax))
    else:
        if index != "flat":
            raise ValueError(
                f"index={index!r}: approximate search needs one shared candidate pool; "
                "per-user pools are scored exactly (use index='flat')"
            )
        assert per_user_pool is not None
        for lo in _chunks(num_u, opts):
            hi = min(lo + opts.batch_size, num_u)
            t, p = tgt[lo:hi], per_user_pool[lo:hi]
            member = ((t[:, :, None] == p[:, None, :]) & (p[:, None, :] >= 0)).any(-1)
            reachable = (t >= 0) & (add_targets_to_pool | member)
            chunks.append(_score_chunk(users[lo:hi], items, p, t, reachable, ks, kmax))

    if chunks:
        per_user = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
    else:  # no users
        per_user = retrieval_metrics_per_user(
            torch.zeros(0, 0), torch.zeros(0, 0, dtype=torch.bool), ks)
    if short_users:
        warnings.warn(
            f"evaluate_retrieval: the {index!r} index returned fewer than the {k_search} "
            f"requested neighbours for {short_users} of {num_u} users; missing "
            "non-targets make the metrics optimistic (raise ivf_nprobe / hnsw_ef_search)",
            stacklevel=2,
        )
    out: Dict[str, Any] = _reduce(per_user, ks)
    if return_per_user:
        # ranks in the reduced candidate list are exact only up to max(ks)
        per_user.pop("first_rank", None)
        out["per_user"] = per_user
    return out


def _chunks(num_u: int, opts: RetrievalIndexOptions) -> Any:
    from tqdm.auto import tqdm

    starts = range(0, num_u, opts.batch_size)
    return tqdm(starts, desc="retrieval eval", unit="chunk", leave=False,
                disable=not opts.progress or len(starts) <= 1)


def _score_chunk(
    users: torch.Tensor,
    items: torch.Tensor,
    cand: torch.Tensor,
    tgt: torch.Tensor,
    reachable: torch.Tensor,
    ks: Sequence[int],
    kmax: int,
) -> Dict[str, torch.Tensor]:
    """Exact scores (max over the I interests of ``users`` [B, I, D]) of candidates
    ``cand`` [B, C] (-1 padded; targets among them are dropped) plus targets ``tgt``
    [B, T]; keeps the top ``kmax`` non-targets."""
    is_tgt = ((cand[:, :, None] == tgt[:, None, :]) & (tgt[:, None, :] >= 0)).any(-1)
    neg_valid = (cand >= 0) & ~is_tgt
    neg_scores = torch.einsum("bid,bcd->bic", users, items[cand.clamp(min=0)]).amax(1)
    neg_scores = torch.where(neg_valid, neg_scores, torch.full_like(neg_scores, -math.inf))
    if neg_scores.shape[1] > kmax:
        neg_scores, pos = torch.topk(neg_scores, kmax, dim=1)
        neg_valid = neg_valid.gather(1, pos)
    tgt_scores = torch.einsum("bid,btd->bit", users, items[tgt.clamp(min=0)]).amax(1)
    scores = torch.cat([neg_scores, tgt_scores], 1)
    target_mask = torch.cat([torch.zeros_like(neg_valid), tgt >= 0], 1)
    valid = torch.cat([neg_valid, reachable], 1)
    scores = torch.where(valid, scores, torch.zeros_like(scores))
    return retrieval_metrics_per_user(scores, target_mask, ks, valid)
