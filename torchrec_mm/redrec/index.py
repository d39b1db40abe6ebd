"""Catalogue retrieval for RED-Rec serving: the item vectors in a faiss index, top-N items
per user from its K interest vectors (paper ``001_42c7267e32b49bc6`` §4.3: a user's score
of an item is the max over interests of the cosine; serving searches every interest and
merges).

**Per-interest search + merge is exact.** Each of the K interests retrieves its own top
``n``; the merged list keeps every item once with its best score and returns the ``n``
best. If an item ``i`` is in the true top ``n`` by ``max_k cos(u_k, v_i)``, attained at
interest ``k``, every item ranked above ``i`` by interest ``k`` also beats ``i`` on the
max, so fewer than ``n`` do and ``i`` is in interest ``k``'s top ``n``. With an exact
index (``"Flat"``) the merge therefore equals exhaustive max-over-interests scoring; with
an approximate one (``"IVF1024,Flat"``, ``"HNSW32"``, any ``faiss.index_factory``
string) the per-interest lists are approximate and so is the result
(:func:`recall_at_n` measures it against the exact one).

Scores are inner products; with ``normalize=True`` (default) items and interests are
l2-normalised first, i.e. cosines. A model trained with an item bias (``RedRecConfig.
item_bias``) scores ``scale · cos + b_i``: ``ItemIndex(..., item_bias=b,
query_scale=scale)`` indexes ``[v_i, b_i]`` and searches with ``[scale · u_k, 1]``, so
the same per-interest search + merge returns the max over interests of that score (the
argument above holds for any per-interest score).

Example::

    index = ItemIndex(item_vecs, IndexConfig(factory="HNSW32", ef_search=128))
    scores, ids = index.retrieve(interests, n=100)     # interests [U, K, d] -> [U, 100]
"""

import time
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np
import torch

__all__ = ["IndexConfig", "ItemIndex", "exact_scores", "merge_interest_results", "recall_at_n"]

ArrayLike = Union[np.ndarray, torch.Tensor]


def _f32(x: ArrayLike, name: str, normalize: bool) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array, got shape {a.shape}")
    if a.size and not np.isfinite(a).all():
        row = int(np.flatnonzero(~np.isfinite(a).all(1))[0])
        raise ValueError(f"{name}: row {row} has NaN/Inf")
    if normalize and a.size:
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(a, dtype=np.float32)


