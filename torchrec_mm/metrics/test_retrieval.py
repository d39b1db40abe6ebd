import math
from typing import Dict, List, Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrec_mm.metrics.retrieval import (
    RetrievalIndexOptions,
    evaluate_retrieval,
    retrieval_metrics_from_scores,
)

# ----------------------------------------------------------------- reference: sort per user


def ref_metrics(scores: List[List[float]], targets: List[List[bool]], valid: List[List[bool]],
                ks: Sequence[int]) -> Dict[str, float]:
    sums: Dict[str, float] = {}
    n = 0
    for s, t, v in zip(scores, targets, valid):
        num_t = sum(t)
        if num_t == 0:
            continue
        n += 1
        cand = [(sc, tg) for sc, tg, ok in zip(s, t, v) if ok]
        # best score first; on equal score a non-target (False) comes first (pessimistic)
        cand.sort(key=lambda x: (-x[0], x[1]))
        hit_pos = [i + 1 for i, (_, tg) in enumerate(cand) if tg]
        first = hit_pos[0] if hit_pos else math.inf
        for k in ks:
            dcg = sum(1 / math.log2(p + 1) for p in hit_pos if p <= k)
            idcg = sum(1 / math.log2(j + 1) for j in range(1, min(num_t, k) + 1))
            sums[f"HR@{k}"] = sums.get(f"HR@{k}", 0.0) + (1.0 if first <= k else 0.0)
            sums[f"NDCG@{k}"] = sums.get(f"NDCG@{k}", 0.0) + dcg / idcg
            sums[f"MRR@{k}"] = sums.get(f"MRR@{k}", 0.0) + (1 / first if first <= k else 0.0)
    out = {k: (v / n if n else math.nan) for k, v in sums.items()}
    out["num_users"] = n
    return out


def assert_same(got: Dict[str, float], want: Dict[str, float], ks: Sequence[int]) -> None:
    assert got["num_users"] == want["num_users"]
    if want["num_users"] == 0:
        assert all(math.isnan(got[f"HR@{k}"]) for k in ks)
        return
    for name in ("HR", "NDCG", "MRR"):
        for k in ks:
            key = f"{name}@{k}"
            assert got[key] == pytest.approx(want[key], abs=1e-12), key


matrices = st.tuples(st.integers(1, 5), st.integers(1, 25)).flatmap(
    lambda uc: st.tuples(
        st.lists(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0]), min_size=uc[1],
                          max_size=uc[1]), min_size=uc[0], max_size=uc[0]),
        st.lists(st.lists(st.booleans(), min_size=uc[1], max_size=uc[1]),
                 min_size=uc[0], max_size=uc[0]),
        st.lists(st.lists(st.booleans(), min_size=uc[1], max_size=uc[1]),
                 min_size=uc[0], max_size=uc[0]),
    )
)
ks_st = st.lists(st.sampled_from([1, 2, 3, 5, 10, 30]), min_size=1, max_size=4, unique=True)


@settings(max_examples=150, deadline=None)
@given(matrices, ks_st, st.booleans())
def test_dense_metrics_match_per_user_sort_reference(data, ks, use_valid):
    scores, targets, valid = data
    if not use_valid:
        valid = [[True] * len(r) for r in scores]
    got = retrieval_metrics_from_scores(
        torch.tensor(scores), torch.tensor(targets), ks,
        valid_mask=torch.tensor(valid) if use_valid else None)
    assert_same(got, ref_metrics(scores, targets, valid, ks), ks)


def test_known_values():
    # one user, targets at positions 2 and 4 of 5 candidates
    s = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]])
    t = torch.tensor([[False, True, False, True, False]])
    m = retrieval_metrics_from_scores(s, t, ks=(1, 3, 10))
    assert m["HR@1"] == 0 and m["HR@3"] == 1 and m["HR@10"] == 1
    assert m["MRR@1"] == 0 and m["MRR@3"] == 0.5
    idcg = 1 + 1 / math.log2(3)
    assert m["NDCG@3"] == pytest.approx((1 / math.log2(3)) / idcg)
    assert m["NDCG@10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / idcg)
    # ties are pessimistic: a constant scorer earns nothing at K=1
    c = retrieval_metrics_from_scores(
        torch.zeros(1, 4), torch.tensor([[False, True, False, False]]), ks=(1, 4))
    assert c["HR@1"] == 0 and c["HR@4"] == 1 and c["MRR@4"] == 0.25
    # users without targets are not counted
    z = retrieval_metrics_from_scores(
        torch.zeros(2, 3), torch.tensor([[False] * 3, [True, False, False]]), ks=(3,))
    assert z["num_users"] == 1 and z["HR@3"] == 1
    with pytest.raises(ValueError, match="non-finite.*user 0, candidate 1"):
        retrieval_metrics_from_scores(
            torch.tensor([[0.0, math.nan]]), torch.tensor([[True, False]]), (1,))


# ----------------------------------------------------------------- faiss path vs dense


def _dense_reference(users, items, pools, targets, ks, metric, add_targets):
    """Scores every item for every user; valid = the user's pool (+ targets)."""
    u, i = users.double(), items.double()
    if metric == "cosine":
        u, i = torch.nn.functional.normalize(u, dim=-1), torch.nn.functional.normalize(i, dim=-1)
    if u.dim() == 2:
        scores = u @ i.T
    else:  # [U, I, D]: max over interests
        scores = torch.einsum("uid,nd->uin", u, i).amax(1)
    num_u, num_n = scores.shape
    valid = torch.zeros(num_u, num_n, dtype=torch.bool)
    tmask = torch.zeros(num_u, num_n, dtype=torch.bool)
    for r in range(num_u):
        pool = pools if isinstance(pools, torch.Tensor) and pools.dim() == 1 else pools[r]
        valid[r, torch.as_tensor(pool, dtype=torch.long)] = True
        tmask[r, torch.as_tensor(targets[r], dtype=torch.long)] = True
    if add_targets:
        valid |= tmask
    return retrieval_metrics_from_scores(scores, tmask, ks, valid)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.booleans(), st.booleans(), st.sampled_from(["cosine", "ip"]),
       st.sampled_from([0, 1, 3]))
