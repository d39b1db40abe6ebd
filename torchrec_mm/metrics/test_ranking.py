import math
import os
import tempfile
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrec_mm.metrics.ranking import (
    RankingMetricAccumulator,
    auc,
    gauc,
    group_auc,
    ranking_metrics,
    uauc,
)
from torchrec_mm.metrics.slices import cold_warm_item_masks, sliced_ranking_metrics

# ----------------------------------------------------------------- references (pure Python)


def ref_auc(scores: List[float], labels: List[int]) -> float:
    """Pairwise count: P(s_pos > s_neg) + 1/2 P(s_pos == s_neg)."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    if not pos or not neg:
        return math.nan
    wins = 0.0
    for p in pos:
        for n in neg:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (len(pos) * len(neg))


def ref_user_aucs(scores, labels, users) -> Dict[int, tuple]:
    by_user: Dict[int, tuple] = {}
    for s, y, u in zip(scores, labels, users):
        by_user.setdefault(u, ([], []))
        by_user[u][0].append(s)
        by_user[u][1].append(y)
    return {u: (ref_auc(ss, yy), len(ss)) for u, (ss, yy) in by_user.items()}


def ref_uauc(scores, labels, users) -> float:
    vals = [a for a, _ in ref_user_aucs(scores, labels, users).values() if not math.isnan(a)]
    return sum(vals) / len(vals) if vals else math.nan


def ref_gauc(scores, labels, users) -> float:
    pairs = [(a, n) for a, n in ref_user_aucs(scores, labels, users).values()
             if not math.isnan(a)]
    if not pairs:
        return math.nan
    return sum(a * n for a, n in pairs) / sum(n for _, n in pairs)


def close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-9


# tied scores are likely: scores come from a small set of values
samples = st.integers(1, 60).flatmap(
    lambda n: st.tuples(
        st.lists(st.sampled_from([-1.5, 0.0, 0.25, 0.25 + 1e-12, 1.0, 3.0]), min_size=n,
                 max_size=n),
        st.lists(st.integers(0, 1), min_size=n, max_size=n),
        st.lists(st.integers(-3, 5), min_size=n, max_size=n),
    )
)


@settings(max_examples=150, deadline=None)
@given(samples)
def test_auc_uauc_gauc_match_pairwise_reference(data):
    scores, labels, users = data
    s = torch.tensor(scores, dtype=torch.float64)  # float32 would merge 0.25 and 0.25+1e-12
    y, u = torch.tensor(labels), torch.tensor(users)
    assert close(auc(s, y), ref_auc(scores, labels))
    assert close(uauc(s, y, u), ref_uauc(scores, labels, users))
    assert close(gauc(s, y, u), ref_gauc(scores, labels, users))
    m = ranking_metrics(s, y, u)
    assert m["num_users"] == len(set(users))
    valid = sum(1 for a, _ in ref_user_aucs(scores, labels, users).values() if not math.isnan(a))
    assert m["num_users_both_classes"] == valid
    assert m["num_positives"] == sum(labels)


def ref_pair_split(scores, labels, users):
    """AUC over (positive, negative) pairs of the same user and of different users."""
    wins = {True: 0.0, False: 0.0}
    count = {True: 0, False: 0}
    for sp, yp, up in zip(scores, labels, users):
        if yp != 1:
            continue
        for sn, yn, un in zip(scores, labels, users):
            if yn != 0:
                continue
            same = up == un
            count[same] += 1
            wins[same] += 1.0 if sp > sn else 0.5 if sp == sn else 0.0
    total = count[True] + count[False]
    return ({"auc_within_users": wins[True] / count[True] if count[True] else math.nan,
             "auc_between_users": wins[False] / count[False] if count[False] else math.nan,
             "within_user_pair_share": count[True] / total if total else math.nan})


@settings(max_examples=150, deadline=None)
@given(samples)
def test_pair_split_matches_pairwise_reference(data):
    """AUC split into same-user and cross-user pairs, against the pairwise count;
    the slice metrics carry the same split."""
    scores, labels, users = data
    s = torch.tensor(scores, dtype=torch.float64)
    y, u = torch.tensor(labels), torch.tensor(users)
    m = ranking_metrics(s, y, u)
    ref = ref_pair_split(scores, labels, users)
    for k, v in ref.items():
        assert abs(m[k] - v) < 1e-9 if not math.isnan(v) else math.isnan(m[k]), k
    sl = sliced_ranking_metrics(s, y, u, {})["all"]
    assert all(close(sl[k], m[k]) for k in ref)


def test_pair_split_separates_a_user_offset_from_within_user_order():
    """Scores that are only a per-user offset following the users' click rates: every
    same-user pair ties (within 0.5, GAUC 0.5) while cross-user pairs are ordered."""
    users = torch.tensor([0] * 4 + [1] * 4)
    labels = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0])
    offset = torch.tensor([2.0] * 4 + [-2.0] * 4)
    m = ranking_metrics(offset, labels, users)
    assert m["auc_within_users"] == 0.5 and m["gauc"] == 0.5
    assert m["auc_between_users"] > 0.8 and m["auc"] > 0.5


@settings(max_examples=40, deadline=None)
@given(samples, st.randoms(use_true_random=False))
def test_invariant_to_sample_order(data, rnd):
    scores, labels, users = data
    perm = list(range(len(scores)))
    rnd.shuffle(perm)
    s = torch.tensor(scores, dtype=torch.float64)
    a = ranking_metrics(s, torch.tensor(labels), torch.tensor(users))
    b = ranking_metrics(s[perm], torch.tensor(labels)[perm], torch.tensor(users)[perm])
    for k in a:
        assert close(float(a[k]), float(b[k])), k


def test_matches_torchmetrics_with_ties():
    from torchmetrics.functional.classification import binary_auroc

    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 7, (3000,), generator=g).float() / 7
    y = (torch.rand(3000, generator=g) < 0.5 * (s + 0.2)).long()
    assert auc(s, y) == pytest.approx(float(binary_auroc(s, y)), abs=1e-6)


def test_known_values_and_degenerate_cases():
    assert auc([0.1, 0.9], [0, 1]) == 1.0
    assert auc([0.9, 0.1], [0, 1]) == 0.0
    assert auc([0.5, 0.5], [0, 1]) == 0.5  # torchrec's trapz AUC gives 0 or 1 here
    assert math.isnan(auc([0.1, 0.2], [1, 1]))  # one class
    assert math.isnan(auc([], []))
    # single user == global AUC
    s, y = torch.tensor([0.3, 0.1, 0.7, 0.7, 0.2]), torch.tensor([1, 0, 1, 0, 0])
    u = torch.full((5,), 7)
    assert uauc(s, y, u) == gauc(s, y, u) == auc(s, y)
    # user without both classes is ignored; GAUC weights by impressions
    s2 = torch.tensor([0.9, 0.1, 0.5, 0.8, 0.3, 0.5, 0.6])
    y2 = torch.tensor([1, 0, 1, 0, 0, 1, 1])
    u2 = torch.tensor([0, 0, 1, 1, 1, 2, 2])  # AUCs: 1.0 (n=2), 0.5 (n=3); user 2 one class
    assert uauc(s2, y2, u2) == pytest.approx(0.75)
    assert gauc(s2, y2, u2) == pytest.approx((1.0 * 2 + 0.5 * 3) / 5)
    ga = group_auc(s2, y2, u2)
    assert ga.group_ids.tolist() == [0, 1, 2]
    assert ga.valid.tolist() == [True, True, False]
    assert math.isnan(uauc([0.1, 0.2], [1, 1], [0, 1]))


@pytest.mark.parametrize(
    "scores,labels,users,match",
    [
        ([0.1, float("nan")], [0, 1], None, "scores: 1 non-finite.*index 1"),
        ([0.1, float("inf")], [0, 1], None, "non-finite"),
        ([0.1, 0.2], [0, 2], None, "labels: 1 value.*other than 0/1.*index 1"),
        ([0.1, 0.2], [0.0, 0.5], None, "labels"),
        ([0.1, 0.2], [0, 1, 1], None, "labels: length 3"),
        ([0.1, 0.2], [0, 1], [0.0, 1.0], "user_ids: expected an integer"),
        ([0.1, 0.2], [0, 1], [0], "user_ids: length 1"),
    ],
)
def test_bad_inputs_raise_clear_errors(scores, labels, users, match):
    with pytest.raises(ValueError, match=match):
        if users is None:
            auc(torch.tensor(scores), torch.tensor(labels))
        else:
            gauc(torch.tensor(scores), torch.tensor(labels), torch.tensor(users))


def _toy(n: int = 400, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < 0.4).long()
    s = torch.randn(n, generator=g) + y.float()
    u = torch.randint(0, 25, (n,), generator=g)
    it = torch.randint(0, 40, (n,), generator=g)
    new_user = u < 5
    return s, y, u, it, new_user


def test_accumulator_equals_one_shot():
    s, y, u, it, new_user = _toy()
    cold = torch.zeros(40, dtype=torch.bool)
    cold[::3] = True
    acc = RankingMetricAccumulator()
    for lo in range(0, 400, 64):
        hi = lo + 64
        acc.update(s[lo:hi].float(), y[lo:hi], u[lo:hi], it[lo:hi],
                   slices={"new_user": new_user[lo:hi]})
    assert acc.num_samples == 400
    got = acc.compute(item_slices=cold_warm_item_masks(cold))
    want = sliced_ranking_metrics(
        s.float(), y, u, {"new_user": new_user, "warm": ~cold[it], "cold": cold[it]})
    assert set(got) == {"all", "new_user", "warm", "cold"}
    for name in want:
        for k, v in want[name].items():
            assert close(float(got[name][k]), float(v)), (name, k)
    assert got["all"]["auc"] == pytest.approx(ref_auc(s.float().tolist(), y.tolist()))


def test_accumulator_rejects_inconsistent_batches():
    s, y, u, it, m = _toy(20)
    acc = RankingMetricAccumulator()
    acc.update(s, y, u, it, slices={"a": m})
    with pytest.raises(ValueError, match="slices"):
        acc.update(s, y, u, it, slices={"b": m})
    with pytest.raises(ValueError, match="item_ids"):
        acc.update(s, y, u, None, slices={"a": m})
    acc2 = RankingMetricAccumulator()
    acc2.update(s, y, u)
    with pytest.raises(ValueError, match="item_ids"):
        acc2.compute(item_slices={"x": torch.ones(40, dtype=torch.bool)})


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        s, y, u, it, m = _toy()
        # uneven shards: rank 0 gets 150 samples, rank 1 the other 250
        sl = slice(0, 150) if rank == 0 else slice(150, 400)
        acc = RankingMetricAccumulator()
        for lo in range(sl.start, sl.stop, 70):
            hi = min(lo + 70, sl.stop)
            acc.update(s[lo:hi], y[lo:hi], u[lo:hi], it[lo:hi], slices={"new_user": m[lo:hi]})
        res = acc.compute(item_slices={"even": torch.arange(40) % 2 == 0})
        torch.save({k: torch.tensor([v[x] for x in sorted(v)], dtype=torch.float64)
                    for k, v in res.items()}, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_accumulator_gathers_across_two_gloo_ranks():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_dist_worker, args=(2, os.path.join(d, "init"), d), nprocs=2, join=True)
        s, y, u, it, m = _toy()
        want = sliced_ranking_metrics(s, y, u, {"new_user": m, "even": it % 2 == 0})
        for r in range(2):
            got = torch.load(os.path.join(d, f"r{r}.pt"), weights_only=True)
            assert set(got) == set(want)
            for k, v in want.items():
                ref = torch.tensor([v[x] for x in sorted(v)], dtype=torch.float64)
                assert torch.allclose(got[k], ref, atol=1e-12, equal_nan=True), k
