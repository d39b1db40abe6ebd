"""Evaluation slices: cold/warm items, popularity groups L1..L6, item age; sliced AUCs.

A *slice* is a boolean mask over evaluation samples. Item-level definitions (cold items,
popularity groups) are masks over item ids ``[N]`` and become sample masks through the
samples' item ids (:func:`sample_masks_from_items`).

Popularity groups (QARM paper, section 4.4 and Table 5): items are divided "into six
distinct groups, labeled from L1 to L6, based on the frequency of their purchases. L1
represents the least frequently purchased items, with each subsequent label indicating
higher purchase frequencies." The paper gives no boundaries. :func:`popularity_groups`
therefore implements three documented variants over a per-item training count (exposures,
or clicks/purchases when ``item_counts`` is given the labels as weights):

- ``"items"`` (default): count quantiles — items sorted by count, split into ``G`` groups
  with (about) the same number of *items* each;
- ``"interactions"``: groups with (about) the same share of training *interactions* each
  (the usual head/torso/tail split: L6 holds a few head items, L1 the long tail);
- ``"log"``: equal-width buckets of ``log1p(count)`` between 0 and ``log1p(max count)``.

Items with equal counts always share a group (a run of ties joins the group in which it
starts), so with heavy ties some groups can be empty; items never seen in training have
count 0 and fall into L1 (the cold/warm slices single them out separately).
"""

from typing import Any, Dict, Mapping, Optional, Sequence

import torch

from torchrec_mm.metrics.ranking import (
    _global_auc,
    _group_auc,
    _gauc,
    _pair_split,
    _uauc,
    validate_ranking_inputs,
)

__all__ = [
    "DEFAULT_AGE_EDGES",
    "POPULARITY_METHODS",
    "cold_warm_item_masks",
    "cold_warm_slices",
    "first_appearance",
    "item_age_slices",
    "item_counts",
    "popularity_group_names",
    "popularity_groups",
    "popularity_item_masks",
    "popularity_slices",
    "sample_masks_from_items",
    "sliced_ranking_metrics",
]

POPULARITY_METHODS = ("items", "interactions", "log")
_DAY = 86400
#: default item-age edges in seconds: < 1 day, 1–7 days, 7–30 days, ≥ 30 days.
DEFAULT_AGE_EDGES = (_DAY, 7 * _DAY, 30 * _DAY)


def _ids(x: Any, name: str) -> torch.Tensor:
    t = (x if isinstance(x, torch.Tensor) else torch.as_tensor(x)).detach().cpu()
    if t.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor, got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name}: expected integer ids, got dtype {t.dtype}")
    return t.to(torch.int64)


def _check_range(ids: torch.Tensor, n: int, name: str, table: str) -> None:
    if ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= n)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{name}: {int(bad.sum())} id(s) outside [0, {n}) of {table}; "
            f"first at index {i}: {int(ids[i])}"
        )


def item_counts(item_ids: Any, num_items: int, weights: Optional[Any] = None) -> torch.Tensor:
    """Per-item count of training interactions.

    Args:
        item_ids: [E] item id of every training interaction.
        num_items: N.
        weights: optional [E] weight per interaction (e.g. the click label, so that only
            positives count, like the paper's purchase frequency).

    Returns:
        [N] float64 counts.
    """
    ids = _ids(item_ids, "item_ids")
    _check_range(ids, num_items, "item_ids", "the item table")
    w = None
    if weights is not None:
        w = torch.as_tensor(weights).detach().cpu().to(torch.float64).reshape(-1)
        if w.shape != ids.shape:
            raise ValueError(f"weights: length {w.shape[0]} != item_ids length {ids.shape[0]}")
    return torch.bincount(ids, weights=w, minlength=num_items).to(torch.float64)


