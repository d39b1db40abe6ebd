"""Grouping of transformer layers into shallow → deep subgroups (IDProxy section 3.2.1).

IDProxy runs k-means over the layers of the (stage-1) encoder to get three layer
subgroups "capturing hierarchical information from shallow to deep representations",
then applies the pooling ``g`` to each subgroup. The paper does not say which
per-layer features are clustered; we choose as follows.

**Layer descriptor: the layer's representational geometry (linear CKA).** For a sample
of N items, layer ``l`` is described by the centred Gram matrix ``K_l = X_l X_l^T``
(``X_l`` = the ``[N, D]`` pooled states of the sample at layer ``l``, centred over
items), normalised to unit Frobenius norm. The inner product of two such
descriptors is linear CKA (Kornblith et al., 2019), the standard similarity of layer
representations, so the squared distance is ``2 - 2 CKA(l, m)``. Raw pooled states
would instead cluster layers by their norm, which grows by orders of magnitude with
depth in LLM residual streams, and would depend on the basis of each layer; CKA is
invariant to both (isotropic scaling and orthogonal transforms) and only asks
"do these layers see the same items as similar?". All that k-means needs is this
``[L, L]`` Gram matrix of descriptors (:func:`layer_similarity`).

**Contiguity: k-means restricted to contiguous segments, solved exactly.** Groups
must be contiguous and ordered shallow → deep. Instead of running Lloyd's k-means
and repairing its clusters, :func:`contiguous_kmeans` minimises the same k-means
objective (within-group sum of squared distances to the group mean) over all
partitions of the index-ordered layers into contiguous segments, exactly, by
dynamic programming (Fisher's optimal partition of an ordered sequence,
``O(K L^2)``). When Lloyd's (unconstrained) solution happens to be contiguous, the
DP finds the same partition or one with a lower objective; it is deterministic and
has no initialisation to seed. :func:`kmeans_layer_labels` runs plain seeded k-means
(scipy) on the same geometry as a diagnostic (the encode job records both).
"""

import itertools
import logging
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

logger = logging.getLogger(__name__)


