"""Ranking metrics of a CTR-style ranker: AUC, UAUC and GAUC (QARM paper, section 4.1).

All three are computed from one vectorised rank statistic (Mann–Whitney U): samples are
sorted by ``(group, score)``, tied scores inside a group get their *average* rank, and the
sum of positive ranks per group gives

    AUC_g = (R_pos,g − P_g (P_g + 1) / 2) / (P_g · N_g)

with ``P_g``/``N_g`` the positives/negatives of group ``g``. A tied positive/negative pair
therefore counts 1/2, which is the area under the ROC curve with tied thresholds merged.
There is no per-user Python loop: per-group sums are ``index_add_`` segment sums.

Definitions (QARM, eq. in section 4.1)::

    UAUC = 1/|U| · Σ_u AUC_u                 over users with both classes
    GAUC = Σ_u (n_u / Σ_v n_v) · AUC_u       n_u = impressions of user u, same users

Relation to other implementations (checked on torch 2.13 / torchmetrics 1.0.3 /
torchrec 1.8):

- ``torchmetrics.functional.classification.binary_auroc(preds, target)`` (exact,
  ``thresholds=None``) merges tied thresholds and gives the same value as :func:`auc`
  (``test_ranking.py`` checks parity, ties included). It returns 0 with a warning when
  only one class is present; :func:`auc` returns NaN.
- ``torchrec.metrics.auc`` integrates ``trapz(cum_tp, cum_fp)`` over *per-sample*
  cumulative sums after ``argsort`` without merging ties, so with tied scores its value
  depends on the sort order (a tied positive/negative pair counts 0 or 1, not 1/2), and it
  returns 0.5 for a single class.
- ``torchrec.metrics.gauc`` ("session AUC") is the *unweighted* mean of per-session AUCs
  over contiguous sessions given by ``num_candidates`` — our :func:`uauc`, not the
  impression-weighted GAUC of the QARM paper — and it also drops sessions whose
  predictions are all identical (here such a user has AUC 0.5 and is kept), and ignores ties.
"""

import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = [
    "GroupAUC",
    "RankingMetricAccumulator",
    "auc",
    "gauc",
    "group_auc",
    "ranking_metrics",
    "uauc",
    "validate_ranking_inputs",
]


def _as_1d(x: Any, name: str) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    t = t.detach()
    if t.dim() == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor [B], got shape {tuple(t.shape)}")
    return t.cpu()


def validate_ranking_inputs(
    scores: Any, labels: Any, user_ids: Optional[Any] = None
) -> "tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]":
    """Checks and converts ranking-metric inputs.

    Args:
        scores: [B] real scores (logits or probabilities; only their order matters).
        labels: [B] binary labels, values exactly 0 or 1 (bool, int or float dtype).
        user_ids: optional [B] integer group ids.

    Returns:
        ``(scores float64 [B], labels float64 [B], user_ids int64 [B] or None)`` on CPU.

    Raises:
        ValueError: naming the argument, the number of bad values and the first bad
            index, for NaN/Inf scores, labels outside {0, 1}, non-integer user ids or
            mismatched lengths.
    """
    s = _as_1d(scores, "scores")
    y = _as_1d(labels, "labels")
    if s.dtype == torch.bool or s.is_complex():
        raise ValueError(f"scores: expected a real-valued tensor, got dtype {s.dtype}")
    s = s.to(torch.float64)
    if y.shape != s.shape:
        raise ValueError(
            f"labels: length {y.shape[0]} does not match scores length {s.shape[0]}"
        )
    bad = ~torch.isfinite(s)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"scores: {int(bad.sum())} non-finite value(s) (NaN/Inf); first at index {i}: "
            f"{s[i].item()}"
        )
    y = y.to(torch.float64)
    bad = (y != 0) & (y != 1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels: {int(bad.sum())} value(s) other than 0/1; first at index {i}: "
            f"{y[i].item()}"
        )
    u: Optional[torch.Tensor] = None
    if user_ids is not None:
        u = _as_1d(user_ids, "user_ids")
        if u.dtype.is_floating_point or u.dtype == torch.bool or u.is_complex():
            raise ValueError(f"user_ids: expected an integer tensor, got dtype {u.dtype}")
        if u.shape != s.shape:
            raise ValueError(
                f"user_ids: length {u.shape[0]} does not match scores length {s.shape[0]}"
            )
        u = u.to(torch.int64)
    return s, y, u


@dataclass
class GroupAUC:
    """Per-group AUC statistics (one entry per distinct group id, ascending).

    Attributes:
        group_ids: [G] int64 distinct group (user) ids.
        auc: [G] float64 AUC of the group; NaN where the group lacks a class.
        num_pos / num_neg: [G] float64 positives / negatives of the group.
    """

    group_ids: torch.Tensor
    auc: torch.Tensor
    num_pos: torch.Tensor
    num_neg: torch.Tensor

    @property
    def num_samples(self) -> torch.Tensor:
        return self.num_pos + self.num_neg

    @property
    def valid(self) -> torch.Tensor:
        """[G] bool: group has both a positive and a negative."""
        return (self.num_pos > 0) & (self.num_neg > 0)


