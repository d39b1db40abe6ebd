"""QARM quantitative codes: VQ and RQ codes of aligned item representations.

Paper ``002_93e7adf76829e098`` §2.3 (eq. 2-5, Algorithm 1). The input is the aligned
representation matrix ``M`` (``reps`` float32 ``[N, d]``, rows indexed by dense item id)
with a mask ``has_rep`` ``[N]`` of the items that have one.

* **VQ** (eq. 2-3): the codebook is the representations themselves, ``V = M`` (by
  default every item with a representation; the plugin passes the items seen in
  training so that brand-new items are quantised onto trained items). The codes of a
  representation are the item ids of its ``K`` nearest codebook rows, nearest first;
  a codebook item is its own first code. Search is exact (faiss ``IndexFlatIP``) up to
  ``exact_max_items`` codebook rows and approximate (IVF or HNSW) beyond, in which case
  recall@K against exact search is measured on a sample and reported.
* **RQ** (eq. 4-5, Algorithm 1): ``L`` levels of ``faiss.Kmeans`` with ``codebook_size``
  centroids, level ``l`` trained on the residuals left by levels ``1..l-1``; the codes
  are the greedy nearest centroid (L2) of each level's residual.

Cosine similarity is the default metric: rows are ℓ2-normalised first (a zero vector is
an error), VQ ranks by inner product and RQ clusters the unit vectors. ``metric="l2"``
uses the raw vectors (VQ by L2 distance).

The saved artefact (:func:`save_codes` / :func:`load_codes`) is a directory::

    codes.safetensors   vq            [N, K] int64 item ids; N (= vq_none) for items
                                      without a representation
                        rq            [N, L] int64 in [0, C); C (= rq_none) likewise
                        has_code      [N] bool
                        rq_centroids  [L, C, d] float32
                        vq_item_ids   [n_cb] int64 ids of the VQ codebook rows
                        vq_reps       [n_cb, d] float32 codebook rows (normalised for
                                      cosine): what :meth:`QARMCodes.assign_new` searches
    codes.json          format, sizes, configs, VQ recall, code statistics and a token
                        that must match the safetensors metadata

Both files are written atomically, the JSON last (after removing any previous one), so a
directory with a ``codes.json`` always holds the matching, complete tensors.

Example::

    reps, has_rep = load_representations("out/aligned.safetensors")
    codes = build_codes(reps, has_rep, VQConfig(k=25), RQConfig(levels=6))
    save_codes(codes, "out/codes")
    vq_new, rq_new = load_codes("out/codes").assign_new(new_reps)   # [n, K], [n, L]
"""

import contextlib
import dataclasses
import json
import logging
import math
import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from torchrec_mm.data.schema import DataError
from torchrec_mm.utils.io import load_tensors, save_tensors, write_json

logger = logging.getLogger(__name__)

FORMAT = "torchrec-mm/qarm-codes-v1"
TENSORS_FILE = "codes.safetensors"
META_FILE = "codes.json"
METRICS = ("cosine", "l2")
INDEXES = ("auto", "flat", "ivf", "hnsw")
INITS = ("kmeans++", "random", "afk-mc2")
_TENSOR_NAMES = ("vq", "rq", "has_code", "rq_centroids", "vq_item_ids", "vq_reps")

ArrayLike = Union[torch.Tensor, np.ndarray]


# --------------------------------------------------------------------------- configs