def default_layer_groups(num_layers: int, num_groups: int = 3, first: int = 0
                         ) -> List[List[int]]:
    """Equal-size contiguous split of layers ``first .. first + num_layers - 1`` into
    ``min(num_groups, num_layers)`` groups (used before the k-means grouping is known)."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    k = max(1, min(num_groups, num_layers))
    return [[first + int(i) for i in part]
            for part in np.array_split(np.arange(num_layers), k)]


def layer_similarity(per_layer_pooled: torch.Tensor) -> torch.Tensor:
    """Linear CKA between the layers.

    Args:
        per_layer_pooled: ``[N, L, D]`` pooled states of N sample items at L layers.

    Returns:
        ``[L, L]`` float64 matrix, the Gram matrix of the unit-norm centred-Gram
        descriptors (1 on the diagonal; 0 for a layer constant over the items).
    """
    if per_layer_pooled.dim() != 3:
        raise ValueError(f"per_layer_pooled must be [N, L, D], got {tuple(per_layer_pooled.shape)}")
    x = per_layer_pooled.detach().to(torch.float64).transpose(0, 1)  # [L, N, D]
    x = x - x.mean(dim=1, keepdim=True)
    gram = torch.matmul(x, x.transpose(1, 2)).flatten(1)  # [L, N*N]
    norm = gram.norm(dim=1, keepdim=True)
    gram = torch.where(norm > 0, gram / norm.clamp_min(1e-300), torch.zeros_like(gram))
    return gram @ gram.T


def _segment_costs(gram: np.ndarray) -> np.ndarray:
    """``cost[a, b]`` = k-means SSE of the segment ``a .. b-1`` (``a < b``) for points
    with inner products ``gram``; ``inf`` elsewhere."""
    n = gram.shape[0]
    prefix = np.zeros((n + 1, n + 1))
    prefix[1:, 1:] = gram.cumsum(0).cumsum(1)
    diag = np.concatenate([[0.0], np.cumsum(np.diag(gram))])
    a = np.arange(n + 1)[:, None]
    b = np.arange(n + 1)[None, :]
    block = prefix[b, b] - prefix[a, b] - prefix[b, a] + prefix[a, a]
    size = (b - a).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = (diag[b] - diag[a]) - block / size
    cost = np.where(b > a, np.maximum(cost, 0.0), np.inf)
    return cost


def partition_cost(gram: np.ndarray, groups: Sequence[Sequence[int]]) -> float:
    """k-means objective (sum over groups of squared distances to the group mean)."""
    gram = np.asarray(gram, dtype=np.float64)
    total = 0.0
    for g in groups:
        idx = np.asarray(g)
        sub = gram[np.ix_(idx, idx)]
        total += float(np.trace(sub) - sub.sum() / len(idx))
    return total


def contiguous_kmeans(gram: np.ndarray, num_groups: int) -> List[List[int]]:
    """Exact k-means over index-ordered points under the constraint that every cluster
    is a contiguous run of indices (dynamic programming).

    Args:
        gram: ``[L, L]`` inner products of the points (e.g. :func:`layer_similarity`).
        num_groups: number of groups; ``min(num_groups, L)`` are returned.

    Returns:
        groups of indices, contiguous, ordered by index, covering ``0 .. L-1``.
    """
    gram = np.asarray(gram, dtype=np.float64)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ValueError(f"gram must be a non-empty square matrix, got {gram.shape}")
    n = gram.shape[0]
    k = max(1, min(int(num_groups), n))
    cost = _segment_costs(gram)
    best = np.full((k + 1, n + 1), np.inf)
    arg = np.zeros((k + 1, n + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for g in range(1, k + 1):
        for j in range(g, n + 1):
            cand = best[g - 1, :j] + cost[:j, j]
            i = int(np.argmin(cand))  # first minimum: deterministic tie-breaking
            best[g, j], arg[g, j] = cand[i], i
    cuts = [n]
    for g in range(k, 0, -1):
        cuts.append(int(arg[g, cuts[-1]]))
    cuts = cuts[::-1]
    return [list(range(cuts[g], cuts[g + 1])) for g in range(k)]


def brute_force_contiguous(gram: np.ndarray, num_groups: int) -> Tuple[float, List[List[int]]]:
    """Reference for tests: the best contiguous partition by enumeration (small L)."""
    n = gram.shape[0]
    k = max(1, min(num_groups, n))
    best: Tuple[float, List[List[int]]] = (np.inf, [])
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0,) + cuts + (n,)
        groups = [list(range(bounds[i], bounds[i + 1])) for i in range(k)]
        c = partition_cost(gram, groups)
        if c < best[0] - 1e-12:
            best = (c, groups)
    return best


def kmeans_layer_labels(gram: np.ndarray, num_groups: int, seed: int = 0,
                        n_init: int = 10) -> List[int]:
    """Plain (unconstrained) seeded Lloyd k-means on the points of ``gram`` (embedded
    exactly by classical MDS), labels renumbered shallow → deep by mean index.
    A diagnostic: tells whether the contiguity constraint was binding."""
    from scipy.cluster.vq import kmeans2

    gram = np.asarray(gram, dtype=np.float64)
    n = gram.shape[0]
    k = max(1, min(int(num_groups), n))
    w, v = np.linalg.eigh(gram)
    coords = v * np.sqrt(np.clip(w, 0.0, None))[None, :]
    best_labels, best_sse = np.zeros(n, dtype=np.int64), np.inf
    rng = np.random.default_rng(seed)
    for _ in range(n_init):
        try:
            centroids, labels = kmeans2(coords, k, minit="++", iter=50, missing="raise",
                                        seed=int(rng.integers(2**31)))
        except Exception:  # empty cluster: try another initialisation
            continue
        sse = float(((coords - centroids[labels]) ** 2).sum())
        if sse < best_sse - 1e-12:
            best_sse, best_labels = sse, labels
    order = sorted(range(k), key=lambda c: (np.mean(np.nonzero(best_labels == c)[0])
                                            if np.any(best_labels == c) else np.inf))
    remap = {c: i for i, c in enumerate(order)}
    return [remap[int(c)] for c in best_labels]


def group_layers(per_layer_pooled: torch.Tensor, num_groups: int = 3, seed: int = 0,
                 max_items: Optional[int] = 512) -> List[List[int]]:
    """Contiguous shallow → deep layer groups by k-means over layer descriptors.

    Args:
        per_layer_pooled: ``[N, L, D]`` pooled states of N sample items at L layers
            (e.g. ``ContentEncoderOutput.per_layer[:, 1:]`` for the transformer layers).
        num_groups: number of groups (IDProxy: 3); ``min(num_groups, L)`` are returned.
        seed: seeds the item subsample when ``N > max_items``.
        max_items: cap on the sample size (the descriptor costs ``O(L N^2)`` memory).

    Returns:
        lists of layer indices into dim 1 of ``per_layer_pooled``: contiguous, ordered,
        together covering ``0 .. L-1``.
    """
    n, num_layers = per_layer_pooled.shape[0], per_layer_pooled.shape[1]
    if n < 2:
        raise ValueError(f"group_layers needs at least 2 sample items, got {n}")
    if num_groups > num_layers:
        logger.warning("only %d layers for %d layer groups: using %d groups",
                       num_layers, num_groups, num_layers)
    if max_items is not None and n > max_items:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=max_items, replace=False))
        per_layer_pooled = per_layer_pooled[torch.from_numpy(idx)]
    sim = layer_similarity(per_layer_pooled).numpy()
    return contiguous_kmeans(sim, num_groups)