def _group_auc(s: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> GroupAUC:
    """Core on validated inputs: s, y float64 [B]; g int64 [B]."""
    n = s.shape[0]
    if n == 0:
        e = torch.zeros(0, dtype=torch.float64)
        return GroupAUC(torch.zeros(0, dtype=torch.int64), e, e.clone(), e.clone())
    group_ids, gi = torch.unique(g, return_inverse=True)  # dense, sorted
    num_groups = group_ids.shape[0]
    # Lexicographic sort by (group, score): stable sort by the minor key, then the major.
    o1 = torch.argsort(s, stable=True)
    o2 = torch.argsort(gi[o1], stable=True)
    order = o1[o2]
    sg, ss, sy = gi[order], s[order], y[order]
    pos = torch.arange(n, dtype=torch.int64)
    new_group = torch.ones(n, dtype=torch.bool)
    new_group[1:] = sg[1:] != sg[:-1]
    new_tie = new_group.clone()
    new_tie[1:] |= ss[1:] != ss[:-1]
    tie_id = torch.cumsum(new_tie.to(torch.int64), 0) - 1
    tie_start = pos[new_tie]  # [T] first sorted position of each tie run
    tie_size = torch.bincount(tie_id, minlength=tie_start.shape[0])
    group_start = pos[new_group]  # [G]; sorted group index == sg
    # 1-based average rank of each sample inside its group.
    rank = (tie_start[tie_id] - group_start[sg]).to(torch.float64) + (
        tie_size[tie_id].to(torch.float64) + 1.0
    ) / 2.0
    r_pos = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, sg, rank * sy)
    n_pos = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, sg, sy)
    n_all = torch.bincount(sg, minlength=num_groups).to(torch.float64)
    n_neg = n_all - n_pos
    denom = n_pos * n_neg
    u_stat = r_pos - n_pos * (n_pos + 1.0) / 2.0
    auc_g = torch.where(denom > 0, u_stat / denom.clamp_min(1.0),
                        torch.full_like(denom, float("nan")))
    return GroupAUC(group_ids, auc_g, n_pos, n_neg)


def group_auc(scores: Any, labels: Any, group_ids: Any) -> GroupAUC:
    """Per-group AUC with average ranks for ties, fully vectorised.

    Args:
        scores: [B] scores.
        labels: [B] 0/1 labels.
        group_ids: [B] integer group (user) ids; need not be sorted or contiguous.

    Returns:
        :class:`GroupAUC` with one entry per distinct group id.
    """
    s, y, g = validate_ranking_inputs(scores, labels, group_ids)
    assert g is not None
    return _group_auc(s, y, g)


def auc(scores: Any, labels: Any) -> float:
    """Global ROC AUC, ties counted 1/2. NaN if a class is missing (or no samples).

    Args:
        scores: [B] scores; labels: [B] 0/1 labels.
    """
    s, y, _ = validate_ranking_inputs(scores, labels)
    return _global_auc(s, y)


def _global_auc(s: torch.Tensor, y: torch.Tensor) -> float:
    if s.numel() == 0:
        return float("nan")
    return float(_group_auc(s, y, torch.zeros(s.shape[0], dtype=torch.int64)).auc[0])


def _uauc(ga: GroupAUC) -> float:
    v = ga.valid
    if not bool(v.any()):
        return float("nan")
    return float(ga.auc[v].mean())


def _gauc(ga: GroupAUC) -> float:
    v = ga.valid
    if not bool(v.any()):
        return float("nan")
    w = ga.num_samples[v]
    return float((ga.auc[v] * w).sum() / w.sum())


def _pair_split(auc_all: float, ga: GroupAUC) -> Dict[str, float]:
    """AUC over the positive/negative pairs of one user and over pairs of two users.

    The global AUC counts every (positive, negative) pair; the ``Σ_u P_u N_u`` pairs
    of a same user are ordered with the user's own AUC, so

        AUC = s · AUC_within + (1 − s) · AUC_between,   s = Σ_u P_u N_u / (P · N)

    with ``AUC_within = Σ_u P_u N_u AUC_u / Σ_u P_u N_u`` (GAUC weighted by pairs
    instead of impressions). ``AUC_between`` orders one user's positive against another
    user's negative: it rewards scores that follow the users' click rates (a per-user
    offset), which GAUC cannot see — why AUC and GAUC can rank two models differently.
    NaN where a part has no pair.
    """
    pairs = ga.num_pos * ga.num_neg
    within_pairs = float(pairs.sum())
    total_pairs = float(ga.num_pos.sum() * ga.num_neg.sum())
    nan = float("nan")
    within = float((ga.auc[ga.valid] * pairs[ga.valid]).sum() / within_pairs) \
        if within_pairs > 0 else nan
    between_pairs = total_pairs - within_pairs
    between = nan
    if between_pairs > 0:
        between = (auc_all * total_pairs - (within * within_pairs if within_pairs > 0
                                             else 0.0)) / between_pairs
    return {"auc_within_users": within, "auc_between_users": between,
            "within_user_pair_share": within_pairs / total_pairs if total_pairs > 0 else nan}