@dataclass
class IndexConfig:
    """How :class:`ItemIndex` indexes the catalogue.

    Attributes:
        factory: a ``faiss.index_factory`` string (inner-product metric): ``"Flat"``
            (exact), ``"IVF1024,Flat"``, ``"HNSW32"``, ``"IVF4096,PQ16"``...
        nprobe: IVF lists visited per query.
        ef_search: HNSW ``efSearch`` (raised to the requested ``k`` when smaller).
        train_size: vectors drawn (seeded) to train an index that needs training
            (IVF/PQ); 0 = all.
        normalize: l2-normalise items and queries (cosine scores).
        threads: faiss OpenMP threads (0 = faiss' default).
        seed: training sample and k-means seed.
    """

    factory: str = "Flat"
    nprobe: int = 16
    ef_search: int = 128
    train_size: int = 100_000
    normalize: bool = True
    threads: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("nprobe", "ef_search"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"IndexConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.train_size < 0 or self.threads < 0:
            raise ValueError("IndexConfig.train_size and threads must be >= 0")


def merge_interest_results(scores: np.ndarray, ids: np.ndarray, n: int
                           ) -> Tuple[np.ndarray, np.ndarray]:
    """Merges per-interest result lists: every item once with its best score, best first.

    Args:
        scores: [U, M] scores of the concatenated per-interest lists (any order).
        ids: [U, M] int64 item ids, ``-1`` = no result.
        n: results per user.

    Returns:
        ``(scores [U, n] float32, ids [U, n] int64)``, descending; ``-inf`` / ``-1``
        padding when a user has fewer than ``n`` distinct items. Ties keep the order of
        the input columns.
    """
    ids = np.asarray(ids, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float32)
    if ids.shape != scores.shape or ids.ndim != 2:
        raise ValueError(f"scores {scores.shape} and ids {ids.shape} must be equal [U, M]")
    U, M = ids.shape
    out_s = np.full((U, n), -np.inf, dtype=np.float32)
    out_i = np.full((U, n), -1, dtype=np.int64)
    if U == 0 or M == 0 or n == 0:
        return out_s, out_i
    valid = ids >= 0
    s = np.where(valid, scores, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")
    ids_o = np.take_along_axis(ids, order, axis=1)
    s_o = np.take_along_axis(s, order, axis=1)
    width = int(ids_o.max()) + 1 if valid.any() else 1
    key = np.where(ids_o >= 0, np.arange(U, dtype=np.int64)[:, None] * width + ids_o, -1)
    flat = key.ravel()
    _, first = np.unique(flat, return_index=True)          # first = best (descending)
    keep = np.zeros(flat.size, dtype=bool)
    keep[first] = True
    keep = (keep & (flat >= 0)).reshape(U, M)
    pos = np.cumsum(keep, axis=1) - 1
    r, c = np.nonzero(keep & (pos < n))
    out_s[r, pos[r, c]] = s_o[r, c]
    out_i[r, pos[r, c]] = ids_o[r, c]
    return out_s, out_i


def recall_at_n(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over users of ``|approx ∩ exact| / |exact|`` (ids [U, n], ``-1`` padding
    ignored; users without exact results are skipped)."""
    a, e = np.asarray(approx_ids), np.asarray(exact_ids)
    if a.shape[0] != e.shape[0]:
        raise ValueError(f"user counts differ: {a.shape} vs {e.shape}")
    hits = ((a[:, :, None] == e[:, None, :]) & (e[:, None, :] >= 0)).any(1).sum(1)
    size = (e >= 0).sum(1)
    ok = size > 0
    return float((hits[ok] / size[ok]).mean()) if ok.any() else 1.0


class ItemIndex:
    """A faiss index of the catalogue (module doc).

    Args:
        item_vecs: [N, d] item vectors (the item tower's, e.g. ``embed_cases``' output).
        config: :class:`IndexConfig`.
        item_ids: [N] int64 ids of the rows (default ``arange(N)``).
        item_bias: optional [N] per-item score offsets (module doc), with
            ``query_scale`` the factor of the (normalised) query's inner product.

    Attributes:
        build_seconds: wall time of training + adding.
    """

    def __init__(self, item_vecs: ArrayLike, config: Optional[IndexConfig] = None,
                 item_ids: Optional[ArrayLike] = None,
                 item_bias: Optional[ArrayLike] = None, query_scale: float = 1.0) -> None:
        import faiss

        from torchrec_mm.qarm.codes import faiss_threads

        self.config = config or IndexConfig()
        x = _f32(item_vecs, "item_vecs", self.config.normalize)
        n, d = x.shape
        if n == 0:
            raise ValueError("item_vecs: empty catalogue")
        self.query_scale = float(query_scale)
        self.biased = item_bias is not None
        if self.biased:
            b = _f32(np.asarray(item_bias, dtype=np.float32).reshape(-1, 1), "item_bias",
                     False)
            if b.shape[0] != n:
                raise ValueError(f"item_bias: expected [{n}], got [{b.shape[0]}]")
            if not (np.isfinite(self.query_scale) and self.query_scale > 0):
                raise ValueError(f"query_scale: must be finite and > 0, got {query_scale}")
            x = np.ascontiguousarray(np.concatenate([x, b], 1))
            d += 1
        self.item_ids = (np.arange(n, dtype=np.int64) if item_ids is None
                         else np.asarray(item_ids, dtype=np.int64))
        if self.item_ids.shape != (n,):
            raise ValueError(f"item_ids: expected [{n}], got {self.item_ids.shape}")
        t = time.perf_counter()
        try:
            self.index = faiss.index_factory(d, self.config.factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise ValueError(f"faiss cannot build {self.config.factory!r}: {e}") from None
        with faiss_threads(self.config.threads):
            if not self.index.is_trained:
                sample = x
                m = self.config.train_size
                if m and n > m:
                    rng = np.random.default_rng(self.config.seed)
                    sample = x[np.sort(rng.choice(n, m, replace=False))]
                self._set_seed()
                self.index.train(sample)
            self.index.add(x)
        self.build_seconds = time.perf_counter() - t

    def _set_seed(self) -> None:
        import faiss

        try:
            faiss.extract_index_ivf(self.index).cp.seed = self.config.seed
        except RuntimeError:
            pass

    def _tune(self, k: int) -> None:
        import faiss

        try:
            faiss.extract_index_ivf(self.index).nprobe = self.config.nprobe
        except RuntimeError:
            pass
        hnsw = getattr(faiss.downcast_index(self.index), "hnsw", None)
        if hnsw is not None:
            hnsw.efSearch = max(self.config.ef_search, k)

    @property
    def num_items(self) -> int:
        return int(self.index.ntotal)

    def describe(self) -> str:
        return f"{self.config.factory} over {self.num_items} items (d={self.index.d})"

    def search(self, queries: ArrayLike, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Top ``k`` items of each query: ``(scores [Q, k], item ids [Q, k])``, ``-1`` /
        ``-inf`` where the index returns fewer."""
        from torchrec_mm.qarm.codes import faiss_threads

        q = _f32(queries, "queries", self.config.normalize)
        dim = self.index.d - int(self.biased)
        if q.shape[1] != dim:
            raise ValueError(f"queries have dim {q.shape[1]}, the index {dim}")
        if self.biased:  # [scale * u, 1] . [v, b] = scale * <u, v> + b
            q = np.ascontiguousarray(np.concatenate(
                [q * self.query_scale, np.ones((q.shape[0], 1), np.float32)], 1))
        k = int(min(k, self.num_items))
        self._tune(k)
        with faiss_threads(self.config.threads):
            s, pos = self.index.search(q, k)
        ids = np.where(pos >= 0, self.item_ids[np.maximum(pos, 0)], -1)
        return np.where(pos >= 0, s, -np.inf).astype(np.float32), ids

    def retrieve(self, interests: ArrayLike, n: int, per_interest: Optional[int] = None,
                 batch_size: int = 4096, progress: bool = False
                 ) -> Tuple[np.ndarray, np.ndarray]:
        """Top ``n`` items per user by the max over its interests (per-interest search of
        ``per_interest`` items, default ``n``, then :func:`merge_interest_results`).

        Args:
            interests: [U, K, d] interest vectors (or [U, d]: one interest).
            n: items per user.
            per_interest: results fetched per interest (``>= n`` keeps the merge exact
                for an exact index).
            batch_size: users per search call.

        Returns:
            ``(scores [U, n], item ids [U, n])``, best first.
        """
        x = interests.detach().cpu().numpy() if isinstance(interests, torch.Tensor) \
            else np.asarray(interests)
        if x.ndim == 2:
            x = x[:, None, :]
        if x.ndim != 3:
            raise ValueError(f"interests: expected [U, K, d], got shape {x.shape}")
        U, K, d = x.shape
        k = int(per_interest or n)
        out_s = np.full((U, n), -np.inf, dtype=np.float32)
        out_i = np.full((U, n), -1, dtype=np.int64)
        starts = range(0, U, batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc=f"retrieve[{self.config.factory}]", leave=False)
        for lo in starts:
            hi = min(U, lo + batch_size)
            s, ids = self.search(x[lo:hi].reshape((hi - lo) * K, d), k)
            kk = s.shape[1]
            out_s[lo:hi], out_i[lo:hi] = merge_interest_results(
                s.reshape(hi - lo, K * kk), ids.reshape(hi - lo, K * kk), n)
        return out_s, out_i


def exact_scores(item_vecs: ArrayLike, interests: ArrayLike, normalize: bool = True
                 ) -> torch.Tensor:
    """[U, N] max-over-interests scores by brute force (torch; small catalogues)."""
    items = torch.as_tensor(np.asarray(item_vecs, dtype=np.float32))
    q = torch.as_tensor(np.asarray(interests, dtype=np.float32))
    if q.dim() == 2:
        q = q[:, None]
    if normalize:
        items = torch.nn.functional.normalize(items, dim=-1)
        q = torch.nn.functional.normalize(q, dim=-1)
    return torch.einsum("ukd,nd->ukn", q, items).amax(1)
