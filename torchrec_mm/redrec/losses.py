"""RED-Rec training losses (paper ``001_42c7267e32b49bc6``: §4.2 "Training Objective",
eq. 6; appendix E.2, eq. A5–A6).

Scores are cosine similarities divided by a temperature ``τ``::

    logit(u, v) = cos(u, v) / τ

(eq. A6 writes ``sim/τ``; eq. 6 writes ``τ·cos``, i.e. its ``τ`` is the inverse,
``1/τ`` here.) :class:`LearnableTemperature` holds ``log τ`` so the temperature stays
positive and is learnt on a log scale.

- :func:`nce_loss` — eq. 6: for each row ``b`` a softmax over its positive, the other
  rows' positives (in-batch negatives) and ``M`` shared sampled negatives.
- :func:`multi_interest_window_loss` — eq. A5–A6: the ``W`` next items of each user (the
  look-ahead window) are clustered by cosine into ``K`` groups (as many as interest
  vectors) with a batched spherical k-means, cluster centroids are matched one-to-one to
  the interest vectors with the Hungarian algorithm (maximum total cosine), and every
  window item contributes the NCE of (item, its matched interest) against the negatives:

      L_u = 1/w Σ_{i=1..w} Σ_j L_NCE(t_i, r_j) · Π(i, j)                    (A5)
      L_NCE(t, r) = −log e^{cos(t,r)/τ} / (e^{cos(t,r)/τ} + Σ_m e^{cos(r,e_m)/τ})   (A6)

  with ``w`` the number of valid window items of the user; the batch loss is the mean of
  ``L_u`` over users with at least one valid window item. Clustering and matching run
  under ``no_grad`` (they only choose Π); gradients flow to the interests, the window
  items and the negatives.
- :func:`single_interest_loss` — the single-interest baseline of the ablation (Table 3):
  one user vector (a single query, or the mean / first of K interests) against the next
  item (eq. 6) or against every window item (A5 with K = 1).

Masked ("accidental hit") negatives: when item ids are given, a negative with the same
item id as the positive is removed from that row's softmax.

Item bias (an option, not in the paper): with per-item offsets ``b`` (:class:`ItemBias`)
every logit of item ``v`` becomes ``cos(u, v) / τ + b_v``, as a positive and as a
negative. With uniform negatives the softmax's optimum ranks by ``log p(v | u)``, which
holds the item's popularity; a content-only item tower can put popularity that its
texts do not explain only into a direction every user's interests share, the bias
gives it a parameter of its own.
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

__all__ = [
    "ITEM_BIASES",
    "ItemBias",
    "LearnableTemperature",
    "WindowAssignment",
    "assign_window",
    "match_clusters_to_interests",
    "multi_interest_window_loss",
    "nce_loss",
    "single_interest_loss",
    "spherical_kmeans",
    "window_nce_loss",
]

TauLike = Union[torch.Tensor, float]
REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------- temperature


class LearnableTemperature(nn.Module):
    """A learnable softmax temperature ``τ``, parameterised by ``log τ``.

    ``forward()`` returns ``τ = exp(clamp(log τ, log min_tau, log max_tau))`` (a 0-dim
    tensor). The clamp bounds the value used in the loss; as in CLIP, call
    :meth:`clamp_` after each optimizer step to also project the parameter back into the
    range (a parameter left outside it would receive no gradient).

    Args:
        init: initial temperature (0.07, CLIP's / the usual InfoNCE value).
        min_tau: smallest temperature (0.01, i.e. a logit scale of at most 100 as in CLIP).
        max_tau: largest temperature.
        learnable: False keeps ``τ`` fixed (a buffer), for ablations.
    """

    def __init__(self, init: float = 0.07, min_tau: float = 0.01, max_tau: float = 1.0,
                 learnable: bool = True) -> None:
        super().__init__()
        if not (0 < min_tau <= init <= max_tau) or not math.isfinite(max_tau):
            raise ValueError(
                f"LearnableTemperature: need 0 < min_tau <= init <= max_tau < inf, got "
                f"min_tau={min_tau}, init={init}, max_tau={max_tau}"
            )
        self.init = float(init)
        self.min_tau = float(min_tau)
        self.max_tau = float(max_tau)
        self.learnable = bool(learnable)
        value = torch.tensor(math.log(self.init), dtype=torch.float32)
        if self.learnable:
            self.log_tau = nn.Parameter(value)
        else:
            self.register_buffer("log_tau", value)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.log_tau.fill_(math.log(self.init))

    def forward(self) -> torch.Tensor:
        """Returns: τ, a 0-dim tensor in ``[min_tau, max_tau]``."""
        return self.log_tau.clamp(math.log(self.min_tau), math.log(self.max_tau)).exp()

    @torch.no_grad()
    def clamp_(self) -> "LearnableTemperature":
        """Projects ``log τ`` into ``[log min_tau, log max_tau]`` in place."""
        self.log_tau.clamp_(math.log(self.min_tau), math.log(self.max_tau))
        return self

    def extra_repr(self) -> str:
        return (f"init={self.init}, min_tau={self.min_tau}, max_tau={self.max_tau}, "
                f"learnable={self.learnable}")


#: ``RedRecConfig.item_bias``: none, or a learned bias starting at 0 / at the log counts
ITEM_BIASES: Tuple[str, ...] = ("none", "zero", "log_count")


class ItemBias(nn.Module):
    """A learned logit offset per item (module doc, "Item bias").

    ``forward(ids [*]) -> [*]`` the offsets of ``ids`` (int64 in ``[0, num_items)``).
    Dense: one float per catalogue item, replicated data-parallel under DMP (4 MB per
    million items).

    Args:
        num_items: catalogue size N.
        counts: optional [N] non-negative counts: the bias starts at ``log(1 + count)``
            minus its mean (the popularity prior; a constant shift changes no softmax);
            None: it starts at 0.
    """

    def __init__(self, num_items: int,
                 counts: Optional[Union[torch.Tensor, np.ndarray]] = None) -> None:
        super().__init__()
        if num_items < 1:
            raise ValueError(f"ItemBias: num_items must be >= 1, got {num_items}")
        init = torch.zeros(num_items)
        if counts is not None:
            counts = torch.as_tensor(counts, dtype=torch.float64).flatten()
            if counts.numel() != num_items or not bool(torch.isfinite(counts).all()) \
                    or bool((counts < 0).any()):
                raise ValueError(f"ItemBias: counts must be {num_items} finite values >= 0, "
                                 f"got {counts.numel()}")
            init = torch.log1p(counts)
            init = (init - init.mean()).float()
        self.weight = nn.Parameter(init)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids]

    def extra_repr(self) -> str:
        return f"num_items={self.weight.shape[0]}"


# --------------------------------------------------------------------------- validation


def _check_shape(x: torch.Tensor, name: str, shape: Tuple[Optional[int], ...],
                 what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {what}, got {type(x).__name__}")
    ok = x.dim() == len(shape) and all(s is None or s == t for s, t in zip(shape, x.shape))
    if not ok:
        raise ValueError(f"{name}: expected shape {what}, got {tuple(x.shape)}")


def _check_finite(x: torch.Tensor, name: str, where: Optional[torch.Tensor] = None) -> None:
    """Raises on NaN/Inf in ``x`` (restricted to rows/positions ``where`` if given)."""
    bad = ~torch.isfinite(x.detach())
    if x.dim() > 1:
        bad = bad.any(-1)  # one flag per vector
    if where is not None:
        bad = bad & where
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name}: {int(bad.sum())} vector(s) with NaN/Inf; first at index "
            f"{first if len(first) > 1 else first[0]}"
        )


def _check_ids(x: Optional[torch.Tensor], name: str, shape: Tuple[Optional[int], ...],
               what: str) -> Optional[torch.Tensor]:
    if x is None:
        return None
    _check_shape(x, name, shape, what)
    if x.dtype.is_floating_point or x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{name}: expected integer item ids, got {x.dtype}")
    return x


def _check_bias(bias: Optional[torch.Tensor], name: str, n: int) -> Optional[torch.Tensor]:
    """``bias`` as a flat [n] tensor of finite per-item offsets (or None)."""
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor) or bias.numel() != n:
        raise ValueError(f"{name}: expected {n} per-item offsets, got "
                         f"{tuple(getattr(bias, 'shape', ())) or type(bias).__name__}")
    _check_finite(bias, name)
    return bias.reshape(n)


def _check_neg_bias(neg_bias: Optional[torch.Tensor], num_neg: int,
                    pos_bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The sampled negatives' [M] bias: an item bias is every item's, so the negatives
    have one exactly when the positives do (and there are negatives)."""
    if num_neg > 0 and (neg_bias is None) != (pos_bias is None):
        raise ValueError("neg_bias: an item bias needs the offsets of the positives and of "
                         "the sampled negatives, got only the "
                         + ("negatives'" if pos_bias is None else "positives'"))
    return _check_bias(neg_bias, "neg_bias", num_neg)


def _as_tau(tau: TauLike, ref: torch.Tensor) -> torch.Tensor:
    t = tau if isinstance(tau, torch.Tensor) else torch.tensor(float(tau), dtype=ref.dtype)
    if t.numel() != 1:
        raise ValueError(f"tau: expected a scalar temperature, got shape {tuple(t.shape)}")
    t = t.reshape(()).to(device=ref.device, dtype=ref.dtype)
    v = float(t.detach())
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"tau: the temperature must be finite and > 0, got {v}")
    return t


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: {reduction!r} is not one of {REDUCTIONS}")