def popularity_groups(counts: Any, num_groups: int = 6, method: str = "items") -> torch.Tensor:
    """Assigns each item a popularity group ``0..G-1`` (L1 = least popular).

    Args:
        counts: [N] non-negative per-item training counts (:func:`item_counts`).
        num_groups: G (the paper uses 6).
        method: ``"items"`` | ``"interactions"`` | ``"log"`` (see the module docstring).

    Returns:
        [N] int64 group index per item.
    """
    if method not in POPULARITY_METHODS:
        raise ValueError(f"method: {method!r} is not one of {POPULARITY_METHODS}")
    if num_groups < 1:
        raise ValueError(f"num_groups: must be >= 1, got {num_groups}")
    c = torch.as_tensor(counts).detach().cpu().to(torch.float64).reshape(-1)
    if bool((~torch.isfinite(c) | (c < 0)).any()):
        raise ValueError("counts: must be finite and non-negative")
    n = c.shape[0]
    groups = torch.zeros(n, dtype=torch.int64)
    if n == 0:
        return groups
    if method == "log":
        lc = torch.log1p(c)
        top = float(lc.max())
        if top > 0:
            # + 1e-9: a count exactly on a bucket edge (e.g. log1p(1) / log1p(31) = 1/5)
            # goes to the upper bucket whatever the float rounding of the ratio
            groups = torch.floor(lc / top * num_groups + 1e-9).to(torch.int64)
        return groups.clamp_(0, num_groups - 1)
    sc, order = torch.sort(c, stable=True)
    new_run = torch.ones(n, dtype=torch.bool)
    new_run[1:] = sc[1:] != sc[:-1]
    run_id = torch.cumsum(new_run.to(torch.int64), 0) - 1
    run_start = torch.arange(n)[new_run]  # first sorted position of each run of ties
    if method == "items":
        frac = run_start.to(torch.float64) / n
    else:  # interactions: share of all interactions strictly below the run
        total = float(c.sum())
        before = torch.cumsum(sc, 0) - sc  # exclusive prefix sum
        frac = before[run_start] / total if total > 0 else torch.zeros_like(before[run_start])
    run_group = torch.floor(frac * num_groups + 1e-9).to(torch.int64).clamp_(0, num_groups - 1)
    groups[order] = run_group[run_id]
    return groups


def popularity_group_names(num_groups: int = 6, prefix: str = "L") -> list:
    return [f"{prefix}{g + 1}" for g in range(num_groups)]


def popularity_item_masks(
    groups: Any, num_groups: int = 6, prefix: str = "L"
) -> Dict[str, torch.Tensor]:
    """``{"L1": [N] bool, ..., "L6": [N] bool}`` from :func:`popularity_groups` output."""
    g = _ids(groups, "groups")
    return {name: g == i for i, name in enumerate(popularity_group_names(num_groups, prefix))}


def cold_warm_item_masks(cold_item_mask: Any) -> Dict[str, torch.Tensor]:
    """``{"warm": ~cold, "cold": cold}`` over item ids, from a [N] bool cold-item mask."""
    m = torch.as_tensor(cold_item_mask).detach().cpu()
    if m.dim() != 1 or m.dtype != torch.bool:
        raise ValueError(
            f"cold_item_mask: expected a 1-D bool tensor over item ids, got "
            f"{m.dtype} of shape {tuple(m.shape)}"
        )
    return {"warm": ~m, "cold": m}


def sample_masks_from_items(
    item_ids: Any, item_masks: Mapping[str, Any]
) -> Dict[str, torch.Tensor]:
    """Turns item-level masks ``{name: [N] bool}`` into sample masks ``{name: [B] bool}``."""
    ids = _ids(item_ids, "item_ids")
    out: Dict[str, torch.Tensor] = {}
    for name, m in item_masks.items():
        m = torch.as_tensor(m).detach().cpu()
        if m.dim() != 1 or m.dtype != torch.bool:
            raise ValueError(f"item mask '{name}': expected a 1-D bool tensor over item ids")
        _check_range(ids, m.shape[0], "item_ids", f"item mask '{name}'")
        out[name] = m[ids]
    return out


def cold_warm_slices(item_ids: Any, cold_item_mask: Any) -> Dict[str, torch.Tensor]:
    """Sample masks ``{"warm", "cold"}``. Args: item_ids [B], cold_item_mask [N] bool."""
    return sample_masks_from_items(item_ids, cold_warm_item_masks(cold_item_mask))


def popularity_slices(
    item_ids: Any, counts: Any, num_groups: int = 6, method: str = "items", prefix: str = "L"
) -> Dict[str, torch.Tensor]:
    """Sample masks ``{"L1".."L6"}``. Args: item_ids [B], counts [N] training counts."""
    groups = popularity_groups(counts, num_groups, method)
    return sample_masks_from_items(item_ids, popularity_item_masks(groups, num_groups, prefix))


def first_appearance(item_ids: Any, timestamps: Any, num_items: int) -> torch.Tensor:
    """[N] int64 first timestamp at which each item appears; ``-1`` for items never seen.

    Args:
        item_ids: [E] item ids of all interactions (training and evaluation).
        timestamps: [E] int64 timestamps.
    """
    ids = _ids(item_ids, "item_ids")
    ts = _ids(timestamps, "timestamps")
    if ts.shape != ids.shape:
        raise ValueError(f"timestamps: length {ts.shape[0]} != item_ids length {ids.shape[0]}")
    _check_range(ids, num_items, "item_ids", "the item table")
    big = torch.iinfo(torch.int64).max
    first = torch.full((num_items,), big, dtype=torch.int64)
    first.scatter_reduce_(0, ids, ts, reduce="amin", include_self=True)
    first[first == big] = -1
    return first


