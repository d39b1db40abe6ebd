"""QARM item alignment, step 1: mining the item2item pair dataset D (paper §2.2).

The paper fine-tunes the content model on item pairs from two sources:

* **history** (source a, :func:`pairs_from_history`): for every positive (clicked)
  target item of a user, the trigger is the most similar item — cosine in the ID
  embedding space of the retrieval/ranking model — among the user's latest ``window``
  (50) positives strictly before the target;
* **swing** (source b, :func:`swing` + :func:`pairs_from_swing`): stable high-similarity
  pairs of an item2item model; here our own Swing (Yang et al., "Large Scale Product
  Graph Construction for Recommendation in E-commerce", 2020).

:func:`mine_pairs` runs both on the train split of a canonical dataset and returns the
deduplicated pair list.

Swing, exactly as implemented. Let ``G`` be the user–item graph after the caps below,
``I_u`` the item set of user ``u`` in ``G`` and ``U_i`` the user set of item ``i``::

    sim(i, j) = sum over unordered user pairs {u, v}, u != v, u, v in U_i ∩ U_j of
                w_u * w_v / (alpha + |I_u ∩ I_v|)

    w_u = 1 / sqrt(|I_u|)   if SwingConfig.user_weight else 1

Each unordered pair is counted once (the ordered double sum of the Swing paper is
exactly twice this; neighbour rankings are the same). ``sim`` is symmetric and
``sim(i, i)`` is never reported. ``G`` is built from the input rows as follows:

1. duplicates of a (user, item) edge are merged, the edge keeps its latest timestamp;
2. every user keeps her ``max_items_per_user`` latest items (by timestamp; equal
   timestamps: the larger item id counts as later);
3. every item keeps ``max_users_per_item`` users drawn without replacement: the edges,
   in (item, user) order, get keys ``numpy.random.default_rng(seed).random(n_edges)``
   and each item keeps its users with the smallest keys.

``|I_u|``, ``U_i`` and ``|I_u ∩ I_v|`` are all taken in the final ``G``.
"""

import logging
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp

logger = logging.getLogger(__name__)

SOURCES = ("history", "swing")
SOURCE_CODES: Dict[str, int] = {"history": 0, "swing": 1}


# --------------------------------------------------------------------------- config


@dataclass
class SwingConfig:
    """Configuration of :func:`swing` (see the module docstring for the formula).

    Attributes:
        alpha: smoothing ``alpha`` in ``1 / (alpha + |I_u ∩ I_v|)`` (>= 0).
        user_weight: multiply each user pair by ``w_u * w_v`` with
            ``w_u = 1 / sqrt(|I_u|)`` (the common variant that damps heavy users).
        max_items_per_user: each user keeps her latest positives only.
        max_users_per_item: each item keeps a seeded sample of its users; bounds the
            number of user pairs per item to ``max_users_per_item**2 / 2``.
        top_k: neighbours kept per item.
        seed: seed of the user sampling.
        work_per_chunk: items are processed in chunks of about this many sparse
            multiply-adds; bounds the memory of a chunk (roughly
            ``40 bytes * work_per_chunk``).
        max_pair_entries: the pair × item matrix ``B`` (``sum_i |U_i|(|U_i|-1)/2``
            entries, about 40 bytes each while built) is built whole up to this size;
            above it :func:`swing` intersects item sets chunk by chunk (slower).
    """

    alpha: float = 1.0
    user_weight: bool = True
    max_items_per_user: int = 200
    max_users_per_item: int = 300
    top_k: int = 50
    seed: int = 0
    work_per_chunk: int = 4_000_000
    max_pair_entries: int = 20_000_000

    def validate(self) -> None:
        if not (self.alpha >= 0 and np.isfinite(self.alpha)):
            raise ValueError(f"SwingConfig.alpha must be a finite number >= 0, got {self.alpha}")
        for name in ("max_items_per_user", "max_users_per_item", "top_k", "work_per_chunk",
                     "max_pair_entries"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SwingConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class ItemNeighbors:
    """Top-k item2item neighbours.

    Attributes:
        idx: [N, top_k] int64 neighbour ids, best first, ``-1`` padded.
        score: [N, top_k] float32 similarities (0 where ``idx == -1``).
    """

    idx: np.ndarray
    score: np.ndarray

    @property
    def num_items(self) -> int:
        return int(self.idx.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.idx.shape[1])


# --------------------------------------------------------------------------- input checks


def _int_array(values: Any, name: str, n: Optional[int] = None) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"'{name}' must be 1-D, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"'{name}' has {arr.shape[0]} rows but 'user' has {n} "
                         "(all interaction columns must have the same length)")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"'{name}' must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_range(arr: np.ndarray, name: str, hi: Optional[int]) -> None:
    bad = arr < 0 if hi is None else (arr < 0) | (arr >= hi)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        rng = "must be >= 0" if hi is None else f"is out of range [0, {hi})"
        raise ValueError(f"'{name}' row {r}: id {int(arr[r])} {rng}")