def test_faiss_path_matches_dense_scores(seed, shared, add_targets, metric, interests):
    g = torch.Generator().manual_seed(seed)
    num_u, num_n, d = 12, 150, 8
    # interests == 0: [U, D] users; else [U, I, D] multi-interest users (max over interests)
    users = torch.randn(num_u, *([interests] if interests else []), d, generator=g)
    items = torch.randn(num_n, d, generator=g) * (1 + torch.rand(num_n, 1, generator=g))
    targets = [torch.randperm(num_n, generator=g)[: int(torch.randint(0, 4, (1,), generator=g))]
               for _ in range(num_u)]
    if shared:
        pools = torch.randperm(num_n, generator=g)[:60]
    else:
        pools = [torch.randperm(num_n, generator=g)[: int(torch.randint(1, 70, (1,), generator=g))]
                 for _ in range(num_u)]
    ks = (1, 5, 20, 1000) if seed % 2 else (1, 3, 8)  # 1000 > pool size; 8 < pool size
    got = evaluate_retrieval(users, items, pools, targets, ks, metric=metric,
                             add_targets_to_pool=add_targets,
                             options=RetrievalIndexOptions(batch_size=5))
    want = _dense_reference(users, items, pools, targets, ks, metric, add_targets)
    assert_same(got, want, ks)


def test_approximate_indexes():
    g = torch.Generator().manual_seed(0)
    users, items = torch.randn(40, 16, generator=g), torch.randn(2000, 16, generator=g)
    targets = torch.randint(0, 2000, (40, 3), generator=g)
    ks = (10, 100)
    exact = evaluate_retrieval(users, items, None, targets, ks)
    # IVF probing every list is exhaustive, hence exact
    ivf = evaluate_retrieval(users, items, None, targets, ks, index="ivf",
                             options=RetrievalIndexOptions(ivf_nlist=16, ivf_nprobe=16))
    assert_same(ivf, exact, ks)
    hnsw = evaluate_retrieval(users, items, None, targets, ks, index="hnsw")
    for k in ks:
        assert abs(hnsw[f"HR@{k}"] - exact[f"HR@{k}"]) <= 0.05
    with pytest.warns(UserWarning, match="fewer than"):  # one list of ~125 < 403 wanted
        evaluate_retrieval(users, items, None, targets, (400,), index="ivf",
                           options=RetrievalIndexOptions(ivf_nlist=16, ivf_nprobe=1))
    with pytest.raises(ValueError, match="shared candidate pool"):
        evaluate_retrieval(users, items, [[0, 1]] * 40, targets, ks, index="hnsw")


def test_planted_signal_is_recovered():
    g = torch.Generator().manual_seed(3)
    items = torch.randn(3000, 32, generator=g)
    targets = torch.randint(0, 3000, (200,), generator=g)
    pool = torch.randperm(3000, generator=g)[:1000]
    near = items[targets] + 0.3 * torch.randn(200, 32, generator=g)
    far = torch.randn(200, 32, generator=g)
    good = evaluate_retrieval(near, items, pool, targets, ks=(10,))
    rand = evaluate_retrieval(far, items, pool, targets, ks=(10,))
    assert good["HR@10"] > 0.95 and good["MRR@10"] > 0.9
    assert rand["HR@10"] < 0.06  # chance is ~10 / 1001
    per = evaluate_retrieval(near, items, pool, targets, ks=(10,), return_per_user=True)
    assert per["per_user"]["HR@10"].shape == (200,)


def test_bad_inputs():
    users, items = torch.randn(2, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match="targets: 1 id.*outside \\[0, 10\\).*row 1"):
        evaluate_retrieval(users, items, None, [[1], [12]])
    with pytest.raises(ValueError, match="targets: 3 rows"):
        evaluate_retrieval(users, items, None, [[1], [2], [3]])
    bad = items.clone()
    bad[4, 0] = math.nan
    with pytest.raises(ValueError, match="item_emb: 1 row.*NaN.*first row 4"):
        evaluate_retrieval(users, bad, None, [[1], [2]])
    with pytest.raises(ValueError, match="metric"):
        evaluate_retrieval(users, items, None, [[1], [2]], metric="l2")
    with pytest.raises(ValueError, match="dimensions differ"):
        evaluate_retrieval(users, torch.randn(10, 5), None, [[1], [2]])
