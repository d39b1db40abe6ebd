import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from torchrec_mm.metrics.ranking import ranking_metrics
from torchrec_mm.metrics.slices import (
    cold_warm_slices,
    first_appearance,
    item_age_slices,
    item_counts,
    popularity_groups,
    popularity_slices,
    sliced_ranking_metrics,
)

counts_st = st.lists(st.integers(0, 40), min_size=1, max_size=80)


@settings(max_examples=80, deadline=None)
@given(counts_st, st.integers(1, 8))
@example([1, 31], 5)  # log1p(1) / log1p(31) = 1/5 exactly: an edge hit by float rounding
def test_popularity_groups_follow_their_definitions(counts, g):
    """Brute-force definitions: for an item with count c,
    items:        share of *items* with count < c       lies in [grp/G, (grp+1)/G)
    interactions: share of *interactions* of items with count < c lies in [grp/G, (grp+1)/G)
    log:          grp = min(G-1, floor(G * log1p(c) / log1p(max)))."""
    c = torch.tensor(counts, dtype=torch.float64)
    n, total, top = len(counts), sum(counts), max(counts)
    items = popularity_groups(c, g, "items").tolist()
    inter = popularity_groups(c, g, "interactions").tolist()
    logb = popularity_groups(c, g, "log").tolist()
    for i, ci in enumerate(counts):
        below_items = sum(1 for x in counts if x < ci) / n
        assert items[i] == min(g - 1, math.floor(g * below_items + 1e-9))
        below_inter = sum(x for x in counts if x < ci) / total if total else 0.0
        assert inter[i] == min(g - 1, math.floor(g * below_inter + 1e-9))
        want_log = 0 if top == 0 else min(
            g - 1, math.floor(g * math.log1p(ci) / math.log1p(top) + 1e-9))
        assert logb[i] == want_log
    # ordering: more popular never lands in a lower group; ties share a group
    for grp in (items, inter, logb):
        for i in range(n):
            for j in range(n):
                if counts[i] <= counts[j]:
                    assert grp[i] <= grp[j]


def test_popularity_items_are_sextiles_without_ties():
    counts = torch.randperm(60).to(torch.float64)
    grp = popularity_groups(counts)
    assert torch.bincount(grp, minlength=6).tolist() == [10] * 6
    assert int(grp[counts.argmin()]) == 0 and int(grp[counts.argmax()]) == 5


def test_item_counts_and_popularity_slices():
    train_items = torch.tensor([0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5])
    labels = torch.tensor([1, 0, 1, 1, 1, 0] + [1] * 15)
    assert item_counts(train_items, 7).tolist() == [1, 2, 3, 4, 5, 6, 0]
    assert item_counts(train_items, 7, weights=labels).tolist() == [1, 1, 2, 4, 5, 6, 0]
    sl = popularity_slices(torch.tensor([6, 0, 5, 3]), item_counts(train_items, 7), 6)
    assert list(sl) == ["L1", "L2", "L3", "L4", "L5", "L6"]
    # 7 items over 6 groups: sorted position p -> floor(6 p / 7) = 0,0,1,2,3,4,5
    assert sl["L1"].tolist() == [True, True, False, False]  # count 0 (cold) and count 1
    assert sl["L4"].tolist() == [False, False, False, True]
    assert sl["L6"].tolist() == [False, False, True, False]
    assert sum(m.long() for m in sl.values()).tolist() == [1, 1, 1, 1]  # a partition
    with pytest.raises(ValueError, match="item_ids: 1 id.*outside \\[0, 7\\)"):
        item_counts(torch.tensor([0, 9]), 7)
    with pytest.raises(ValueError, match="method"):
        popularity_groups(torch.ones(3), method="quantile")


def test_cold_warm_slices():
    cold = torch.tensor([False, True, False, True])
    sl = cold_warm_slices(torch.tensor([0, 1, 3, 3, 2]), cold)
    assert sl["cold"].tolist() == [False, True, True, True, False]
    assert sl["warm"].tolist() == [True, False, False, False, True]
    with pytest.raises(ValueError, match="outside \\[0, 4\\)"):
        cold_warm_slices(torch.tensor([4]), cold)
    with pytest.raises(ValueError, match="bool"):
        cold_warm_slices(torch.tensor([0]), torch.tensor([0, 1]))


def test_first_appearance_and_item_age():
    day = 86400
    items = torch.tensor([2, 0, 2, 0, 1])
    ts = torch.tensor([5 * day, 3 * day, 1 * day, 10 * day, 2 * day])
    first = first_appearance(items, ts, 4)
    assert first.tolist() == [3 * day, 2 * day, 1 * day, -1]
    ev_items = torch.tensor([0, 0, 1, 2, 2])
    ev_ts = torch.tensor([3 * day + 5, 5 * day, 40 * day, 30 * day, 31 * day + 1])
    sl = item_age_slices(ev_items, ev_ts, first)
    assert list(sl) == ["age<1d", "age:1d-7d", "age:7d-30d", "age>=30d"]
    # ages: 5 s, 2 d, 38 d, 29 d, 30 d + 1 s
    assert sl["age<1d"].tolist() == [True, False, False, False, False]
    assert sl["age:1d-7d"].tolist() == [False, True, False, False, False]
    assert sl["age:7d-30d"].tolist() == [False, False, False, True, False]
    assert sl["age>=30d"].tolist() == [False, False, True, False, True]
    with pytest.raises(ValueError, match="before their item's first appearance.*index 0"):
        item_age_slices(torch.tensor([0]), torch.tensor([0]), first)
    with pytest.raises(ValueError, match="never seen|first appearance"):
        item_age_slices(torch.tensor([3]), torch.tensor([0]), first)


def test_sliced_metrics_equal_metrics_on_the_subset():
    g = torch.Generator().manual_seed(1)
    n = 500
    y = (torch.rand(n, generator=g) < 0.3).long()
    s = torch.randn(n, generator=g) + y
    u = torch.randint(0, 30, (n,), generator=g)
    it = torch.randint(0, 50, (n,), generator=g)
    cold = torch.arange(50) < 10
    # planted: the model is blind on cold items
    s = torch.where(cold[it], torch.randn(n, generator=g), s)
    slices = cold_warm_slices(it, cold)
    res = sliced_ranking_metrics(s, y, u, slices)
    assert list(res) == ["all", "warm", "cold"]
    for name, m in [("all", torch.ones(n, dtype=torch.bool)), *slices.items()]:
        want = ranking_metrics(s[m], y[m], u[m])
        for k, v in want.items():
            assert res[name][k] == pytest.approx(v, nan_ok=True), (name, k)
    assert res["warm"]["num_samples"] + res["cold"]["num_samples"] == n
    assert res["warm"]["auc"] > 0.7 and abs(res["cold"]["auc"] - 0.5) < 0.1
    empty = sliced_ranking_metrics(s, y, u, {"none": torch.zeros(n, dtype=torch.bool)},
                                   include_all=False)
    assert list(empty) == ["none"] and empty["none"]["num_samples"] == 0
    assert math.isnan(empty["none"]["auc"]) and math.isnan(empty["none"]["gauc"])
    with pytest.raises(ValueError, match="slice 'bad'"):
        sliced_ranking_metrics(s, y, u, {"bad": torch.ones(3, dtype=torch.bool)})