def uauc(scores: Any, labels: Any, user_ids: Any) -> float:
    """Mean of per-user AUC over users that have both a positive and a negative.

    NaN if no user has both classes. Args: ``[B]`` scores, labels, user_ids.
    """
    return _uauc(group_auc(scores, labels, user_ids))


def gauc(scores: Any, labels: Any, user_ids: Any) -> float:
    """Per-user AUC weighted by the user's impression count (all of the user's samples),
    over users with both classes (QARM's GAUC). NaN if no user has both classes."""
    return _gauc(group_auc(scores, labels, user_ids))


def ranking_metrics(scores: Any, labels: Any, user_ids: Optional[Any] = None) -> Dict[str, float]:
    """AUC, UAUC, GAUC and counts in one pass.

    Args:
        scores: [B]; labels: [B] 0/1; user_ids: optional [B] (UAUC/GAUC need it).

    Returns:
        ``{"auc", "uauc", "gauc", "auc_within_users", "auc_between_users",
        "within_user_pair_share", "num_samples", "num_positives", "num_users",
        "num_users_both_classes"}`` (the user entries only when ``user_ids`` is given;
        the AUC over same-user and cross-user pairs: :func:`_pair_split`); metrics
        that are undefined on the input are NaN.
    """
    s, y, u = validate_ranking_inputs(scores, labels, user_ids)
    out: Dict[str, float] = {
        "auc": _global_auc(s, y),
        "num_samples": int(s.shape[0]),
        "num_positives": int(y.sum()),
    }
    if u is not None:
        ga = _group_auc(s, y, u)
        out["uauc"] = _uauc(ga)
        out["gauc"] = _gauc(ga)
        out.update(_pair_split(out["auc"], ga))
        out["num_users"] = int(ga.group_ids.shape[0])
        out["num_users_both_classes"] = int(ga.valid.sum())
    return out