def item_age_slices(
    item_ids: Any,
    timestamps: Any,
    first_seen: Any,
    edges: Sequence[int] = DEFAULT_AGE_EDGES,
    names: Optional[Sequence[str]] = None,
) -> Dict[str, torch.Tensor]:
    """Slices by item age at impression time, ``age = timestamp − first_seen[item]``.

    Args:
        item_ids: [B] item id per sample; timestamps: [B] impression time.
        first_seen: [N] first appearance per item (:func:`first_appearance`), same unit.
        edges: increasing bucket edges ``e_1 < … < e_m``; buckets ``[0, e_1)``,
            ``[e_1, e_2)``, …, ``[e_m, ∞)``.
        names: optional m+1 bucket names; default ``"age<1d"``-style names when the edges
            are whole days (seconds), else ``"age<e1"``.

    Returns:
        ``{name: [B] bool}``.
    """
    ids = _ids(item_ids, "item_ids")
    ts = _ids(timestamps, "timestamps")
    fs = _ids(first_seen, "first_seen")
    if ts.shape != ids.shape:
        raise ValueError(f"timestamps: length {ts.shape[0]} != item_ids length {ids.shape[0]}")
    _check_range(ids, fs.shape[0], "item_ids", "first_seen")
    e = torch.as_tensor(list(edges), dtype=torch.int64)
    if e.numel() and bool((e[1:] <= e[:-1]).any()):
        raise ValueError(f"edges: must be strictly increasing, got {list(edges)}")
    f = fs[ids]
    age = ts - f
    bad = (f < 0) | (age < 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"timestamps: {int(bad.sum())} sample(s) before their item's first appearance "
            f"(or item never seen); first at index {i}: item {int(ids[i])}, timestamp "
            f"{int(ts[i])}, first_seen {int(f[i])}"
        )
    if names is None:
        names = _age_names([int(x) for x in e.tolist()])
    if len(names) != e.numel() + 1:
        raise ValueError(f"names: expected {e.numel() + 1} names, got {len(names)}")
    bucket = torch.bucketize(age, e, right=True)
    return {name: bucket == i for i, name in enumerate(names)}


def _age_names(edges: Sequence[int]) -> list:
    def fmt(x: int) -> str:
        return f"{x // _DAY}d" if x % _DAY == 0 and x > 0 else str(x)

    if not edges:
        return ["age:all"]
    out = [f"age<{fmt(edges[0])}"]
    out += [f"age:{fmt(a)}-{fmt(b)}" for a, b in zip(edges[:-1], edges[1:])]
    out.append(f"age>={fmt(edges[-1])}")
    return out


def sliced_ranking_metrics(
    scores: Any,
    labels: Any,
    user_ids: Any,
    slices: Mapping[str, Any],
    include_all: bool = True,
) -> Dict[str, Dict[str, float]]:
    """AUC / UAUC / GAUC and counts on every slice.

    UAUC/GAUC of a slice use only the slice's samples of each user (a user's AUC among
    the cold items it was shown, etc.).

    Args:
        scores: [B]; labels: [B] 0/1; user_ids: [B].
        slices: ``{name: [B] bool mask}``.
        include_all: add an ``"all"`` slice (unless one is given).

    Returns:
        ``{slice: {"auc", "uauc", "gauc", "auc_within_users", "auc_between_users",
        "within_user_pair_share", "num_samples", "num_positives", "num_users",
        "num_users_both_classes"}}`` (the pair split of
        :func:`~torchrec_mm.metrics.ranking.ranking_metrics`); undefined metrics (e.g. a
        slice without positives) are NaN.
    """
    s, y, u = validate_ranking_inputs(scores, labels, user_ids)
    assert u is not None
    masks: Dict[str, torch.Tensor] = {}
    if include_all and "all" not in slices:
        masks["all"] = torch.ones(s.shape[0], dtype=torch.bool)
    for name, m in slices.items():
        m = torch.as_tensor(m).detach().cpu()
        if m.dtype != torch.bool or m.shape != s.shape:
            raise ValueError(
                f"slice '{name}': expected a bool mask of shape {tuple(s.shape)}, got "
                f"{m.dtype} of shape {tuple(m.shape)}"
            )
        masks[name] = m
    out: Dict[str, Dict[str, float]] = {}
    for name, m in masks.items():
        ss, yy, uu = s[m], y[m], u[m]
        ga = _group_auc(ss, yy, uu)
        a = _global_auc(ss, yy)
        out[name] = {
            "auc": a,
            "uauc": _uauc(ga),
            "gauc": _gauc(ga),
            **_pair_split(a, ga),
            "num_samples": int(ss.shape[0]),
            "num_positives": int(yy.sum()),
            "num_users": int(ga.group_ids.shape[0]),
            "num_users_both_classes": int(ga.valid.sum()),
        }
    return out