@dataclass
class VQConfig:
    """VQ codes (paper eq. 2-3).

    Attributes:
        k: codes per item = the K nearest codebook items.
        index: ``"flat"`` (exact), ``"ivf"`` (faiss ``IndexIVFFlat``), ``"hnsw"``
            (``IndexHNSWFlat``) or ``"auto"``: flat when the codebook has at most
            ``exact_max_items`` rows, else IVF (on CPU, IVF assigns every item of a 1M
            codebook ~3x faster than HNSW at similar recall; see
            ``benchmarks/bench_qarm_codebooks.py``).
        exact_max_items: codebook size up to which ``"auto"`` searches exactly.
        nlist: IVF lists; 0 = ``4 * sqrt(n_cb)`` (at most ``n_cb / 39``).
        nprobe: IVF lists visited per query.
        hnsw_m: HNSW graph degree; ef_search: HNSW search beam (at least ``k``).
        recall_sample: queries on which an approximate index's recall@K against exact
            search is measured at build time (0: not measured).
        seed: seed of the IVF k-means and of the recall sample.
        metric: ``"cosine"`` (ℓ2-normalised rows, inner product) or ``"l2"``.
        batch_size: queries per search call (the progress bar's step).
    """

    k: int = 25
    index: str = "auto"
    exact_max_items: int = 100_000
    nlist: int = 0
    nprobe: int = 16
    hnsw_m: int = 32
    ef_search: int = 128
    recall_sample: int = 1000
    seed: int = 0
    metric: str = "cosine"
    batch_size: int = 65536

    def __post_init__(self) -> None:
        _check_choice("VQConfig.index", self.index, INDEXES)
        _check_choice("VQConfig.metric", self.metric, METRICS)
        for name in ("k", "nprobe", "hnsw_m", "ef_search", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"VQConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("nlist", "recall_sample", "exact_max_items"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"VQConfig.{name} must be >= 0, got {getattr(self, name)}")

    def resolve_index(self, n_cb: int) -> str:
        """The index type used for a codebook of ``n_cb`` rows."""
        if self.index != "auto":
            return self.index
        return "flat" if n_cb <= self.exact_max_items else "ivf"

    def resolve_nlist(self, n_cb: int) -> int:
        """IVF lists for ``n_cb`` rows (faiss wants >= 39 training points per list)."""
        nlist = self.nlist or int(round(4 * math.sqrt(n_cb)))
        return max(1, min(nlist, n_cb // 39))


@dataclass
class RQConfig:
    """RQ codes (paper eq. 4-5, Algorithm 1).

    Attributes:
        levels: L, code length.
        codebook_size: centroids per level (the paper's Algorithm 1 calls it L too).
        niter: k-means iterations per level.
        seed: k-means seed of level 1 (level l uses ``seed + l - 1``).
        init: k-means initialisation: ``"kmeans++"`` (default: greedy k-means++,
            :func:`kmeans_plus_plus`, on ``init_points * codebook_size`` sampled
            residuals; recovers well-separated clusters that faiss' default
            ``"random"`` init, used by the paper, often merges or splits), ``"random"`` or
            ``"afk-mc2"`` (faiss' MCMC approximation of k-means++).
        init_points: sample size of the k-means++ init, per centroid.
        max_points_per_centroid: faiss trains each level on at most this many sampled
            residuals per centroid (faiss' default, 256).
        metric: ``"cosine"`` (cluster the ℓ2-normalised rows) or ``"l2"`` (raw rows).
    """

    levels: int = 6
    codebook_size: int = 256
    niter: int = 20
    seed: int = 0
    init: str = "kmeans++"
    init_points: int = 16
    max_points_per_centroid: int = 256
    metric: str = "cosine"

    def __post_init__(self) -> None:
        _check_choice("RQConfig.init", self.init, INITS)
        _check_choice("RQConfig.metric", self.metric, METRICS)
        for name in ("levels", "codebook_size", "niter", "init_points",
                     "max_points_per_centroid"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"RQConfig.{name} must be >= 1, got {getattr(self, name)}")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


# --------------------------------------------------------------------- input checks


def _as_matrix(reps: ArrayLike, name: str = "reps") -> np.ndarray:
    """float32 C-contiguous ``[n, d]`` view or copy of ``reps`` (torch or numpy)."""
    if isinstance(reps, torch.Tensor):
        reps = reps.detach().cpu()
        if not reps.dtype.is_floating_point:
            raise ValueError(f"{name}: expected floating point values, got {reps.dtype}")
        reps = reps.float().numpy()
    x = np.asarray(reps)
    if x.dtype.kind != "f":
        raise ValueError(f"{name}: expected floating point values, got {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D [n, d] matrix, got shape {x.shape}")
    if x.shape[1] == 0:
        raise ValueError(f"{name}: representations have dimension 0")
    return np.ascontiguousarray(x, dtype=np.float32)


def _as_mask(mask: Optional[ArrayLike], n: int, name: str) -> np.ndarray:
    """bool ``[n]`` (all True when ``mask`` is None)."""
    if mask is None:
        return np.ones(n, dtype=bool)
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    m = np.asarray(mask)
    if m.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},) (one flag per item), got {m.shape}")
    if m.dtype != bool:
        if m.dtype.kind not in "iuf" or not np.isin(m, (0, 1)).all():
            raise ValueError(f"{name}: expected a boolean mask, got {m.dtype} values")
        m = m.astype(bool)
    return m


def _rep_error(source: Optional[str], item: int, what: str, message: str) -> ValueError:
    if source is not None:
        return DataError(source, f"{what} {item}", "reps", message)
    return ValueError(f"{what} {item}: {message}")


def check_representations(
    reps: np.ndarray,
    rows: Optional[np.ndarray] = None,
    metric: str = "cosine",
    source: Optional[str] = None,
    what: str = "item",
    ids: Optional[np.ndarray] = None,
) -> None:
    """Raises if a representation is not usable.

    Args:
        reps: float32 ``[n, d]``.
        rows: int64 ``[m]`` rows to check (default all); the other rows are ignored.
        metric: with ``"cosine"`` a zero vector (not normalisable) is an error too.
        source: file the representations came from (named in the error, which is then
            a :class:`~torchrec_mm.data.schema.DataError`).
        what: how the error names a row: ``"item"`` (rows are item ids) or ``"row"``.
        ids: optional ``[n]`` names of the rows (e.g. item ids of query rows).

    Raises:
        ValueError: naming the first bad item (and the file), with the count of bad rows.
    """
    idx = np.arange(reps.shape[0]) if rows is None else rows
    if ids is not None:
        idx = ids[idx]
    sub = reps if rows is None else reps[rows]
    bad = ~np.isfinite(sub).all(axis=1)
    if bad.any():
        raise _rep_error(source, int(idx[np.argmax(bad)]), what,
                         f"representation has NaN/Inf values ({int(bad.sum())} of "
                         f"{len(idx)} representations affected)")
    if metric == "cosine":
        norm2 = np.einsum("ij,ij->i", sub, sub, dtype=np.float64)
        zero = norm2 <= 0.0
        if zero.any():
            raise _rep_error(source, int(idx[np.argmax(zero)]), what,
                             f"representation is a zero vector and cannot be ℓ2-normalised "
                             f"for cosine similarity ({int(zero.sum())} such); mark it as "
                             "having no representation (has_rep False)")


def _prepare(x: np.ndarray, metric: str) -> np.ndarray:
    """ℓ2-normalised float32 copy for cosine, the rows as they are for ``"l2"``."""
    if metric == "l2":
        return np.ascontiguousarray(x, dtype=np.float32)
    norm = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    return np.ascontiguousarray(x / norm[:, None], dtype=np.float32)


def _faiss_metric(metric: str) -> int:
    import faiss

    return faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2


@contextlib.contextmanager
def faiss_threads(n: int) -> Iterator[None]:
    """Runs the enclosed faiss calls with ``n`` OpenMP threads (0: unchanged) and restores
    the previous count. On a machine shared with other jobs, fewer threads than cores
    are often much faster (idle OpenMP threads spin at every barrier)."""
    if not n:
        yield
        return
    import faiss

    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(n))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


def _progress(iterable: Any, progress: bool, **kwargs: Any) -> Any:
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


# ------------------------------------------------------------------------------- VQ