def _check_log(user: Any, item: Any, timestamp: Any, num_items: int,
               positive: Any = None) -> Tuple[np.ndarray, ...]:
    """Validates interaction columns; returns them as int64 (and bool) arrays."""
    u = _int_array(user, "user")
    n = u.shape[0]
    i = _int_array(item, "item", n)
    t = _int_array(timestamp, "timestamp", n)
    _check_range(u, "user", None)
    _check_range(i, "item", int(num_items))
    if positive is None:
        return u, i, t
    p = np.asarray(positive)
    if p.ndim != 1 or p.shape[0] != n:
        raise ValueError(f"'positive' has shape {p.shape} but 'user' has {n} rows")
    if p.dtype != np.bool_:
        if p.size and not np.isin(p, (0, 1)).all():
            r = int(np.flatnonzero(~np.isin(p, (0, 1)))[0])
            raise ValueError(f"'positive' row {r}: {p[r]!r} is not a boolean / 0-1 flag")
        p = p.astype(bool)
    return u, i, t, p


def _check_emb(item_emb: Any) -> np.ndarray:
    if hasattr(item_emb, "detach"):  # torch.Tensor
        item_emb = item_emb.detach().cpu().numpy()
    e = np.asarray(item_emb)
    if e.ndim != 2:
        raise ValueError(f"'item_emb' must be [num_items, d], got shape {e.shape}")
    if not np.issubdtype(e.dtype, np.floating):
        e = e.astype(np.float32)
    bad = ~np.isfinite(e).all(axis=1)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise ValueError(f"'item_emb' row {r} (item {r}) has NaN or inf values")
    return e