# --------------------------------------------------------------------------- NCE (eq. 6)


def nce_loss(
    user: torch.Tensor,
    pos: torch.Tensor,
    neg: Optional[torch.Tensor],
    tau: TauLike,
    in_batch: bool = True,
    pos_ids: Optional[torch.Tensor] = None,
    neg_ids: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    pos_bias: Optional[torch.Tensor] = None,
    neg_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sampled-softmax NCE with cosine scores (RED-Rec eq. 6).

    Row ``b``'s softmax runs over ``{pos_b} ∪ {pos_j : j ≠ b}`` (if ``in_batch``) ``∪
    {neg_m}``; logits are ``cos(user_b, ·) / τ``::

        L_b = −log e^{cos(u_b,p_b)/τ} / (e^{cos(u_b,p_b)/τ} + Σ_{j≠b} e^{cos(u_b,p_j)/τ}
                                                         + Σ_m e^{cos(u_b,n_m)/τ})

    Accidental hits: with ``pos_ids``, an in-batch positive ``p_j`` with
    ``pos_ids[j] == pos_ids[b]`` is dropped from row ``b``; with ``neg_ids`` too, a
    sampled negative with ``neg_ids[m] == pos_ids[b]`` is dropped.

    Args:
        user: [B, d] user (interest) vectors.
        pos: [B, d] positive item vectors (the next item of each row).
        neg: optional [M, d] sampled negative item vectors, shared by all rows.
        tau: temperature, a float or 0-dim tensor (e.g. ``LearnableTemperature()()``).
        in_batch: also use the other rows' positives as negatives.
        pos_ids: optional [B] item ids of the positives.
        neg_ids: optional [M] item ids of the negatives (needs ``pos_ids``).
        reduction: ``"mean"`` (over rows), ``"sum"`` or ``"none"`` ([B]).
        pos_bias / neg_bias: optional [B] / [M] per-item logit offsets (an item bias,
            :class:`ItemBias`): item ``i``'s logit is ``cos(u, i) / τ + bias_i``
            wherever it appears (as a row's positive or as an in-batch / sampled
            negative); given for the positives, needed for the negatives too.

    Returns:
        The loss: a scalar, or [B] with ``reduction="none"``.
    """
    _check_reduction(reduction)
    _check_shape(user, "user", (None, None), "[B, d]")
    b, d = user.shape
    if b == 0:
        raise ValueError("user: empty batch (B = 0)")
    _check_shape(pos, "pos", (b, d), f"[B={b}, d={d}] like user")
    if neg is not None:
        _check_shape(neg, "neg", (None, d), f"[M, d={d}]")
    pos_ids = _check_ids(pos_ids, "pos_ids", (b,), f"[B={b}]")
    if neg_ids is not None:
        if neg is None:
            raise ValueError("neg_ids: given without neg")
        if pos_ids is None:
            raise ValueError("neg_ids: accidental-hit masking needs pos_ids as well")
        neg_ids = _check_ids(neg_ids, "neg_ids", (neg.shape[0],), f"[M={neg.shape[0]}]")
    if not in_batch and (neg is None or neg.shape[0] == 0):
        raise ValueError("nce_loss: no negatives (in_batch=False and no sampled neg)")
    _check_finite(user, "user")
    _check_finite(pos, "pos")
    if neg is not None:
        _check_finite(neg, "neg")
    pb = _check_bias(pos_bias, "pos_bias", b)
    nb = _check_neg_bias(neg_bias, 0 if neg is None else neg.shape[0], pb)
    t = _as_tau(tau, user)

    u = F.normalize(user, dim=-1)
    p = F.normalize(pos, dim=-1)
    parts = [(u * p).sum(-1, keepdim=True) / t]
    keep = [torch.ones(b, 1, dtype=torch.bool, device=u.device)]
    if in_batch:
        parts.append(u @ p.t() / t)
        m = ~torch.eye(b, dtype=torch.bool, device=u.device)
        if pos_ids is not None:
            m &= pos_ids[:, None] != pos_ids[None, :]
        keep.append(m)
    if neg is not None:
        parts.append(u @ F.normalize(neg, dim=-1).t() / t)
        if neg_ids is not None:
            assert pos_ids is not None
            keep.append(pos_ids[:, None] != neg_ids[None, :].to(pos_ids.device))
        else:
            keep.append(torch.ones(b, neg.shape[0], dtype=torch.bool, device=u.device))
    if pb is not None:
        parts[0] = parts[0] + pb[:, None]
        if in_batch:
            parts[1] = parts[1] + pb[None, :]
        if neg is not None:
            parts[-1] = parts[-1] + nb[None, :]
    logits = torch.cat(parts, 1).masked_fill(~torch.cat(keep, 1), -math.inf)
    loss = torch.logsumexp(logits, 1) - logits[:, 0]
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


# --------------------------------------------------------------------------- clustering


@torch.no_grad()
def spherical_kmeans(
    x: torch.Tensor,
    mask: torch.Tensor,
    num_clusters: int,
    iters: int = 10,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched spherical (cosine) k-means: each row ``b`` clusters its own valid points.

    Deterministic initialisation (farthest-point, cosine): the first centroid is the
    row's first valid point (the earliest window item, i.e. the next item), each further
    one the not-yet-chosen valid point whose highest cosine to the chosen centroids is
    the lowest (ties: the lowest index). A row with ``n < num_clusters`` valid points gets
    ``n`` centroids (each point its own cluster). Then at most ``iters`` Lloyd steps:
    assign to the highest-cosine centroid (ties: the lowest cluster index), centroid = the
    ℓ2-normalised mean; a cluster that empties keeps its centroid; stops early when no
    assignment changes.

    Args:
        x: [B, W, d] points (ℓ2-normalised here).
        mask: [B, W] bool, False for padding.
        num_clusters: K.
        iters: maximum Lloyd iterations.

    Returns:
        ``(assign [B, W] int64 (-1 for padding), centroids [B, K, d] unit vectors of the
        final clusters (zeros for empty ones), sizes [B, K] int64)``.
    """
    _check_shape(x, "x", (None, None, None), "[B, W, d]")
    bsz, w, d = x.shape
    _check_shape(mask, "mask", (bsz, w), f"[B={bsz}, W={w}]")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask: expected bool, got {mask.dtype}")
    k = int(num_clusters)
    if k < 1:
        raise ValueError(f"num_clusters: expected >= 1, got {num_clusters}")
    x = F.normalize(x.detach().masked_fill(~mask[..., None], 0.0), dim=-1)
    n = mask.sum(1)
    rows = torch.arange(bsz, device=x.device)
    gram = torch.bmm(x, x.transpose(1, 2))  # [B, W, W] point-to-point cosines
    picks, oks = [], []
    taken = ~mask  # padding and already chosen points
    best = x.new_full((bsz, w), -math.inf)  # highest cosine to a chosen centroid
    for j in range(k):
        ok = n > j
        if j == 0:
            idx = mask.to(torch.int8).argmax(1)  # first valid point
        else:
            idx = best.masked_fill(taken, math.inf).argmin(1)
        taken[rows, idx] |= ok
        best = torch.where(ok[:, None], torch.maximum(best, gram[rows, idx]), best)
        picks.append(idx)
        oks.append(ok)
    cvalid = torch.stack(oks, 1)  # [B, K]
    cent = x.gather(1, torch.stack(picks, 1)[..., None].expand(bsz, k, d))
    cent = cent * cvalid[..., None].to(x.dtype)

    def assign_to(centroids: torch.Tensor) -> torch.Tensor:
        sim = torch.bmm(x, centroids.transpose(1, 2))  # [B, W, K]
        sim = sim.masked_fill(~cvalid[:, None, :], -math.inf)
        return sim.argmax(-1).masked_fill(~mask, -1)

    def means(a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        onehot = F.one_hot(a.clamp(min=0), k).to(x.dtype) * mask[..., None].to(x.dtype)
        return F.normalize(torch.bmm(onehot.transpose(1, 2), x), dim=-1), onehot.sum(1)

    assign = assign_to(cent)
    for _ in range(max(0, int(iters))):
        mu, size = means(assign)
        cent = torch.where(size[..., None] > 0, mu, cent)
        new = assign_to(cent)
        if torch.equal(new, assign):
            break
        assign = new
    mu, size = means(assign)
    return assign, mu, size.round().to(torch.int64)


@torch.no_grad()
def match_clusters_to_interests(
    centroids: torch.Tensor,
    cluster_valid: torch.Tensor,
    interests: torch.Tensor,
) -> torch.Tensor:
    """Hungarian matching of each row's non-empty clusters to distinct interests,
    maximising the total cosine ``Σ cos(centroid_c, interest_π(c))``
    (``scipy.optimize.linear_sum_assignment``, one small problem per row).

    Args:
        centroids: [B, C, d]; cluster_valid: [B, C] bool (False: empty cluster, left
            unmatched); interests: [B, K, d] with ``K >= C``.

    Returns:
        cluster_interest: [B, C] int64, the matched interest of each cluster, -1 for
        empty clusters.
    """
    _check_shape(centroids, "centroids", (None, None, None), "[B, C, d]")
    bsz, c, d = centroids.shape
    _check_shape(interests, "interests", (bsz, None, d), f"[B={bsz}, K, d={d}]")
    _check_shape(cluster_valid, "cluster_valid", (bsz, c), f"[B={bsz}, C={c}]")
    if interests.shape[1] < c:
        raise ValueError(f"interests: {interests.shape[1]} interests for {c} clusters "
                         "(need at least one interest per cluster)")
    sim = torch.einsum("bcd,bkd->bck", F.normalize(centroids.detach(), dim=-1),
                       F.normalize(interests.detach(), dim=-1))
    sim_np = sim.to(torch.float64).cpu().numpy()
    valid = cluster_valid.cpu().numpy()
    out = np.full((bsz, c), -1, dtype=np.int64)
    for b in range(bsz):  # B small assignment problems (C x K, C, K ~ 3-9)
        r = np.flatnonzero(valid[b])
        if r.size:
            ri, ci = linear_sum_assignment(sim_np[b, r], maximize=True)
            out[b, r[ri]] = ci
    return torch.from_numpy(out).to(centroids.device)


@dataclass
class WindowAssignment:
    """How the window items of each user were paired with interests (the Π of eq. A5).

    Attributes:
        item_cluster: [B, W] int64 cluster of each window item (-1 for padding).
        cluster_interest: [B, K] int64 interest matched to each cluster (-1: empty).
        item_interest: [B, W] int64 interest each item trains (-1 for padding).
        centroids: [B, K, d] unit cluster centroids (zeros for empty clusters).
        cluster_sizes: [B, K] int64 items per cluster.
        matched_cosine: [B] Σ over matched clusters of cos(centroid, interest).
    """

    item_cluster: torch.Tensor
    cluster_interest: torch.Tensor
    item_interest: torch.Tensor
    centroids: torch.Tensor
    cluster_sizes: torch.Tensor
    matched_cosine: torch.Tensor

    def interest_usage(self) -> torch.Tensor:
        """[K] number of window items assigned to each interest, summed over users."""
        k = self.cluster_interest.shape[1]
        ii = self.item_interest
        return torch.bincount(ii[ii >= 0], minlength=k)


def _check_window(interests: torch.Tensor, window: torch.Tensor,
                  window_mask: torch.Tensor) -> Tuple[int, int, int, int]:
    _check_shape(interests, "interests", (None, None, None), "[B, K, d]")
    bsz, k, d = interests.shape
    if bsz == 0 or k == 0:
        raise ValueError(f"interests: empty ([B, K, d] = {tuple(interests.shape)})")
    _check_shape(window, "window", (bsz, None, d), f"[B={bsz}, W, d={d}]")
    w = window.shape[1]
    _check_shape(window_mask, "window_mask", (bsz, w), f"[B={bsz}, W={w}]")
    if window_mask.dtype != torch.bool:
        raise ValueError(f"window_mask: expected bool, got {window_mask.dtype}")
    _check_finite(interests, "interests")
    _check_finite(window, "window", window_mask)
    return bsz, k, w, d


def assign_window(
    interests: torch.Tensor,
    window: torch.Tensor,
    window_mask: torch.Tensor,
    kmeans_iters: int = 10,
) -> WindowAssignment:
    """Clusters each user's window items into K cosine clusters (K = number of
    interests, :func:`spherical_kmeans`) and matches the clusters to the interests
    (:func:`match_clusters_to_interests`). Runs under ``no_grad``.

    Args:
        interests: [B, K, d]; window: [B, W, d]; window_mask: [B, W] bool.
    """
    bsz, k, w, d = _check_window(interests, window, window_mask)
    with torch.no_grad():
        assign, cent, sizes = spherical_kmeans(window, window_mask, k, kmeans_iters)
        cvalid = sizes > 0
        ci = match_clusters_to_interests(cent, cvalid, interests)
        item_interest = torch.where(
            assign >= 0, ci.gather(1, assign.clamp(min=0)), torch.full_like(assign, -1))
        r = F.normalize(interests.detach(), dim=-1)
        r_c = r.gather(1, ci.clamp(min=0)[..., None].expand(bsz, k, d))
        matched = ((cent * r_c).sum(-1) * cvalid.to(r.dtype)).sum(1)
    return WindowAssignment(assign, ci, item_interest, cent, sizes, matched)


# --------------------------------------------------------------------------- window NCE


def window_nce_loss(
    interests: torch.Tensor,
    window: torch.Tensor,
    window_mask: torch.Tensor,
    item_interest: torch.Tensor,
    neg: Optional[torch.Tensor],
    tau: TauLike,
    in_batch: bool = False,
    window_ids: Optional[torch.Tensor] = None,
    neg_ids: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    window_bias: Optional[torch.Tensor] = None,
    neg_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Eq. A5–A6 for a given pairing Π: each valid window item ``t_bw`` is the positive
    of interest ``r_b,item_interest[b,w]``.

    The negatives of a pair are the ``M`` sampled negatives and, with ``in_batch``, the
    valid window items of the *other* users (the user's own window items are positives
    of its interests, never negatives). Accidental hits (needs ``window_ids``): a
    negative with the positive's item id is dropped.

    Args:
        interests: [B, K, d] interest vectors.
        window: [B, W, d] window (look-ahead) item vectors.
        window_mask: [B, W] bool, False for padding.
        item_interest: [B, W] int64 in ``[0, K)`` where valid (-1 or anything on padding).
        neg: optional [M, d] sampled negatives.
        tau: temperature.
        in_batch: also use other users' window items as negatives (memory ``B²W²``).
        window_ids: optional [B, W] item ids of the window items.
        neg_ids: optional [M] item ids of the negatives (needs ``window_ids``).
        reduction: ``"mean"`` over users with a valid item, ``"sum"``, or ``"none"``
            ([B], 0 for users without valid items).
        window_bias / neg_bias: optional [B, W] / [M] per-item logit offsets (as in
            :func:`nce_loss`: an item's logit is ``cos / τ + bias`` as a positive and as
            a negative; padding's values are ignored).

    Returns:
        The loss (scalar, or [B]).
    """
    _check_reduction(reduction)
    bsz, k, w, d = _check_window(interests, window, window_mask)
    _check_shape(item_interest, "item_interest", (bsz, w), f"[B={bsz}, W={w}]")
    bad = window_mask & ((item_interest < 0) | (item_interest >= k))
    if bool(bad.any()):
        b0, w0 = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"item_interest: a valid window item needs an interest in [0, {k}); user {b0}, "
            f"window position {w0} has {int(item_interest[b0, w0])}"
        )
    if neg is not None:
        _check_shape(neg, "neg", (None, d), f"[M, d={d}]")
        _check_finite(neg, "neg")
    window_ids = _check_ids(window_ids, "window_ids", (bsz, w), f"[B={bsz}, W={w}]")
    if neg_ids is not None:
        if neg is None:
            raise ValueError("neg_ids: given without neg")
        if window_ids is None:
            raise ValueError("neg_ids: accidental-hit masking needs window_ids as well")
        neg_ids = _check_ids(neg_ids, "neg_ids", (neg.shape[0],), f"[M={neg.shape[0]}]")
    if not in_batch and (neg is None or neg.shape[0] == 0):
        raise ValueError("window loss: no negatives (in_batch=False and no sampled neg)")
    if window_bias is not None:
        _check_shape(window_bias, "window_bias", (bsz, w), f"[B={bsz}, W={w}]")
        _check_finite(window_bias[..., None], "window_bias", window_mask)
        # padding may hold anything: zero it (its logits are masked out anyway)
        window_bias = window_bias.masked_fill(~window_mask, 0.0)
    nb = _check_neg_bias(neg_bias, 0 if neg is None else neg.shape[0], window_bias)
    t = _as_tau(tau, interests)

    r = F.normalize(interests, dim=-1)
    # padding may hold anything (even NaN): zero it so no gradient leaks through it
    x = F.normalize(window.masked_fill(~window_mask[..., None], 0.0), dim=-1)
    idx = item_interest.to(torch.int64).clamp(0, k - 1)
    r_item = r.gather(1, idx[..., None].expand(bsz, w, d))  # [B, W, d]
    parts = [(x * r_item).sum(-1, keepdim=True) / t]
    if window_bias is not None:
        parts[0] = parts[0] + window_bias[..., None]
    keep = [torch.ones(bsz, w, 1, dtype=torch.bool, device=r.device)]
    if neg is not None:
        m = neg.shape[0]
        s = r @ F.normalize(neg, dim=-1).t() / t  # [B, K, M]
        if nb is not None:
            s = s + nb
        parts.append(s.gather(1, idx[..., None].expand(bsz, w, m)))
        if neg_ids is not None:
            assert window_ids is not None
            keep.append(window_ids[..., None] != neg_ids.to(window_ids.device)[None, None, :])
        else:
            keep.append(torch.ones(bsz, w, m, dtype=torch.bool, device=r.device))
    if in_batch:
        flat = x.reshape(bsz * w, d)
        s = torch.einsum("bkd,nd->bkn", r, flat) / t  # [B, K, B*W]
        if window_bias is not None:
            s = s + window_bias.reshape(-1)
        parts.append(s.gather(1, idx[..., None].expand(bsz, w, bsz * w)))
        owner = torch.arange(bsz, device=r.device).repeat_interleave(w)
        m_ib = (owner[None, :] != torch.arange(bsz, device=r.device)[:, None]) \
            & window_mask.reshape(1, -1)  # [B, B*W]
        m_ib = m_ib[:, None, :].expand(bsz, w, bsz * w)
        if window_ids is not None:
            m_ib = m_ib & (window_ids[..., None] != window_ids.reshape(1, 1, -1))
        keep.append(m_ib)
    logits = torch.cat(parts, -1).masked_fill(~torch.cat(keep, -1), -math.inf)
    per_item = torch.logsumexp(logits, -1) - logits[..., 0]  # [B, W]
    per_item = torch.where(window_mask, per_item, torch.zeros_like(per_item))
    count = window_mask.sum(1)
    per_user = per_item.sum(1) / count.clamp(min=1).to(per_item.dtype)  # (A5)
    if reduction == "none":
        return per_user
    if reduction == "sum":
        return per_user.sum()
    has = count > 0
    if not bool(has.any()):
        return per_item.sum() * 0.0  # keeps the graph
    return per_user[has].mean()


def multi_interest_window_loss(
    interests: torch.Tensor,
    window: torch.Tensor,
    window_mask: torch.Tensor,
    neg: Optional[torch.Tensor],
    tau: TauLike,
    in_batch: bool = False,
    window_ids: Optional[torch.Tensor] = None,
    neg_ids: Optional[torch.Tensor] = None,
    kmeans_iters: int = 10,
    reduction: str = "mean",
    window_bias: Optional[torch.Tensor] = None,
    neg_bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, WindowAssignment]:
    """The window-based multi-interest loss of RED-Rec (appendix E.2, eq. A5–A6).

    The ``W`` next items of each user are clustered by cosine into ``K`` groups (as many as
    interests; :func:`spherical_kmeans`, deterministic farthest-point start), the
    centroids are matched to the interests by the Hungarian algorithm (maximum total
    cosine), and each valid window item contributes the NCE of (item, its matched
    interest); per user the mean over its ``w`` valid items (A5), then the mean over
    users. Clustering and matching run without gradients; the loss is differentiable in
    ``interests``, ``window`` and ``neg``.

    Args:
        interests: [B, K, d] interest vectors of the user tower (K queries).
        window: [B, W, d] item vectors of the look-ahead window (paper: W = 10).
        window_mask: [B, W] bool, False for padding (users with fewer next items).
        neg: optional [M, d] sampled negatives; tau: temperature.
        in_batch, window_ids, neg_ids, reduction: as in :func:`window_nce_loss`.
        kmeans_iters: maximum Lloyd iterations.
        window_bias / neg_bias: per-item logit offsets (:func:`window_nce_loss`); the
            clustering and matching do not see them.

    Returns:
        ``(loss, WindowAssignment)``.
    """
    assignment = assign_window(interests, window, window_mask, kmeans_iters)
    loss = window_nce_loss(interests, window, window_mask, assignment.item_interest, neg,
                           tau, in_batch, window_ids, neg_ids, reduction, window_bias,
                           neg_bias)
    return loss, assignment


def single_interest_loss(
    interests: torch.Tensor,
    targets: torch.Tensor,
    neg: Optional[torch.Tensor],
    tau: TauLike,
    target_mask: Optional[torch.Tensor] = None,
    pool: str = "mean",
    in_batch: bool = True,
    target_ids: Optional[torch.Tensor] = None,
    neg_ids: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    target_bias: Optional[torch.Tensor] = None,
    neg_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The single-interest baseline (Table 3 "Single-Interest"): one user vector.

    Args:
        interests: [B, d] (a single-query model), or [B, K, d] reduced to one vector by
            ``pool``: ``"mean"`` of the K interest vectors or the ``"first"`` one.
        targets: [B, d] the next item (eq. 6, :func:`nce_loss`, in-batch negatives by
            default) or [B, W, d] a window (eq. A5 with K = 1: every valid window item
            is a positive of the one vector; :func:`window_nce_loss`).
        neg: optional [M, d] sampled negatives; tau: temperature.
        target_mask: [B, W] bool for a window target (default: all valid).
        in_batch: in-batch negatives (the other rows' next items / window items).
        target_ids: [B] or [B, W] item ids of the targets; neg_ids: [M]; for masking
            accidental hits.
        reduction: as in :func:`nce_loss` / :func:`window_nce_loss`.
        target_bias / neg_bias: per-item logit offsets of the targets ([B] or [B, W])
            and negatives ([M]), as there.
    """
    if pool not in ("mean", "first"):
        raise ValueError(f"pool: {pool!r} is not 'mean' or 'first'")
    if not isinstance(interests, torch.Tensor) or interests.dim() not in (2, 3):
        raise ValueError("interests: expected [B, d] or [B, K, d], got "
                         f"{getattr(interests, 'shape', type(interests))}")
    if interests.dim() == 3:
        if interests.shape[1] == 0:
            raise ValueError("interests: K = 0 interest vectors")
        u = interests.mean(1) if pool == "mean" else interests[:, 0]
    else:
        u = interests
    if not isinstance(targets, torch.Tensor) or targets.dim() not in (2, 3):
        raise ValueError("targets: expected [B, d] (next item) or [B, W, d] (window), got "
                         f"{getattr(targets, 'shape', type(targets))}")
    if targets.dim() == 2:
        if target_mask is not None:
            raise ValueError("target_mask: only for a [B, W, d] window target")
        return nce_loss(u, targets, neg, tau, in_batch, target_ids, neg_ids, reduction,
                        target_bias, neg_bias)
    if target_mask is None:
        target_mask = torch.ones(targets.shape[:2], dtype=torch.bool, device=targets.device)
    _check_shape(target_mask, "target_mask", (targets.shape[0], targets.shape[1]), "[B, W]")
    item_interest = torch.where(target_mask, 0, -1).to(torch.int64)
    return window_nce_loss(u[:, None, :], targets, target_mask, item_interest, neg, tau,
                           in_batch, target_ids, neg_ids, reduction, target_bias, neg_bias)