@dataclass
class VQCodebook:
    """The VQ codebook ``V`` (paper eq. 2: the representations of the codebook items).

    Attributes:
        item_ids: [n_cb] int64 item ids of the codebook rows (ascending).
        reps: [n_cb, d] float32 codebook rows (ℓ2-normalised for cosine).
        config: the :class:`VQConfig`.
        index_type: the resolved index: ``"flat"``, ``"ivf"`` or ``"hnsw"``.
        recall: recall@K of the approximate index against exact search, measured on
            ``recall_queries`` sampled representations at build time (None for exact
            search or when not measured).
        recall_queries: size of that sample.
    """

    item_ids: np.ndarray
    reps: np.ndarray
    config: VQConfig
    index_type: str = "flat"
    recall: Optional[float] = None
    recall_queries: int = 0
    _index: Any = field(default=None, repr=False, compare=False)

    @property
    def size(self) -> int:
        return int(self.item_ids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.reps.shape[1])

    @property
    def k(self) -> int:
        return int(self.config.k)

    @property
    def index(self) -> Any:
        """The faiss index over :attr:`reps` (built on first use)."""
        if self._index is None:
            self._index = _build_vq_index(self.reps, self.index_type, self.config)
        return self._index

    def describe(self) -> str:
        c = self.config
        if self.index_type == "ivf":
            detail = f"ivf, nlist {self.index.nlist}, nprobe {self.index.nprobe}"
        elif self.index_type == "hnsw":
            detail = f"hnsw, M {c.hnsw_m}, efSearch {max(c.ef_search, c.k)}"
        else:
            detail = "flat, exact"
        return f"{c.metric}, {detail}"

    def search_positions(self, x: np.ndarray, exact: bool = False) -> np.ndarray:
        """Codebook *rows* of the K nearest rows of prepared queries ``x`` [n, d]
        (already normalised), nearest first: int64 ``[n, K]``. Rows an approximate
        index could not fill (too few candidates) are searched exactly."""
        k = self.k
        if exact or self.index_type == "flat":
            index = self.index if self.index_type == "flat" else _flat_index(
                self.reps, self.config.metric)
            return index.search(x, k)[1].astype(np.int64, copy=False)
        _, pos = self.index.search(x, k)
        missing = (pos < 0).any(axis=1)
        if missing.any():
            flat = _flat_index(self.reps, self.config.metric)
            pos[missing] = flat.search(np.ascontiguousarray(x[missing]), k)[1]
        return pos.astype(np.int64, copy=False)

    def assign(self, reps: ArrayLike, query_ids: Optional[ArrayLike] = None,
               progress: bool = False) -> np.ndarray:
        """VQ codes (paper eq. 3) of representations.

        Args:
            reps: ``[n, d]`` representations (torch or numpy, any float dtype).
            query_ids: optional ``[n]`` item ids of the queries. A query that is itself a
                codebook item gets itself as its first code (its similarity to itself
                is the maximum; this also makes duplicates and approximate indexes
                deterministic), its other codes keep their order.
            progress: show a tqdm bar.

        Returns:
            int64 ``[n, K]`` item ids of the K nearest codebook items, nearest first.

        Raises:
            ValueError: NaN/Inf or (cosine) zero rows, naming the row (or item id).
        """
        x = _as_matrix(reps)
        if x.shape[1] != self.dim:
            raise ValueError(f"reps have dimension {x.shape[1]}, the codebook {self.dim}")
        ids = None
        if query_ids is not None:
            ids = np.asarray(torch.as_tensor(query_ids).cpu(), dtype=np.int64).reshape(-1)
            if ids.shape[0] != x.shape[0]:
                raise ValueError(f"query_ids has {ids.shape[0]} ids for {x.shape[0]} reps")
        check_representations(x, metric=self.config.metric,
                              what="row" if ids is None else "item", ids=ids)
        return self._assign_checked(x, ids, progress)

    def _assign_checked(self, x: np.ndarray, ids: Optional[np.ndarray],
                        progress: bool) -> np.ndarray:
        n = x.shape[0]
        out = np.empty((n, self.k), dtype=np.int64)
        bs = self.config.batch_size
        self.index  # build before the progress bar starts
        for start in _progress(range(0, n, bs), progress and n > bs, desc="VQ codes",
                               unit="batch", total=(n + bs - 1) // bs):
            q = _prepare(x[start:start + bs], self.config.metric)
            out[start:start + bs] = self.item_ids[self.search_positions(q)]
        if ids is not None:
            out = _self_first(out, ids, self.item_ids)
        return out

    def measure_recall(self, reps: ArrayLike, sample: Optional[int] = None,
                       seed: Optional[int] = None) -> float:
        """Recall@K of :attr:`index` against exact search on ``sample`` random rows of
        ``reps`` (all rows when ``sample`` is None or larger): the mean over queries of
        ``|approx ∩ exact| / K``. 1.0 for a flat index."""
        x = _as_matrix(reps)
        check_representations(x, metric=self.config.metric, what="row")
        rng = np.random.default_rng(self.config.seed if seed is None else seed)
        if sample is not None and sample < x.shape[0]:
            x = x[np.sort(rng.choice(x.shape[0], size=sample, replace=False))]
        if self.index_type == "flat" or x.shape[0] == 0:
            return 1.0
        q = _prepare(x, self.config.metric)
        return recall_at_k(self.search_positions(q), self.search_positions(q, exact=True))


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over rows of ``|approx_row ∩ exact_row| / K`` (ids [n, K], rows without
    repeats)."""
    if approx.shape != exact.shape:
        raise ValueError(f"shapes differ: {approx.shape} vs {exact.shape}")
    if approx.size == 0:
        return 1.0
    hits = (approx[:, :, None] == exact[:, None, :]).any(axis=2).sum(axis=1)
    return float(hits.mean() / approx.shape[1])


def _self_first(codes: np.ndarray, query_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
    """Moves (or inserts) each query's own id to position 0 for queries in the codebook."""
    in_cb = np.isin(query_ids, item_ids)
    if not in_cb.any():
        return codes
    sub, qid = codes[in_cb], query_ids[in_cb]
    k = codes.shape[1]
    ext = np.concatenate([qid[:, None], sub], axis=1)  # [m, K + 1]
    order_key = np.broadcast_to(np.arange(k + 1), ext.shape).copy()
    order_key[:, 1:][sub == qid[:, None]] = k + 1  # drop the old occurrence
    order = np.argsort(order_key, axis=1, kind="stable")[:, :k]
    codes = codes.copy()
    codes[in_cb] = np.take_along_axis(ext, order, axis=1)
    return codes


def _flat_index(reps: np.ndarray, metric: str) -> Any:
    import faiss

    index = (faiss.IndexFlatIP if metric == "cosine" else faiss.IndexFlatL2)(reps.shape[1])
    index.add(reps)
    return index


def _build_vq_index(reps: np.ndarray, index_type: str, cfg: VQConfig) -> Any:
    import faiss

    n, d = reps.shape
    if index_type == "flat":
        return _flat_index(reps, cfg.metric)
    if index_type == "ivf":
        nlist = cfg.resolve_nlist(n)
        quantizer = (faiss.IndexFlatIP if cfg.metric == "cosine" else faiss.IndexFlatL2)(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, _faiss_metric(cfg.metric))
        index.cp.seed = cfg.seed
        index.cp.min_points_per_centroid = 1  # nlist <= n / 39 already
        index.cp.max_points_per_centroid = 64  # coarse quantiser: 64 samples per list
        index.train(reps)
        index.add(reps)
        index.nprobe = max(1, min(cfg.nprobe, nlist))
        return index  # faiss' Python wrapper keeps the quantizer alive with the index
    if index_type == "hnsw":
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, _faiss_metric(cfg.metric))
        index.add(reps)
        index.hnsw.efSearch = max(cfg.ef_search, cfg.k)
        return index
    raise ValueError(f"unknown VQ index {index_type!r}")