def _normalize(e: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (float32); zero rows stay zero (cosine 0 with anything)."""
    e = e.astype(np.float64)
    norm = np.linalg.norm(e, axis=1, keepdims=True)
    return (e / np.where(norm > 0, norm, 1.0)).astype(np.float32)


# --------------------------------------------------------------------------- helpers


def _concat_ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """``concat([arange(s, s + l) for s, l in zip(starts, lens)])``, vectorised."""
    lens = lens.astype(np.int64)
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offs = np.cumsum(lens) - lens
    return np.repeat(starts.astype(np.int64) - offs, lens) + np.arange(total, dtype=np.int64)


def _group_start(*keys: np.ndarray) -> np.ndarray:
    """For rows sorted by ``keys``: index of the first row of each row's run of equal keys."""
    n = keys[0].shape[0]
    new = np.ones(n, bool)
    if n > 1:
        diff = np.zeros(n - 1, bool)
        for k in keys:
            diff |= k[1:] != k[:-1]
        new[1:] = diff
    return np.maximum.accumulate(np.where(new, np.arange(n), 0)) if n else np.zeros(0, np.int64)


# --------------------------------------------------------------------------- swing


def _swing_graph(user: np.ndarray, item: np.ndarray, timestamp: np.ndarray,
                 cfg: SwingConfig) -> Tuple[np.ndarray, np.ndarray, int]:
    """Edges of the capped graph G (module docstring, steps 1-3).

    Returns:
        (u, i, num_users): [M] compact user ids in ``[0, num_users)`` and [M] item ids.
    """
    _, u = np.unique(user, return_inverse=True)
    u = u.reshape(-1).astype(np.int64)
    num_users = int(u.max()) + 1 if u.size else 0
    # 1. merge duplicate edges, keep the latest timestamp
    o = np.lexsort((timestamp, item, u))
    us, its, ts = u[o], item[o], timestamp[o]
    last = np.ones(us.shape[0], bool)
    last[:-1] = (us[1:] != us[:-1]) | (its[1:] != its[:-1])
    us, its, ts = us[last], its[last], ts[last]
    # 2. each user keeps her latest max_items_per_user items
    o = np.lexsort((its, ts, us))
    us, its = us[o], its[o]
    end = np.searchsorted(us, us, side="right")
    keep = end - np.arange(us.shape[0]) - 1 < cfg.max_items_per_user
    us, its = us[keep], its[keep]
    # 3. each item keeps a seeded sample of max_users_per_item users
    o = np.lexsort((us, its))
    us, its = us[o], its[o]
    key = np.random.default_rng(cfg.seed).random(us.shape[0])
    o = np.lexsort((key, its))
    rank = np.arange(us.shape[0]) - _group_start(its[o])
    sel = o[rank < cfg.max_users_per_item]
    return us[sel], its[sel], num_users


def _topk_rows(sim: sp.csr_matrix, rows: np.ndarray, k: int, idx: np.ndarray,
               score: np.ndarray) -> None:
    """Writes the top-k entries of every row of ``sim`` (positive values) into
    ``idx[rows[r]]`` / ``score[rows[r]]``: float32 score descending, ties by column.

    One stable int64 sort: key = row << 31 | (2**31 - 1 - float32 bits of the score)
    (the bit pattern of a positive float32 is monotone in its value), with the
    columns sorted inside each row beforehand for the tie order.
    """
    sim.sort_indices()
    counts = np.diff(sim.indptr)
    r = np.repeat(np.arange(sim.shape[0], dtype=np.int64), counts)
    val = sim.data.astype(np.float32)
    key = (r << 31) | (np.int64(2**31 - 1) - val.view(np.int32).astype(np.int64))
    o = np.argsort(key, kind="stable")
    rank = np.arange(r.shape[0]) - sim.indptr[r]  # r is sorted, so o keeps row blocks
    keep = rank < k
    sel = o[keep]
    idx[rows[r[keep]], rank[keep]] = sim.indices[sel]
    score[rows[r[keep]], rank[keep]] = val[sel]


def swing(user: Any, item: Any, timestamp: Any, num_items: int,
          cfg: Optional[SwingConfig] = None, progress: bool = False) -> ItemNeighbors:
    """Swing item2item similarity, top-k neighbours of every item.

    Pass positive interactions only (e.g. clicks of the train split). Sparse-matrix
    based. The user pairs ``{u, v}`` sharing an item are enumerated per item
    (vectorised); they are the rows of a sparse pair × item matrix ``B`` whose row
    ``{u, v}`` holds ``I_u ∩ I_v``, so that, with ``S = diag(w_u w_v / (alpha + |I_u ∩ I_v|))``,
    ``sim = B^T S B``, computed for chunks of items (rows) at a time and reduced to the
    top-k right away.

    Building ``B`` enumerates ``T = sum_i |U_i| (|U_i| - 1) / 2`` (pair, item) entries
    (pairs with a single common item are then dropped: they only add to ``sim(i, i)``).
    When ``T`` exceeds ``cfg.max_pair_entries``, ``B`` is never built whole: each item
    chunk enumerates its own pairs and intersects their item rows (``A[u] ⊙ A[v]``),
    slower but bounded by ``cfg.work_per_chunk``.

    Args:
        user: [E] int64 user ids (any non-negative ids).
        item: [E] int64 item ids in ``[0, num_items)``.
        timestamp: [E] int64 interaction times (for the per-user cap).
        num_items: N.
        cfg: :class:`SwingConfig`.
        progress: show a tqdm bar over item chunks.

    Returns:
        :class:`ItemNeighbors` with ``idx``/``score`` [N, top_k]; ties in score are
        ordered by neighbour id.
    """
    cfg = cfg or SwingConfig()
    cfg.validate()
    num_items = int(num_items)
    user, item, timestamp = _check_log(user, item, timestamp, num_items)
    k = int(cfg.top_k)
    idx = np.full((num_items, k), -1, np.int64)
    score = np.zeros((num_items, k), np.float32)
    u, i, num_users = _swing_graph(user, item, timestamp, cfg)
    if u.size == 0:
        return ItemNeighbors(idx, score)
    A = sp.csr_matrix((np.ones(u.shape[0]), (u, i)), shape=(num_users, num_items))
    At = A.T.tocsr()
    At.sort_indices()
    deg = np.diff(A.indptr).astype(np.float64)
    w = 1.0 / np.sqrt(np.maximum(deg, 1.0)) if cfg.user_weight else np.ones(num_users)
    n = np.diff(At.indptr).astype(np.int64)
    active = np.flatnonzero(n >= 2)
    alpha = float(cfg.alpha)

    if int((n * (n - 1) // 2).sum()) <= cfg.max_pair_entries:
        B, Bt = _pair_item_matrix(At, active, w, alpha, num_users)
        work = Bt @ np.diff(B.indptr).astype(np.float64)  # sum over pairs of |I_u ∩ I_v|
        chunk_sim = lambda c: _drop_diagonal(Bt[c] @ B, c)  # noqa: E731
    else:
        # estimated work of an item: (|U_i| - 1) * sum_{u in U_i} |I_u|
        work = np.maximum(n - 1, 0) * np.bincount(i, weights=deg[u], minlength=num_items)
        chunk_sim = lambda c: _swing_chunk(A, At, w, c, num_users, alpha)  # noqa: E731
    chunks = _split_by_work(active, work[active], cfg.work_per_chunk)
    if progress:
        from tqdm import tqdm
        chunks = tqdm(chunks, desc="swing", unit="chunk")
    for c in chunks:
        sim = chunk_sim(c)
        if sim.nnz:
            _topk_rows(sim, c, k, idx, score)
    return ItemNeighbors(idx, score)


def _split_by_work(items: np.ndarray, work: np.ndarray, budget: int) -> list:
    """Consecutive chunks of ``items``; a chunk's summed ``work`` is below ``budget``
    plus the work of its first item."""
    if items.size == 0:
        return []
    cum = np.cumsum(work)
    chunk_id = np.maximum(cum - 1, 0) // max(int(budget), 1)
    return np.split(items, np.flatnonzero(np.diff(chunk_id)) + 1)


def _item_user_pairs(At: sp.csr_matrix, items: np.ndarray
                     ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All user pairs ``u < v`` of ``U_i`` for every ``i`` in ``items``.

    Returns:
        (ua, ub, of_item): [T] int64 each, ``T = sum_i |U_i| (|U_i| - 1) / 2``, grouped
        by item in the order of ``items``.
    """
    starts, ends = At.indptr[items].astype(np.int64), At.indptr[items + 1].astype(np.int64)
    # every member position p of every item's (sorted) user list, partners p+1 .. end-1
    pos = _concat_ranges(starts, ends - starts)
    n_partner = np.repeat(ends, ends - starts) - pos - 1
    first = np.repeat(pos, n_partner)
    second = first + 1 + _concat_ranges(np.zeros(pos.shape[0], np.int64), n_partner)
    n = ends - starts
    of_item = np.repeat(items.astype(np.int64), n * (n - 1) // 2)
    return At.indices[first].astype(np.int64), At.indices[second].astype(np.int64), of_item


def _pair_item_matrix(At: sp.csr_matrix, items: np.ndarray, w: np.ndarray, alpha: float,
                      num_users: int) -> Tuple[sp.csr_matrix, sp.csr_matrix]:
    """``S B`` [P, N] (row ``{u, v}``: ``w_u w_v / (alpha + |I_u ∩ I_v|)`` on the items
    of ``I_u ∩ I_v``) and the 0/1 ``B^T`` [N, P], over the user pairs sharing at least
    two items (a pair with a single common item only adds to ``sim(i, i)``)."""
    num_items = At.shape[0]
    ua, ub, j = _item_user_pairs(At, items)
    key = ua * num_users + ub
    del ua, ub
    o = np.argsort(key)  # the order of the items inside a pair does not matter
    key, j = key[o], j[o]
    del o
    new = np.ones(key.shape[0], bool)
    new[1:] = key[1:] != key[:-1]
    pid = np.cumsum(new) - 1
    common = np.bincount(pid)
    kept = common >= 2
    rows = kept[pid]
    pid = (np.cumsum(kept) - 1)[pid[rows]]
    key, common = key[new][kept], common[kept]
    pu, pv = key // num_users, key % num_users
    s = w[pu] * w[pv] / (alpha + common)
    indptr = np.concatenate([[0], np.cumsum(common)])
    SB = sp.csr_matrix((s[pid], j[rows], indptr), shape=(pu.shape[0], num_items))
    Bt = sp.csr_matrix((np.ones(SB.nnz), SB.indices, SB.indptr), shape=SB.shape).T.tocsr()
    return SB, Bt


def _drop_diagonal(sim: sp.spmatrix, c: np.ndarray) -> sp.csr_matrix:
    """Removes ``sim[r, c[r]]`` (the similarity of an item with itself)."""
    sim = sim.tocsr()
    r = np.repeat(np.arange(sim.shape[0]), np.diff(sim.indptr))
    sim.data[sim.indices == c[r]] = 0.0
    sim.eliminate_zeros()
    return sim


def _swing_chunk(A: sp.csr_matrix, At: sp.csr_matrix, w: np.ndarray, c: np.ndarray,
                 num_users: int, alpha: float) -> sp.csr_matrix:
    """``sim[c, :]`` [|c|, N] from the chunk's own user pairs (no global ``B``)."""
    ua, ub, _ = _item_user_pairs(At, c)
    pair = np.unique(ua * num_users + ub)  # ua < ub: each item's user list is sorted
    ua, ub = pair // num_users, pair % num_users
    B = A[ua].multiply(A[ub]).tocsr()  # row p: items common to ua[p] and ub[p]
    B.eliminate_zeros()
    common = np.diff(B.indptr)
    s = w[ua] * w[ub] / (alpha + common)
    SB = sp.csr_matrix((np.repeat(s, common), B.indices, B.indptr), shape=B.shape)
    return _drop_diagonal(B[:, c].T.tocsr() @ SB, c)


def swing_reference(user: Any, item: Any, timestamp: Any, num_items: int,
                    cfg: Optional[SwingConfig] = None) -> Dict[int, Dict[int, float]]:
    """Straightforward Python loops implementing the module docstring's Swing (for tests).

    Returns:
        ``{i: {j: sim(i, j)}}`` for every pair with a non-zero similarity, ``j != i``.
    """
    cfg = cfg or SwingConfig()
    user, item, timestamp = _check_log(user, item, timestamp, num_items)
    latest: Dict[Tuple[int, int], int] = {}
    for u, i, t in zip(user.tolist(), item.tolist(), timestamp.tolist()):
        if (u, i) not in latest or t > latest[(u, i)]:
            latest[(u, i)] = t
    items_of: Dict[int, list] = {}
    for (u, i), t in latest.items():
        items_of.setdefault(u, []).append((t, i))
    edges = []
    for u, lst in items_of.items():
        lst.sort(reverse=True)  # latest first; equal times: larger item first
        edges.extend((i, u) for _, i in lst[: cfg.max_items_per_user])
    edges.sort()
    keys = np.random.default_rng(cfg.seed).random(len(edges))
    users_of: Dict[int, list] = {}
    for (i, u), key in zip(edges, keys.tolist()):
        users_of.setdefault(i, []).append((key, u))
    I: Dict[int, set] = {}
    U: Dict[int, list] = {}
    for i, lst in users_of.items():
        lst.sort()
        U[i] = sorted(u for _, u in lst[: cfg.max_users_per_item])
        for u in U[i]:
            I.setdefault(u, set()).add(i)
    wt = {u: (1.0 / np.sqrt(len(s)) if cfg.user_weight else 1.0) for u, s in I.items()}
    sim: Dict[int, Dict[int, float]] = {}
    for i, us in U.items():
        for a in range(len(us)):
            for b in range(a + 1, len(us)):
                u, v = us[a], us[b]
                common = I[u] & I[v]
                contrib = wt[u] * wt[v] / (cfg.alpha + len(common))
                for j in common:
                    if j != i:
                        row = sim.setdefault(i, {})
                        row[j] = row.get(j, 0.0) + contrib
    return sim


def pairs_from_swing(nb: ItemNeighbors, per_item: int = 1,
                     min_score: float = 0.0) -> Tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)`` of every item ``i`` with its ``per_item`` best Swing neighbours
    ``j`` whose score is ``> min_score``.

    Returns:
        (a, b): [P] int64 item ids (a = the item, b = its neighbour), ordered by item,
        then rank.
    """
    if per_item < 1:
        raise ValueError(f"per_item must be >= 1, got {per_item}")
    idx, score = nb.idx[:, :per_item], nb.score[:, :per_item]
    ok = (idx >= 0) & (score > min_score)
    a = np.broadcast_to(np.arange(nb.num_items, dtype=np.int64)[:, None], idx.shape)[ok]
    return a.copy(), idx[ok].astype(np.int64)


# --------------------------------------------------------------------------- history


def _history_layout(user: np.ndarray, item: np.ndarray, timestamp: np.ndarray,
                    positive: np.ndarray, window: int) -> Dict[str, np.ndarray]:
    """Positive rows sorted by (user, timestamp) (stable: equal times keep input order)
    with, per row, ``s`` (first sorted position of its (user, time) run: candidates are
    the positions before it) and ``lo`` (first allowed candidate position)."""
    rows = np.flatnonzero(positive)
    u, t = user[rows], timestamp[rows]
    o = np.lexsort((t, u))
    rows, u, t = rows[o], u[o], t[o]
    s = _group_start(u, t)
    lo = np.maximum(_group_start(u), s - window)
    return {"rows": rows, "item": item[rows], "s": s, "lo": lo}


def pairs_from_history(user: Any, item: Any, timestamp: Any, positive: Any,
                       item_emb: Any, window: int = 50, chunk: int = 65536,
                       block: int = 64) -> Tuple[np.ndarray, np.ndarray]:
    """Paper source (a): for every positive row ``(u, i, t)`` the trigger is the item
    most similar to ``i`` (cosine in ``item_emb``) among ``u``'s latest ``window``
    positive rows with timestamp strictly before ``t``, rows of item ``i`` itself
    excluded (they still take a place in the window).

    Conventions: rows with equal timestamps are never candidates of each other; among
    earlier rows with equal timestamps, the later input row counts as later (for the
    window cut); equal cosines go to the most recent candidate; zero embedding rows
    have cosine 0 with everything. Rows without a candidate give no pair.

    Vectorised: positives are sorted by (user, time), so the candidates of sorted row
    ``r`` are the contiguous positions ``[lo_r, s_r)`` (``s_r``: first row of its
    (user, time) run, ``lo_r = max(user start, s_r - window)``; both non-decreasing).
    Rows are cut into blocks of ``block``; a block's candidates lie in the
    ``block + window`` positions from its first row's ``lo``, so one batched matmul
    ``[blocks, block, d] x [blocks, d, block + window]`` gives all cosines, masked to
    each row's range. Rows whose range does not fit (a block starting inside a long
    run of equal timestamps) are redone by a gather per window offset.

    Args:
        user / item / timestamp: [E] int64 interaction columns.
        positive: [E] bool (label == 1).
        item_emb: [N, d] float item embeddings (the retrieval/ranker ID space).
        window: W, history length (50 in the paper).
        chunk: rows per batch; memory about ``chunk * (block + window) * 6`` bytes plus
            ``chunk * (block + window) / block * d * 4``.
        block: rows per matmul block.

    Returns:
        (a, b): [P] int64, a = trigger (history item), b = target (the positive item),
        in input row order of the targets.
    """
    emb = _check_emb(item_emb)
    user, item, timestamp, positive = _check_log(user, item, timestamp, emb.shape[0],
                                                 positive)
    if window < 1 or chunk < 1 or block < 1:
        raise ValueError(f"window, chunk and block must be >= 1, got {window}, {chunk}, "
                         f"{block}")
    window, block = int(window), int(block)
    lay = _history_layout(user, item, timestamp, positive, window)
    its, s, lo = lay["item"], lay["s"], lay["lo"]
    es = np.take(_normalize(emb), its, axis=0)  # [P, d] embeddings of the sorted rows
    best = np.full(its.shape[0], -1, np.int64)
    overflow = []
    step = max(block, int(chunk) // block * block)
    for r0 in range(0, its.shape[0], step):
        r1 = min(r0 + step, its.shape[0])
        best[r0:r1], over = _history_best_blocks(es, its, s, lo, r0, r1, window, block)
        overflow.append(over + r0)
    rows = np.concatenate(overflow) if overflow else np.zeros(0, np.int64)
    if rows.size:
        best[rows] = _history_best_gather(es, its, s, lo, rows, window, int(chunk))
    has = best >= 0
    o = np.argsort(lay["rows"][has], kind="stable")
    return its[best[has]][o].astype(np.int64), its[has][o].astype(np.int64)


def _history_best_blocks(es: np.ndarray, its: np.ndarray, s: np.ndarray, lo: np.ndarray,
                         r0: int, r1: int, window: int,
                         block: int) -> Tuple[np.ndarray, np.ndarray]:
    """Best candidate position of sorted rows ``r0:r1`` (-1: none) by blocked matmul,
    and the rows (relative to ``r0``) whose candidates overflow their block context."""
    n, m = its.shape[0], r1 - r0
    nb = -(-m // block)
    width = block + window
    rows = np.minimum(np.arange(r0, r0 + nb * block), n - 1)
    pad = np.arange(nb * block) >= m
    c0 = lo[rows[::block]]  # [nb] first candidate position of each block
    ctx = np.minimum(c0[:, None] + np.arange(width), n - 1)  # [nb, width]
    g = np.matmul(np.take(es, rows, axis=0).reshape(nb, block, -1),
                  np.take(es, ctx, axis=0).transpose(0, 2, 1))  # [nb, block, width]
    base = np.repeat(c0, block)
    lo_l = (lo[rows] - base).reshape(nb, block, 1)
    hi_l = np.where(pad, 0, s[rows] - base).reshape(nb, block, 1)
    col = np.arange(width)
    mask = (col >= lo_l) & (col < hi_l) & (its[ctx][:, None, :] != its[rows].reshape(nb, block, 1))
    g = np.where(mask, g, -np.inf)
    j = width - 1 - np.argmax(g[:, :, ::-1], axis=2)  # the most recent among equal maxima
    ok = np.take_along_axis(mask, j[:, :, None], axis=2)[:, :, 0]
    best = np.where(ok, c0[:, None] + j, -1).reshape(-1)[:m]
    over = np.flatnonzero(hi_l.reshape(-1)[:m] > width)
    return best, over


def _history_best_gather(es: np.ndarray, its: np.ndarray, s: np.ndarray, lo: np.ndarray,
                         rows: np.ndarray, window: int, chunk: int) -> np.ndarray:
    """Best candidate position of the sorted ``rows`` (-1: none), one gather and one
    batched dot product per window offset."""
    n_cand = np.minimum(s[rows] - lo[rows], window)
    perm = np.argsort(-n_cand, kind="stable")  # active rows at offset k: a prefix
    out = np.full(rows.shape[0], -1, np.int64)
    for r0 in range(0, perm.shape[0], chunk):
        sel = perm[r0:r0 + chunk]
        nc, sr, ti = n_cand[sel], s[rows[sel]], its[rows[sel]]
        te = np.take(es, rows[sel], axis=0)
        best_sim = np.full(sel.shape[0], -np.inf, np.float32)
        best_pos = np.full(sel.shape[0], -1, np.int64)
        for k in range(int(nc[0]) if nc.size else 0):
            m = int(np.searchsorted(-nc, -k, side="left"))  # rows with nc > k
            cand = sr[:m] - 1 - k
            sim = np.einsum("nd,nd->n", np.take(es, cand, axis=0), te[:m])
            upd = (np.take(its, cand) != ti[:m]) & (sim > best_sim[:m])
            np.copyto(best_sim[:m], sim, where=upd)
            np.copyto(best_pos[:m], cand, where=upd)
        out[sel] = best_pos
    return out


def pairs_from_history_reference(user: Any, item: Any, timestamp: Any, positive: Any,
                                 item_emb: Any,
                                 window: int = 50) -> Tuple[np.ndarray, np.ndarray]:
    """Per-row Python version of :func:`pairs_from_history` (same conventions; tests)."""
    emb = _check_emb(item_emb).astype(np.float64)
    user, item, timestamp, positive = _check_log(user, item, timestamp, emb.shape[0],
                                                 positive)
    norms = np.linalg.norm(emb, axis=1)
    hist: Dict[int, list] = {}
    for r in range(user.shape[0]):
        if positive[r]:
            hist.setdefault(int(user[r]), []).append((int(timestamp[r]), r))
    a, b = [], []
    for r in range(user.shape[0]):
        if not positive[r]:
            continue
        t, i = int(timestamp[r]), int(item[r])
        earlier = sorted(x for x in hist[int(user[r])] if x[0] < t)[-window:]
        best, best_sim = None, -np.inf
        for _, q in reversed(earlier):  # most recent first
            j = int(item[q])
            if j == i:
                continue
            den = norms[i] * norms[j]
            cos = float(emb[i] @ emb[j] / den) if den > 0 else 0.0
            if cos > best_sim:
                best, best_sim = j, cos
        if best is not None:
            a.append(best)
            b.append(i)
    return np.asarray(a, np.int64), np.asarray(b, np.int64)


# --------------------------------------------------------------------------- mining


def dedup_pairs(a: np.ndarray, b: np.ndarray, unordered: bool = True) -> np.ndarray:
    """Indices of the first occurrence of every distinct pair (in input order), self
    pairs ``a == b`` dropped. With ``unordered`` ``(a, b)`` and ``(b, a)`` are the same."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    keep = np.flatnonzero(a != b)
    x, y = a[keep], b[keep]
    if unordered:
        x, y = np.minimum(x, y), np.maximum(x, y)
    o = np.lexsort((np.arange(x.shape[0]), y, x))  # stable: first occurrence first
    first = np.ones(o.shape[0], bool)
    first[1:] = (x[o][1:] != x[o][:-1]) | (y[o][1:] != y[o][:-1])
    return np.sort(keep[o[first]])


def mine_pairs(data_dir: str, sources: Sequence[str] = SOURCES, item_emb: Any = None,
               swing_cfg: Optional[SwingConfig] = None, window: int = 50,
               swing_per_item: int = 1, swing_min_score: float = 0.0,
               unordered: bool = True, progress: bool = False) -> Dict[str, Any]:
    """Mines the QARM item2item pair dataset from the train split of a dataset.

    Reads ``user_id, item_id, timestamp, label`` of ``data_dir`` and its ``split.json``
    (:func:`torchrec_mm.data.split.load_split`); only train rows (split 0) with
    ``label == 1`` are used. Sources (in the given order; on duplicates the first wins):
    ``"history"`` (:func:`pairs_from_history`, needs ``item_emb``) and ``"swing"``
    (:func:`swing` + :func:`pairs_from_swing`). Pairs are deduplicated (as unordered
    pairs unless ``unordered=False``) and self pairs dropped.

    Args:
        item_emb: [num_items, d] item ID embeddings of the retrieval/ranking model.
        swing_per_item / swing_min_score: see :func:`pairs_from_swing`.

    Returns:
        ``{"a": [P] int64, "b": [P] int64, "source": [P] int8 (SOURCE_CODES),
        "stats": {...}}``; history pairs are (trigger, target), swing pairs
        (item, neighbour).
    """
    from torchrec_mm.data.io import load_interaction_columns, load_meta
    from torchrec_mm.data.split import TRAIN, load_split

    sources = list(sources)
    for s in sources:
        if s not in SOURCE_CODES:
            raise ValueError(f"unknown pair source {s!r}; known: {list(SOURCE_CODES)}")
    if not sources or len(set(sources)) != len(sources):
        raise ValueError(f"sources must be a non-empty list without repeats, got {sources}")
    meta = load_meta(data_dir)
    if "history" in sources:
        if item_emb is None:
            raise ValueError("the 'history' source needs item_emb [num_items, d] (the item "
                             "ID embeddings of the retrieval/ranking model)")
        item_emb = _check_emb(item_emb)
        if item_emb.shape[0] != meta.num_items:
            raise ValueError(f"'item_emb' has {item_emb.shape[0]} rows but {data_dir} has "
                             f"{meta.num_items} items")
    split = load_split(data_dir)
    cols = load_interaction_columns(data_dir, ["user_id", "item_id", "timestamp", "label"])
    train = split.assign(cols["item_id"], cols["timestamp"], cols["user_id"]) == TRAIN
    pos = train & (cols["label"] == 1)
    stats: Dict[str, Any] = {"rows": int(train.shape[0]), "train_rows": int(train.sum()),
                             "train_positive_rows": int(pos.sum())}
    parts_a, parts_b, parts_s = [], [], []
    for s in sources:
        if s == "history":
            a, b = pairs_from_history(cols["user_id"][train], cols["item_id"][train],
                                      cols["timestamp"][train], pos[train], item_emb,
                                      window=window)
        else:
            nb = swing(cols["user_id"][pos], cols["item_id"][pos], cols["timestamp"][pos],
                       meta.num_items, swing_cfg or SwingConfig(), progress=progress)
            a, b = pairs_from_swing(nb, swing_per_item, swing_min_score)
            stats["swing_items_with_neighbors"] = int((nb.idx[:, 0] >= 0).sum())
        stats[f"{s}_pairs_raw"] = int(a.shape[0])
        parts_a.append(a)
        parts_b.append(b)
        parts_s.append(np.full(a.shape[0], SOURCE_CODES[s], np.int8))
    a, b, src = np.concatenate(parts_a), np.concatenate(parts_b), np.concatenate(parts_s)
    keep = dedup_pairs(a, b, unordered)
    stats["self_pairs_dropped"] = int((a == b).sum())
    stats["duplicates_dropped"] = int(a.shape[0] - keep.shape[0] - stats["self_pairs_dropped"])
    a, b, src = a[keep], b[keep], src[keep]
    for s in sources:
        stats[f"{s}_pairs"] = int((src == SOURCE_CODES[s]).sum())
    stats["pairs"] = int(a.shape[0])
    stats["items_covered"] = int(np.unique(np.concatenate([a, b])).shape[0])
    logger.info("qarm pairs: %s", stats)
    return {"a": a, "b": b, "source": src, "stats": stats}


__all__ = ["SwingConfig", "ItemNeighbors", "swing", "swing_reference", "pairs_from_swing",
           "pairs_from_history", "pairs_from_history_reference", "dedup_pairs", "mine_pairs",
           "SOURCES", "SOURCE_CODES"]