class RankingMetricAccumulator:
    """Collects ranking-eval batches and computes (sliced) AUC / UAUC / GAUC at the end.

    Works across ranks: when ``torch.distributed`` is initialised with more than one
    process, :meth:`compute` first all-gathers every rank's samples (padded tensors and
    ``all_gather``; no pickled objects), so every rank returns the same global metrics.
    Tensors go through the collective on CUDA for the ``nccl`` backend, else on CPU.

    Example::

        acc = RankingMetricAccumulator()
        for batch in loader:
            acc.update(model(batch), batch.labels, batch.user_ids, batch.item_ids,
                       slices={"new_user": batch.is_new_user})
        result = acc.compute(item_slices=cold_warm_item_masks(cold_mask))
        result["all"]["gauc"], result["cold"]["auc"]
    """

    def __init__(self, process_group: Optional[Any] = None) -> None:
        self._pg = process_group
        self.reset()

    def reset(self) -> None:
        self._scores: List[torch.Tensor] = []
        self._labels: List[torch.Tensor] = []
        self._users: List[torch.Tensor] = []
        self._items: List[torch.Tensor] = []
        self._slices: Dict[str, List[torch.Tensor]] = {}
        self._slice_names: Optional[Tuple[str, ...]] = None
        self._has_items: Optional[bool] = None

    @property
    def num_samples(self) -> int:
        """Samples collected on this rank."""
        return sum(int(t.shape[0]) for t in self._scores)

    def update(
        self,
        scores: Any,
        labels: Any,
        user_ids: Any,
        item_ids: Optional[Any] = None,
        slices: Optional[Mapping[str, Any]] = None,
    ) -> None:
        """Adds one batch.

        Args:
            scores: [B] scores (logits or probabilities); labels: [B] 0/1;
            user_ids: [B] integer ids.
            item_ids: optional [B] item ids (needed for ``compute(item_slices=...)``);
                give them in every batch or in none.
            slices: optional ``{name: [B] bool}`` per-sample tags; the same names in
                every batch.
        """
        s, y, u = validate_ranking_inputs(scores, labels, user_ids)
        assert u is not None
        has_items = item_ids is not None
        if self._has_items is not None and has_items != self._has_items:
            raise ValueError("item_ids: give them in every update() or in none")
        self._has_items = has_items
        names = tuple(sorted(slices)) if slices else ()
        if self._slice_names is not None and names != self._slice_names:
            raise ValueError(
                f"slices: names {list(names)} differ from earlier batches "
                f"{list(self._slice_names)}"
            )
        self._slice_names = names
        if has_items:
            it = _as_1d(item_ids, "item_ids")
            if it.dtype.is_floating_point or it.dtype == torch.bool or it.shape != s.shape:
                raise ValueError(
                    f"item_ids: expected integer ids of shape {tuple(s.shape)}, got "
                    f"{it.dtype} of shape {tuple(it.shape)}"
                )
            self._items.append(it.to(torch.int64))
        for name in names:
            m = _as_1d(slices[name], f"slices['{name}']")  # type: ignore[index]
            if m.dtype != torch.bool or m.shape != s.shape:
                raise ValueError(
                    f"slices['{name}']: expected a bool mask of shape {tuple(s.shape)}, "
                    f"got {m.dtype} of shape {tuple(m.shape)}"
                )
            self._slices.setdefault(name, []).append(m)
        self._scores.append(s)
        self._labels.append(y)
        self._users.append(u)

    def _local(self) -> Dict[str, torch.Tensor]:
        def cat(ts: List[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
            return torch.cat(ts) if ts else torch.zeros(0, dtype=dtype)

        out = {
            "scores": cat(self._scores, torch.float64),
            "labels": cat(self._labels, torch.float64),
            "user_ids": cat(self._users, torch.int64),
        }
        if self._has_items:
            out["item_ids"] = cat(self._items, torch.int64)
        for name in self._slice_names or ():
            out["slice:" + name] = cat(self._slices[name], torch.bool)
        return out

    def gather(self) -> Dict[str, torch.Tensor]:
        """All samples of all ranks (this rank's only when not distributed):
        ``{"scores", "labels", "user_ids", ["item_ids"], "slice:<name>"...}`` [B_total]."""
        local = self._local()
        if not (dist.is_available() and dist.is_initialized()):
            return local
        if dist.get_world_size(self._pg) == 1:
            return local
        device = torch.device("cpu")
        if dist.get_backend(self._pg) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        # Every rank must hold the same fields: compare a fingerprint of the field names.
        names = sorted(local)
        sig = torch.tensor([len(names), zlib.crc32("\0".join(names).encode())],
                           dtype=torch.int64, device=device)
        sigs = [torch.zeros_like(sig) for _ in range(dist.get_world_size(self._pg))]
        dist.all_gather(sigs, sig, group=self._pg)
        if any(not torch.equal(x, sigs[0]) for x in sigs):
            raise ValueError(
                "RankingMetricAccumulator.gather: ranks collected different fields "
                f"(this rank: {names}); pass item_ids/slices on every rank or on none"
            )
        return {k: _all_gather_padded(v, device, self._pg) for k, v in local.items()}

    def compute(
        self,
        item_slices: Optional[Mapping[str, Any]] = None,
        include_all: bool = True,
    ) -> Dict[str, Dict[str, float]]:
        """Metrics on the gathered samples, per slice.

        Args:
            item_slices: optional ``{name: [N] bool}`` item-level masks (cold/warm,
                popularity groups; see :mod:`torchrec_mm.metrics.slices`), applied
                through the collected item ids.
            include_all: add the ``"all"`` slice.

        Returns:
            ``{slice: {"auc", "uauc", "gauc", "num_samples", ...}}`` — see
            :func:`torchrec_mm.metrics.slices.sliced_ranking_metrics`.
        """
        from torchrec_mm.metrics.slices import sample_masks_from_items, sliced_ranking_metrics

        data = self.gather()
        masks: Dict[str, torch.Tensor] = {
            k[len("slice:"):]: v for k, v in data.items() if k.startswith("slice:")
        }
        if item_slices:
            if "item_ids" not in data:
                raise ValueError("compute(item_slices=...) needs item_ids in update()")
            for name, m in sample_masks_from_items(data["item_ids"], item_slices).items():
                if name in masks:
                    raise ValueError(f"slice '{name}' given both per sample and per item")
                masks[name] = m
        return sliced_ranking_metrics(
            data["scores"], data["labels"], data["user_ids"], masks, include_all=include_all
        )


def _all_gather_padded(
    t: torch.Tensor, device: torch.device, group: Optional[Any]
) -> torch.Tensor:
    """all_gather of a 1-D tensor whose length differs across ranks (pad to the max)."""
    world = dist.get_world_size(group)
    dtype = t.dtype
    x = t.to(torch.uint8) if dtype == torch.bool else t
    x = x.to(device)
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    lens = [int(s) for s in sizes]
    padded = x.new_zeros((max(lens),))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    out = torch.cat([p[:k] for p, k in zip(parts, lens)]).cpu()
    return out.to(torch.bool) if dtype == torch.bool else out