def build_vq(
    reps: ArrayLike,
    has_rep: Optional[ArrayLike],
    cfg: VQConfig,
    codebook_mask: Optional[ArrayLike] = None,
    progress: bool = False,
) -> VQCodebook:
    """Builds the VQ codebook ``V = M`` (paper eq. 2) and its search index.

    Args:
        reps: ``[N, d]`` representations indexed by item id.
        has_rep: ``[N]`` bool, items that have a representation (None: all).
        cfg: :class:`VQConfig`.
        codebook_mask: ``[N]`` bool, items allowed in the codebook (e.g. the items seen
            in training); the codebook is ``has_rep & codebook_mask``. None: all.
        progress: log the index build.

    Returns:
        A :class:`VQCodebook`; with an approximate index its recall@K against exact
        search is measured on ``cfg.recall_sample`` random items with a representation.

    Raises:
        ValueError: NaN/Inf or zero representations (naming the item), or fewer
            codebook items than ``cfg.k``.
    """
    x = _as_matrix(reps)
    has = _as_mask(has_rep, x.shape[0], "has_rep")
    rows = np.flatnonzero(has)
    check_representations(x, rows, cfg.metric)
    return _build_vq_checked(x, has, cfg, codebook_mask, progress)


def _build_vq_checked(x: np.ndarray, has: np.ndarray, cfg: VQConfig,
                      codebook_mask: Optional[ArrayLike], progress: bool) -> VQCodebook:
    cb_mask = has & _as_mask(codebook_mask, x.shape[0], "codebook_mask")
    item_ids = np.flatnonzero(cb_mask).astype(np.int64)
    if item_ids.size < cfg.k:
        raise ValueError(
            f"VQ needs at least k={cfg.k} codebook items (items with a representation"
            f"{' in codebook_mask' if codebook_mask is not None else ''}), got "
            f"{item_ids.size}; lower k or widen the codebook")
    cb = VQCodebook(item_ids=item_ids, reps=_prepare(x[item_ids], cfg.metric), config=cfg,
                    index_type=cfg.resolve_index(int(item_ids.size)))
    if progress:
        logger.info("VQ: building the %s index over %d codebook items", cb.index_type,
                    cb.size)
    cb.index
    if cb.index_type != "flat" and cfg.recall_sample > 0:
        rows = np.flatnonzero(has)
        rng = np.random.default_rng(cfg.seed)
        sample = np.sort(rng.choice(rows, size=min(cfg.recall_sample, rows.size),
                                    replace=False))
        cb.recall = cb.measure_recall(x[sample])
        cb.recall_queries = int(sample.size)
    return cb


# ------------------------------------------------------------------------------- RQ


@dataclass
class RQCodebook:
    """The RQ codebooks ``[R^1, ..., R^L]`` (paper eq. 4).

    Attributes:
        centroids: [L, C, d] float32, level ``l`` centroids of the level-``l`` residuals.
        metric: ``"cosine"`` (inputs are ℓ2-normalised before quantisation) or ``"l2"``.
    """

    centroids: torch.Tensor
    metric: str = "cosine"
    _indexes: Optional[List[Any]] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.centroids.dim() != 3:
            raise ValueError(f"centroids: expected [L, C, d], got {tuple(self.centroids.shape)}")
        _check_choice("RQCodebook.metric", self.metric, METRICS)

    @property
    def levels(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def codebook_size(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[2])

    def _level_indexes(self) -> List[Any]:
        if self._indexes is None:
            import faiss

            cents = self.centroids.detach().cpu().float().numpy()
            self._indexes = []
            for level in cents:
                index = faiss.IndexFlatL2(self.dim)
                index.add(np.ascontiguousarray(level))
                self._indexes.append(index)
        return self._indexes

    def assign(self, reps: ArrayLike) -> np.ndarray:
        """RQ codes (paper eq. 5): greedily, at each level the nearest centroid (L2) of
        the residual left by the previous levels.

        Args:
            reps: ``[n, d]`` representations (normalised here for cosine).

        Returns:
            int64 ``[n, L]`` codes in ``[0, codebook_size)``.

        Raises:
            ValueError: NaN/Inf or (cosine) zero rows, naming the row.
        """
        x = _as_matrix(reps)
        if x.shape[1] != self.dim:
            raise ValueError(f"reps have dimension {x.shape[1]}, the codebook {self.dim}")
        check_representations(x, metric=self.metric, what="row")
        return self._assign_prepared(_prepare(x, self.metric))[0]

    def _assign_prepared(self, res: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Codes [n, L] and the mean squared residual norm after each level [L]."""
        res = res.copy()
        cents = self.centroids.detach().cpu().float().numpy()
        codes = np.empty((res.shape[0], self.levels), dtype=np.int64)
        mse = np.zeros(self.levels)
        for level, index in enumerate(self._level_indexes()):
            _, nearest = index.search(res, 1)
            codes[:, level] = nearest[:, 0]
            res -= cents[level][nearest[:, 0]]
            mse[level] = float(np.einsum("ij,ij->", res, res, dtype=np.float64)
                               / max(1, res.shape[0]))
        return codes, mse

    def reconstruct(self, codes: ArrayLike) -> torch.Tensor:
        """Sum of the chosen centroids.

        Args:
            codes: int ``[n, l]`` codes of the first ``l <= L`` levels.

        Returns:
            float32 ``[n, d]`` (in the normalised space for cosine).
        """
        c = torch.as_tensor(np.asarray(codes) if isinstance(codes, np.ndarray) else codes)
        if c.dim() != 2 or c.shape[1] > self.levels or c.dtype.is_floating_point:
            raise ValueError(f"codes: expected integer [n, l] with l <= {self.levels}, got "
                             f"{c.dtype} {tuple(c.shape)}")
        c = c.long()
        bad = (c < 0) | (c >= self.codebook_size)
        if bool(bad.any()):
            r, l = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"codes: row {r}, level {l + 1}: code {int(c[r, l])} outside "
                             f"[0, {self.codebook_size})")
        cents = self.centroids.float()
        out = torch.zeros((c.shape[0], self.dim), dtype=torch.float32)
        for level in range(c.shape[1]):
            out += cents[level][c[:, level]]
        return out


_FAISS_INIT = {"kmeans++": "ClusteringInitMethod_RANDOM",  # unused: centroids given
               "random": "ClusteringInitMethod_RANDOM",
               "afk-mc2": "ClusteringInitMethod_AFK_MC2"}


def kmeans_plus_plus(x: np.ndarray, k: int, seed: int = 0,
                     max_points: Optional[int] = None) -> np.ndarray:
    """Greedy k-means++ initial centroids (Arthur & Vassilvitskii 2007; ``2 + ln k``
    candidates per centre, keeping the one that lowers the potential most, as
    scikit-learn does — plain k-means++, faiss' ``KMEANS_PLUS_PLUS``, still puts two
    centres into one of a dozen well-separated clusters now and then).

    Args:
        x: float32 ``[n, d]`` points, ``n >= k``.
        k: centroids.
        seed: random seed.
        max_points: run on a random sample of at most this many points (None: all).

    Returns:
        float32 ``[k, d]`` rows of ``x``.
    """
    rng = np.random.default_rng(seed)
    if max_points is not None and x.shape[0] > max_points:
        x = x[np.sort(rng.choice(x.shape[0], size=max_points, replace=False))]
    n, d = x.shape
    x = np.ascontiguousarray(x, dtype=np.float32)
    # einsum, not BLAS: these thin products are too small for threads, and OpenMP /
    # OpenBLAS threads stall badly on a busy machine
    norms = np.einsum("ij,ij->i", x, x)
    trials = 2 + int(math.log(k))
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = int(rng.integers(n))
    closest = np.maximum(norms - 2.0 * np.einsum("ij,j->i", x, x[chosen[0]])
                         + norms[chosen[0]], 0.0)  # [n] squared distance to nearest centre
    for c in range(1, k):
        cumulative = np.cumsum(closest, dtype=np.float64)
        cand = np.searchsorted(cumulative, rng.random(trials) * cumulative[-1], side="right")
        cand = np.minimum(cand, n - 1)
        # squared distances [n, trials] to each candidate, capped by the nearest centre
        dist = np.einsum("ij,kj->ik", x, x[cand])
        dist *= -2.0
        dist += norms[:, None]
        dist += norms[cand][None, :]
        np.maximum(dist, 0.0, out=dist)
        np.minimum(dist, closest[:, None], out=dist)
        best = int(np.argmin(dist.sum(axis=0, dtype=np.float64)))
        closest = np.ascontiguousarray(dist[:, best])
        chosen[c] = cand[best]
    return np.ascontiguousarray(x[chosen], dtype=np.float32)


def build_rq(reps: ArrayLike, has_rep: Optional[ArrayLike], cfg: RQConfig,
             progress: bool = False) -> RQCodebook:
    """Trains the RQ codebooks (paper Algorithm 1): level by level, ``faiss.Kmeans``
    with ``codebook_size`` centroids on the residuals of the items with a representation,
    then subtracts each item's nearest centroid.

    Args:
        reps: ``[N, d]`` representations indexed by item id.
        has_rep: ``[N]`` bool (None: all).
        cfg: :class:`RQConfig`.
        progress: tqdm bar over levels.

    Raises:
        ValueError: NaN/Inf or zero representations (naming the item), or fewer items
            with a representation than ``codebook_size``.
    """
    x = _as_matrix(reps)
    has = _as_mask(has_rep, x.shape[0], "has_rep")
    rows = np.flatnonzero(has)
    check_representations(x, rows, cfg.metric)
    return _build_rq_checked(x[rows], cfg, progress)[0]


def _build_rq_checked(x: np.ndarray, cfg: RQConfig,
                      progress: bool) -> Tuple[RQCodebook, np.ndarray, np.ndarray]:
    """Codebook, codes ``[n, L]`` of the training rows ``x`` and the mean squared
    residual norm after each level ``[L]``."""
    import faiss

    n, d = x.shape
    c = cfg.codebook_size
    if n < c:
        raise ValueError(f"RQ needs at least codebook_size={c} items with a representation "
                         f"to train its k-means, got {n}; lower the codebook size")
    if n < 39 * c:
        logger.warning("RQ: %d items for %d centroids per level (faiss recommends at least "
                       "39 per centroid)", n, c)
    res = _prepare(x, cfg.metric)
    codes = np.empty((n, cfg.levels), dtype=np.int64)
    mse = np.zeros(cfg.levels)
    cents = np.empty((cfg.levels, c, d), dtype=np.float32)
    for level in _progress(range(cfg.levels), progress, desc="RQ k-means", unit="level"):
        km = faiss.Kmeans(d, c, niter=cfg.niter, seed=cfg.seed + level,
                          max_points_per_centroid=cfg.max_points_per_centroid,
                          min_points_per_centroid=1,  # we warned above, once
                          init_method=getattr(faiss, _FAISS_INIT[cfg.init]))
        init = (kmeans_plus_plus(res, c, seed=cfg.seed + level, max_points=c * cfg.init_points)
                if cfg.init == "kmeans++" else None)
        km.train(res, init_centroids=init)
        _, nearest = km.index.search(res, 1)
        cents[level] = km.centroids
        codes[:, level] = nearest[:, 0]
        res -= km.centroids[nearest[:, 0]]
        mse[level] = float(np.einsum("ij,ij->", res, res, dtype=np.float64) / n)
    return RQCodebook(torch.from_numpy(cents), metric=cfg.metric), codes, mse


# ------------------------------------------------------------------------ statistics


def code_stats(rq: ArrayLike, has_code: Optional[ArrayLike] = None) -> Dict[str, Any]:
    """Usage statistics of RQ codes, per level ``l = 1..L`` over items with a code.

    Args:
        rq: int ``[N, L]`` codes.
        has_code: ``[N]`` bool (None: all rows).

    Returns:
        ``{"num_items": n, "levels": [per level: {"level", "distinct_codes",
        "entropy_bits", "perplexity" (2**entropy of the level's code usage),
        "distinct_prefixes" (of (r_1..r_l)), "mean_items_per_prefix",
        "max_items_per_prefix", "unique_prefix_frac" (items whose prefix no other item
        shares)}]}``.
    """
    r = np.asarray(rq.detach().cpu() if isinstance(rq, torch.Tensor) else rq)
    if r.ndim != 2 or r.dtype.kind not in "iu":
        raise ValueError(f"rq: expected integer codes [N, L], got {r.dtype} {r.shape}")
    r = r[_as_mask(has_code, r.shape[0], "has_code")].astype(np.int64)
    if r.size and r.min() < 0:
        raise ValueError("rq: codes must be non-negative")
    n, levels = r.shape
    out: List[Dict[str, Any]] = []
    prefix = np.zeros(n, dtype=np.int64)
    for level in range(levels):
        code = r[:, level]
        if n == 0:
            out.append({"level": level + 1, "distinct_codes": 0, "entropy_bits": 0.0,
                        "perplexity": 0.0, "distinct_prefixes": 0,
                        "mean_items_per_prefix": 0.0, "max_items_per_prefix": 0,
                        "unique_prefix_frac": 0.0})
            continue
        usage = np.unique(code, return_counts=True)[1]
        p = usage / n
        entropy = float(-(p * np.log2(p)).sum())
        # prefix ids stay < n, so prefix * (max + 1) + code fits in int64
        _, prefix, count = np.unique(prefix * (int(code.max()) + 1) + code,
                                     return_inverse=True, return_counts=True)
        prefix = prefix.reshape(-1)
        out.append({
            "level": level + 1,
            "distinct_codes": int(usage.size),
            "entropy_bits": entropy,
            "perplexity": float(2.0 ** entropy),
            "distinct_prefixes": int(count.size),
            "mean_items_per_prefix": float(n / count.size),
            "max_items_per_prefix": int(count.max()),
            "unique_prefix_frac": float((count == 1).sum() / n),
        })
    return {"num_items": int(n), "levels": out}


def format_stats(meta: Dict[str, Any]) -> str:
    """Human-readable summary of a :class:`QARMCodes` ``meta`` (the CLI's output)."""
    rq = meta["rq_stats"]
    lines = [f"RQ codes of {rq['num_items']} items ({meta['levels']} levels x "
             f"{meta['codebook_size']} codes, {meta['rq_config']['metric']}):",
             f"{'level':>5} {'codes':>6} {'perplexity':>10} {'prefixes':>9} "
             f"{'items/prefix':>12} {'max':>6} {'unique':>7} {'residual':>9}"]
    residual = meta.get("rq_residual_mse") or [float("nan")] * len(rq["levels"])
    for s, res in zip(rq["levels"], residual):
        lines.append(f"{s['level']:>5} {s['distinct_codes']:>6} {s['perplexity']:>10.1f} "
                     f"{s['distinct_prefixes']:>9} {s['mean_items_per_prefix']:>12.2f} "
                     f"{s['max_items_per_prefix']:>6} {s['unique_prefix_frac']:>7.3f} "
                     f"{res:>9.4f}")
    vq = meta["vq_stats"]
    recall = meta.get("vq_recall")
    rtxt = ("exact search" if recall is None else
            f"recall@{meta['k']} {recall:.4f} vs exact on {meta['vq_recall_queries']} queries")
    if recall is not None and recall < 0.9:
        rtxt += " (low: raise nprobe / ef_search, or search exactly)"
    lines.append(f"VQ codes: {meta['k']} per item from {meta['num_codebook_items']} codebook "
                 f"items ({meta['vq_index']}): {rtxt}")
    lines.append(f"  {vq['distinct_codes']} codebook items used as codes; uses per codebook "
                 f"item mean {vq['mean_uses']:.1f}, max {vq['max_uses']}")
    return "\n".join(lines)


def _vq_stats(vq: np.ndarray, num_codebook: int) -> Dict[str, Any]:
    uses = np.unique(vq, return_counts=True)[1] if vq.size else np.zeros(0, np.int64)
    return {"distinct_codes": int(uses.size),
            "mean_uses": float(vq.size / max(1, num_codebook)),
            "max_uses": int(uses.max()) if uses.size else 0}


# -------------------------------------------------------------------------- artefact


@dataclass
class QARMCodes:
    """VQ and RQ codes of every item plus what is needed to code new items.

    Attributes:
        vq: [N, K] int64 item ids, nearest first; :attr:`vq_none` (= N) for items
            without a representation.
        rq: [N, L] int64 in ``[0, C)``; :attr:`rq_none` (= C) for items without one.
        has_code: [N] bool.
        rq_centroids: [L, C, d] float32.
        vq_item_ids: [n_cb] int64 item ids of the VQ codebook rows.
        vq_reps: [n_cb, d] float32 codebook rows (ℓ2-normalised for cosine).
        meta: configs, sizes, VQ recall and code statistics (JSON-serialisable).
    """

    vq: torch.Tensor
    rq: torch.Tensor
    has_code: torch.Tensor
    rq_centroids: torch.Tensor
    vq_item_ids: torch.Tensor
    vq_reps: torch.Tensor
    meta: Dict[str, Any] = field(default_factory=dict)
    _vq_cb: Optional[VQCodebook] = field(default=None, repr=False, compare=False)
    _rq_cb: Optional[RQCodebook] = field(default=None, repr=False, compare=False)

    @property
    def num_items(self) -> int:
        return int(self.vq.shape[0])

    @property
    def k(self) -> int:
        return int(self.vq.shape[1])

    @property
    def levels(self) -> int:
        return int(self.rq.shape[1])

    @property
    def codebook_size(self) -> int:
        return int(self.rq_centroids.shape[1])

    @property
    def dim(self) -> int:
        return int(self.rq_centroids.shape[2])

    @property
    def vq_none(self) -> int:
        """The reserved VQ code of items without a representation (= N)."""
        return self.num_items

    @property
    def rq_none(self) -> int:
        """The reserved RQ code of items without a representation (= C)."""
        return self.codebook_size

    @property
    def vq_vocab(self) -> int:
        """Rows of a VQ code embedding table: N item ids + the "no code" index."""
        return self.num_items + 1

    @property
    def rq_vocab(self) -> int:
        """Rows of an RQ code embedding table (per level): C codes + "no code"."""
        return self.codebook_size + 1

    def vq_codebook(self, index: str = "flat") -> VQCodebook:
        """The VQ codebook over :attr:`vq_reps` (``index``: flat = exact by default;
        an approximate index is rebuilt, which takes minutes for millions of rows)."""
        cfg = VQConfig(**{**self.meta.get("vq_config", {}), "k": self.k, "index": index})
        if self._vq_cb is None or self._vq_cb.index_type != cfg.resolve_index(
                int(self.vq_item_ids.shape[0])):
            self._vq_cb = VQCodebook(item_ids=self.vq_item_ids.numpy(),
                                     reps=np.ascontiguousarray(self.vq_reps.float().numpy()),
                                     config=cfg, index_type=cfg.resolve_index(
                                         int(self.vq_item_ids.shape[0])))
        return self._vq_cb

    def rq_codebook(self) -> RQCodebook:
        if self._rq_cb is None:
            self._rq_cb = RQCodebook(self.rq_centroids.float(),
                                     metric=self.meta.get("rq_config", {}).get("metric",
                                                                               "cosine"))
        return self._rq_cb

    def assign_new(self, reps: ArrayLike, index: str = "flat"
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Codes of new items from their representations (same codebooks).

        Args:
            reps: ``[n, d]`` representations.
            index: VQ search (``"flat"`` exact by default, see :meth:`vq_codebook`).

        Returns:
            ``(vq int64 [n, K], rq int64 [n, L])``.

        Raises:
            ValueError: NaN/Inf or (cosine) zero rows, naming the row.
        """
        x = _as_matrix(reps)
        if x.shape[1] != self.dim:
            raise ValueError(f"reps have dimension {x.shape[1]}, the codes {self.dim}")
        vq = self.vq_codebook(index).assign(x)
        rq = self.rq_codebook().assign(x)
        return torch.from_numpy(vq), torch.from_numpy(rq)


def build_codes(
    reps: ArrayLike,
    has_rep: Optional[ArrayLike],
    vq: VQConfig,
    rq: RQConfig,
    codebook_mask: Optional[ArrayLike] = None,
    progress: bool = True,
) -> QARMCodes:
    """VQ and RQ codes of every item (paper Algorithm 1 + eq. 3 and 5).

    Args:
        reps: ``[N, d]`` representations indexed by item id (torch or numpy).
        has_rep: ``[N]`` bool (None: all); the others get the "no code" indices.
        vq: :class:`VQConfig`; rq: :class:`RQConfig`.
        codebook_mask: ``[N]`` bool, items allowed in the VQ codebook (None: all).
        progress: tqdm bars.

    Returns:
        :class:`QARMCodes`.
    """
    x = _as_matrix(reps)
    n = x.shape[0]
    has = _as_mask(has_rep, n, "has_rep")
    rows = np.flatnonzero(has)
    check_representations(x, rows, "cosine" if "cosine" in (vq.metric, rq.metric) else "l2")

    rq_cb, rq_rows, rq_mse = _build_rq_checked(x[rows], rq, progress)
    vq_cb = _build_vq_checked(x, has, vq, codebook_mask, progress)
    vq_rows = vq_cb._assign_checked(x[rows], rows, progress)

    vq_codes = np.full((n, vq.k), n, dtype=np.int64)
    vq_codes[rows] = vq_rows
    rq_codes = np.full((n, rq.levels), rq.codebook_size, dtype=np.int64)
    rq_codes[rows] = rq_rows
    meta = {
        "format": FORMAT,
        "num_items": int(n),
        "dim": int(x.shape[1]),
        "num_with_code": int(rows.size),
        "num_codebook_items": vq_cb.size,
        "k": int(vq.k),
        "levels": int(rq.levels),
        "codebook_size": int(rq.codebook_size),
        "vq_config": dataclasses.asdict(vq),
        "rq_config": dataclasses.asdict(rq),
        "vq_index": vq_cb.describe(),
        "vq_recall": vq_cb.recall,
        "vq_recall_queries": vq_cb.recall_queries,
        "vq_stats": _vq_stats(vq_rows, vq_cb.size),
        "rq_stats": code_stats(rq_rows),
        "rq_residual_mse": [float(v) for v in rq_mse],
    }
    return QARMCodes(vq=torch.from_numpy(vq_codes), rq=torch.from_numpy(rq_codes),
                     has_code=torch.from_numpy(has.copy()), rq_centroids=rq_cb.centroids,
                     vq_item_ids=torch.from_numpy(vq_cb.item_ids),
                     vq_reps=torch.from_numpy(vq_cb.reps), meta=meta,
                     _vq_cb=vq_cb, _rq_cb=rq_cb)


def save_codes(codes: QARMCodes, out_dir: str) -> None:
    """Writes ``codes.safetensors`` then ``codes.json`` (atomically each; any previous
    ``codes.json`` is removed first, so a crash leaves a directory that does not load)."""
    _check_consistent(codes, out_dir)
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, META_FILE)
    if os.path.exists(meta_path):
        os.unlink(meta_path)
    token = uuid.uuid4().hex
    save_tensors(os.path.join(out_dir, TENSORS_FILE), {
        "vq": codes.vq.long(), "rq": codes.rq.long(), "has_code": codes.has_code.bool(),
        "rq_centroids": codes.rq_centroids.float(), "vq_item_ids": codes.vq_item_ids.long(),
        "vq_reps": codes.vq_reps.float()}, metadata={"format": FORMAT, "token": token})
    meta = {**codes.meta, "format": FORMAT, "token": token, "num_items": codes.num_items,
            "k": codes.k, "levels": codes.levels, "codebook_size": codes.codebook_size,
            "dim": codes.dim, "num_codebook_items": int(codes.vq_item_ids.shape[0])}
    write_json(meta_path, meta)


def load_codes(out_dir: str) -> QARMCodes:
    """Reads a codes directory written by :func:`save_codes`.

    Raises:
        FileNotFoundError: no ``codes.json`` / ``codes.safetensors`` (not written, or
            the write did not finish).
        ValueError: files that do not belong together or inconsistent tensors.
    """
    meta_path = os.path.join(out_dir, META_FILE)
    tensors_path = os.path.join(out_dir, TENSORS_FILE)
    if not os.path.exists(meta_path):
        hint = (" (codes.safetensors is there: the write did not finish)"
                if os.path.exists(tensors_path) else "")
        raise FileNotFoundError(f"{meta_path} not found: no QARM codes in {out_dir!r}{hint}; "
                                "run `torchrec-mm qarm codes`")
    with open(meta_path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(meta_path, f"line {e.lineno}", None, f"invalid JSON: {e.msg}")
    if meta.get("format") != FORMAT:
        raise DataError(meta_path, 0, "format", f"expected {FORMAT!r}, got {meta.get('format')!r}")
    if not os.path.exists(tensors_path):
        raise FileNotFoundError(f"{tensors_path} not found, but {meta_path} exists: "
                                "incomplete codes directory")
    from safetensors import safe_open

    with safe_open(tensors_path, framework="pt") as f:
        file_meta = f.metadata() or {}
    if file_meta.get("token") != meta.get("token"):
        raise ValueError(f"{tensors_path} and {meta_path} come from different runs "
                         "(token mismatch): write the codes again")
    t = load_tensors(tensors_path)
    missing = [k for k in _TENSOR_NAMES if k not in t]
    if missing:
        raise DataError(tensors_path, 0, missing[0], f"missing tensors {missing}")
    codes = QARMCodes(vq=t["vq"], rq=t["rq"], has_code=t["has_code"].bool(),
                      rq_centroids=t["rq_centroids"].float(), vq_item_ids=t["vq_item_ids"],
                      vq_reps=t["vq_reps"].float(), meta=meta)
    _check_consistent(codes, tensors_path)
    for key in ("num_items", "k", "levels", "codebook_size", "dim"):
        if key in meta and int(meta[key]) != getattr(codes, key):
            raise DataError(meta_path, 0, key, f"{meta[key]} but the tensors have "
                            f"{getattr(codes, key)}")
    return codes


def _check_consistent(codes: QARMCodes, where: str) -> None:
    n, k = codes.vq.shape if codes.vq.dim() == 2 else (-1, -1)
    if codes.vq.dim() != 2 or codes.rq.dim() != 2 or codes.rq_centroids.dim() != 3:
        raise ValueError(f"{where}: vq must be [N, K], rq [N, L], rq_centroids [L, C, d]; "
                         f"got {tuple(codes.vq.shape)}, {tuple(codes.rq.shape)}, "
                         f"{tuple(codes.rq_centroids.shape)}")
    levels, c, d = codes.rq_centroids.shape
    if codes.rq.shape != (n, levels) or tuple(codes.has_code.shape) != (n,):
        raise ValueError(f"{where}: rq {tuple(codes.rq.shape)} / has_code "
                         f"{tuple(codes.has_code.shape)} do not match vq [N={n}, K] and "
                         f"rq_centroids [L={levels}, C, d]")
    n_cb = codes.vq_item_ids.shape[0]
    if codes.vq_item_ids.dim() != 1 or tuple(codes.vq_reps.shape) != (n_cb, d):
        raise ValueError(f"{where}: vq_reps {tuple(codes.vq_reps.shape)} must be "
                         f"[n_cb={n_cb}, d={d}]")
    has = codes.has_code.bool()
    ids = codes.vq_item_ids.long()
    if n_cb and (int(ids.min()) < 0 or int(ids.max()) >= n or not bool(has[ids].all())):
        raise ValueError(f"{where}: vq_item_ids must be items with a code in [0, {n})")
    for name, t, none in (("vq", codes.vq, n), ("rq", codes.rq, c)):
        ok = torch.where(has[:, None], (t >= 0) & (t < none), t == none)
        if not bool(ok.all()):
            item = int((~ok).nonzero()[0, 0])
            raise ValueError(f"{where}: item {item}, tensor '{name}': codes must be in "
                             f"[0, {none}) for items with a code and {none} (no code) "
                             "for the others")
    if not bool(torch.isfinite(codes.rq_centroids).all()) or not bool(
            torch.isfinite(codes.vq_reps).all()):
        raise ValueError(f"{where}: rq_centroids / vq_reps contain NaN/Inf")


# ------------------------------------------------------------------------ inputs


def load_representations(path: str, metric: str = "cosine") -> Tuple[np.ndarray, np.ndarray]:
    """Representations by item id from a file or a content store.

    Args:
        path: a safetensors file with ``reps`` float ``[N, d]`` and ``has_rep`` bool
            ``[N]`` (what ``qarm align`` writes; without ``has_rep`` every item has one),
            or a ContentStore directory written by ``torchrec-mm encode`` (its
            ``pooled`` states; items missing from the store have no representation).
        metric: with ``"cosine"`` (default) a zero representation is an error.

    Returns:
        ``(reps float32 [N, d], has_rep bool [N])``; rows without a representation are 0.

    Raises:
        FileNotFoundError: nothing at ``path``.
        DataError: a missing/malformed tensor, or a NaN/Inf or (for cosine) zero
            representation of an item with ``has_rep`` — naming file, item and field.
    """
    if os.path.isdir(path):
        from torchrec_mm.content.store import ContentStore

        store = ContentStore(path)
        reps = store.as_table("pooled").numpy()
        has = ~store.missing.numpy()
        source = os.path.join(path, "pooled")
    elif os.path.isfile(path):
        try:
            t = load_tensors(path)
        except Exception as e:  # safetensors raises its own error types
            raise DataError(path, 0, None, f"not a readable safetensors file: {e}") from None
        if "reps" not in t:
            raise DataError(path, 0, "reps", f"missing tensor 'reps' (found {sorted(t)})")
        r = t["reps"]
        if r.dim() != 2 or not r.dtype.is_floating_point:
            raise DataError(path, 0, "reps", f"expected float [N, d], got {r.dtype} "
                            f"{tuple(r.shape)}")
        reps = r.float().numpy()
        if "has_rep" in t:
            h = t["has_rep"]
            if tuple(h.shape) != (reps.shape[0],):
                raise DataError(path, 0, "has_rep", f"expected shape ({reps.shape[0]},), "
                                f"got {tuple(h.shape)}")
            if h.dtype != torch.bool and not bool(((h == 0) | (h == 1)).all()):
                raise DataError(path, 0, "has_rep", f"expected bool, got {h.dtype} values")
            has = h.bool().numpy()
        else:
            has = np.ones(reps.shape[0], dtype=bool)
        source = path
    else:
        raise FileNotFoundError(f"{path} not found: expected a safetensors file with 'reps' "
                                "and 'has_rep', or a content store directory")
    reps = np.ascontiguousarray(reps, dtype=np.float32)
    _check_choice("metric", metric, METRICS)
    check_representations(reps, np.flatnonzero(has), metric, source=source)
    reps[~has] = 0.0
    return reps, has
