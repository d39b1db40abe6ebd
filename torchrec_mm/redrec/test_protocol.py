"""Tests of the RED-Rec evaluation protocol: case construction against a loop
reference, seeding, pools, and metrics against a brute-force appendix-D reference."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrec_mm.metrics.retrieval import RetrievalIndexOptions, evaluate_retrieval
from torchrec_mm.redrec.protocol import (
    ProtocolConfig,
    evaluate_multi_interest,
    evaluate_scores,
    make_eval_cases,
)

FAST = settings(max_examples=25, deadline=None)


def make_log(seed, num_users=40, max_len=12, num_items=50, ts_range=15):
    """A (user, timestamp)-sorted log with repeated timestamps and repeated items."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len + 1, num_users)
    off = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    item = rng.integers(0, num_items, off[-1])
    ts = np.concatenate([np.sort(rng.integers(0, ts_range, n)) for n in lengths]
                        + [np.zeros(0, np.int64)]).astype(np.int64)
    return off, item, ts


def ref_eligible_users(off, ts, cfg, eligible):
    users = []
    for u in range(len(off) - 1):
        s, e = off[u], off[u + 1]
        for c in range(s, e):
            if (c - s >= cfg.min_history and eligible[c] and (c == s or ts[c] > ts[c - 1])
                    and eligible[c:e].sum() >= cfg.min_targets):
                users.append(u)
                break
    return users


def check_cases(cases, off, item, ts, cfg, eligible):
    """Every case against the protocol's definition, one at a time."""
    assert cases.users.tolist() == sorted(set(cases.users.tolist()))
    for i, u in enumerate(cases.users.tolist()):
        s, e, c = off[u], off[u + 1], int(cases.cutoff_index[i])
        assert int(cases.history_start[i]) == s and s <= c < e
        assert c - s >= cfg.min_history and int(cases.history_length[i]) == c - s
        assert eligible[c] and (c == s or ts[c] > ts[c - 1])
        t_cut = int(cases.cutoff_time[i])
        assert t_cut == ts[c] and (ts[s:c] < t_cut).all()
        rows = [r for r in range(c, e) if eligible[r]][: cfg.num_targets]
        assert len(rows) >= cfg.min_targets
        assert all(ts[r] >= t_cut for r in rows)  # strictly after every history event
        want = []
        for r in rows:
            if item[r] not in want:
                want.append(int(item[r]))
        assert cases.targets[i].tolist() == want + [-1] * (cfg.num_targets - len(want))


# --------------------------------------------------------------------------- cases


@FAST
@given(seed=st.integers(0, 2**31), min_history=st.integers(0, 3), num_targets=st.integers(1, 4),
       min_targets=st.integers(1, 4), use_rows=st.booleans())
def test_cases_follow_the_protocol(seed, min_history, num_targets, min_targets, use_rows):
    off, item, ts = make_log(seed)
    cfg = ProtocolConfig(num_targets=num_targets, pool_size=20, seed=seed,
                         min_history=min_history, min_targets=min(min_targets, num_targets))
    rows = np.random.default_rng(seed + 1).random(len(item)) < 0.6 if use_rows else None
    eligible = rows if use_rows else np.ones(len(item), bool)
    cases = make_eval_cases(off, item, ts, 50, cfg, target_rows=rows)
    assert cases.users.tolist() == ref_eligible_users(off, ts, cfg, eligible)
    check_cases(cases, off, item, ts, cfg, eligible)
    assert (cases.targets[:, 0] >= 0).all()
    # the candidate matrix: the pool with the user's own targets blanked, then the targets
    cand = cases.candidates()
    p = cases.pool.shape[0]
    assert cand.shape == (len(cases), p + num_targets) == (len(cases), cases.num_candidates)
    for i in range(len(cases)):
        tg = [t for t in cases.targets[i].tolist() if t >= 0]
        pool_part = cand[i, :p].tolist()
        assert cand[i, p:].tolist() == cases.targets[i].tolist()
        assert all((x == -1) == (y in tg) for x, y in zip(pool_part, cases.pool.tolist()))
        assert set(tg) <= set(cand[i].tolist())


def test_cases_are_deterministic_per_seed_and_cutoffs_are_uniform():
    off, item, ts = make_log(3, num_users=60)
    a = make_eval_cases(off, item, ts, 50, ProtocolConfig(pool_size=30, seed=7))
    b = make_eval_cases(torch.from_numpy(off), torch.from_numpy(item), torch.from_numpy(ts), 50,
                        ProtocolConfig(pool_size=30, seed=7))
    for f in ("users", "cutoff_index", "cutoff_time", "targets", "pool"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    c = make_eval_cases(off, item, ts, 50, ProtocolConfig(pool_size=30, seed=8))
    assert not torch.equal(a.cutoff_index, c.cutoff_index) and not torch.equal(a.pool, c.pool)
    # 400 identical users, 5 events at distinct times: cutoffs 1..4 equally likely
    off2 = np.arange(0, 2001, 5)
    ts2 = np.tile(np.arange(5), 400)
    cases = make_eval_cases(off2, np.tile(np.arange(5), 400), ts2, 5,
                            ProtocolConfig(pool_size=5, seed=0))
    counts = np.bincount((cases.cutoff_index - cases.history_start).numpy(), minlength=5)
    assert counts[0] == 0 and counts.sum() == 400 and (np.abs(counts[1:] - 100) < 35).all()


def test_pool_and_user_subset():
    off, item, ts = make_log(5, num_users=80)
    full = make_eval_cases(off, item, ts, 50, ProtocolConfig(pool_size=1_000_000))
    assert full.pool.tolist() == list(range(50))  # clamped: the whole catalog
    cfg = ProtocolConfig(pool_size=20, seed=1)
    cases = make_eval_cases(off, item, ts, 50, cfg)
    pool = cases.pool.tolist()
    assert len(pool) == 20 and pool == sorted(set(pool)) and 0 <= pool[0] and pool[-1] < 50
    # the pool depends only on (seed, pool_size, num_items)
    other = make_eval_cases(*make_log(6), 50, cfg)
    assert torch.equal(other.pool, cases.pool)
    sub = make_eval_cases(off, item, ts, 50, ProtocolConfig(pool_size=20, seed=1, max_users=10))
    assert len(sub) == 10 and set(sub.users.tolist()) <= set(cases.users.tolist())
    idx = torch.searchsorted(cases.users, sub.users)
    assert torch.equal(cases.cutoff_index[idx], sub.cutoff_index)  # same cutoffs per user
    assert torch.equal(cases.targets[idx], sub.targets)


def test_case_input_errors():
    off, item, ts = make_log(0, num_users=5)
    with pytest.raises(ValueError, match="log_user_offsets: expected"):
        make_eval_cases(off[:-1], item, ts, 50)
    with pytest.raises(ValueError, match="timestamp: .* values"):
        make_eval_cases(off, item, ts[:-1], 50)
    bad = item.copy()
    bad[3] = 50
    u3 = int(np.searchsorted(off, 3, side="right") - 1)
    with pytest.raises(ValueError, match=rf"item: 1 id\(s\) outside \[0, 50\); first at row 3 "
                                         rf"\(user {u3}\): 50"):
        make_eval_cases(off, bad, ts, 50)
    off2, ts2 = np.array([0, 3, 6]), np.array([1, 5, 2, 0, 1, 2])
    with pytest.raises(ValueError, match="not sorted within user 0: row 2"):
        make_eval_cases(off2, np.zeros(6, np.int64), ts2, 1)
    with pytest.raises(ValueError, match="expected integers"):
        make_eval_cases(off2, np.zeros(6), np.arange(6), 1)
    with pytest.raises(ValueError, match="target_rows"):
        make_eval_cases(off2, np.zeros(6, np.int64), np.arange(6), 1, target_rows=np.ones(5, bool))
    with pytest.raises(ValueError, match="min_targets"):
        ProtocolConfig(num_targets=2, min_targets=3)


# --------------------------------------------------------------------------- metrics


def ref_metrics(scores, cand, ks):
    """Appendix D, one user at a time: a target tied with a non-target ranks below it."""
    out = {f"{m}@{k}": [] for m in ("HR", "NDCG", "MRR") for k in ks}
    out["MRR"] = []
    p = cand.shape[1]
    for i in range(cand.shape[0]):
        cols = [j for j in range(p) if cand[i, j] >= 0]
        tg = {int(x) for x in cand[i] if x >= 0} & set(int(x) for x in cand[i, -3:] if x >= 0)
        entries = sorted(((float(scores[i, j]), j >= p - 3) for j in cols),
                         key=lambda e: (-e[0], e[1]))
        ranks = [r + 1 for r, (_, is_t) in enumerate(entries) if is_t]
        first = ranks[0]
        for k in ks:
            out[f"HR@{k}"].append(float(first <= k))
            dcg = sum(1 / math.log2(r + 1) for r in ranks if r <= k)
            idcg = sum(1 / math.log2(j + 1) for j in range(1, min(len(tg), k) + 1))
            out[f"NDCG@{k}"].append(dcg / idcg)
            out[f"MRR@{k}"].append(1 / first if first <= k else 0.0)
        out["MRR"].append(1 / first)
    return {k: float(np.mean(v)) for k, v in out.items()}


@FAST
@given(seed=st.integers(0, 2**31), pool_size=st.integers(0, 30),
       ks=st.lists(st.integers(1, 40), min_size=1, max_size=3, unique=True))
def test_metrics_match_brute_force(seed, pool_size, ks):
    off, item, ts = make_log(seed, num_users=12, num_items=25)
    cases = make_eval_cases(off, item, ts, 25, ProtocolConfig(pool_size=pool_size, seed=seed))
    if len(cases) == 0:
        return
    rng = np.random.default_rng(seed)
    scores = torch.from_numpy(rng.integers(0, 4, (len(cases), cases.num_candidates))).double()
    cand = cases.candidates()
    scores[cand < 0] = float("nan")  # ignored
    want = ref_metrics(scores.numpy(), cand.numpy(), ks)
    got = evaluate_scores(scores, cases, ks, progress=False)
    for k, v in want.items():
        assert math.isclose(got[k], v, rel_tol=1e-12, abs_tol=1e-12), k
    assert got["num_users"] == len(cases) and got["pool_size"] == cases.pool.shape[0]
    # the callable path, one case per chunk
    lookup = {int(u): i for i, u in enumerate(cases.users)}

    def score_fn(users, cands):
        rows = torch.tensor([lookup[int(u)] for u in users])
        assert torch.equal(cands, cand[rows])
        return scores[rows]

    got2 = evaluate_scores(score_fn, cases, ks, batch_size=1, progress=False)
    assert all(math.isclose(got2[k], got[k], rel_tol=1e-12) for k in want)


def test_perfect_constant_and_random_scorers():
    off, item, ts = make_log(11, num_users=1500, max_len=8, num_items=400, ts_range=1000)
    cfg = ProtocolConfig(pool_size=200, ks=(1, 10, 50), seed=2)
    cases = make_eval_cases(off, item, ts, 400, cfg)
    cand = cases.candidates()
    p = cases.pool.shape[0]
    perfect = torch.zeros(cand.shape)
    perfect[:, p:] = 1.0
    res = evaluate_scores(perfect, cases, progress=False)
    assert all(res[f"{m}@{k}"] == 1.0 for m in ("HR", "NDCG", "MRR") for k in cfg.ks)
    assert res["MRR"] == 1.0
    const = evaluate_scores(torch.zeros(cand.shape), cases, progress=False)
    assert const["HR@50"] == 0.0 and const["MRR"] < 1 / 150
    # a random scorer: HR@K = P(one of the n_t targets among K of N candidates)
    gen = torch.Generator().manual_seed(0)
    rnd = evaluate_scores(torch.rand(cand.shape, generator=gen), cases, progress=False)
    n = (cand >= 0).sum(1).numpy()
    nt = (cases.targets >= 0).sum(1).numpy()
    for k in cfg.ks:
        ph = np.array([1 - math.comb(a - b, k) / math.comb(a, k) for a, b in zip(n, nt)])
        sd = math.sqrt((ph * (1 - ph)).sum()) / len(ph)
        assert abs(rnd[f"HR@{k}"] - ph.mean()) < 4 * sd, (k, rnd[f"HR@{k}"], ph.mean())
    assert 0.02 < rnd["HR@10"] < 0.3


def test_multi_interest_evaluation_parity():
    off, item, ts = make_log(4, num_users=50, num_items=120)
    cases = make_eval_cases(off, item, ts, 120, ProtocolConfig(pool_size=60, ks=(1, 5, 20)))
    gen = torch.Generator().manual_seed(1)
    uv = torch.randn(len(cases), 3, 8, generator=gen, dtype=torch.float64)
    ie = torch.randn(120, 8, generator=gen, dtype=torch.float64)
    got = evaluate_multi_interest(uv, ie, cases, progress=False, batch_size=7)
    # explicit max-over-interests cosine scores through evaluate_scores
    rows = {int(u): i for i, u in enumerate(cases.users)}

    def score_fn(users, cands):
        q = F.normalize(uv[[rows[int(u)] for u in users]], dim=-1)
        v = F.normalize(ie[cands.clamp(min=0)], dim=-1)
        return torch.einsum("rkd,rcd->rkc", q, v).amax(1)

    ref = evaluate_scores(score_fn, cases, progress=False)
    for k in ref:
        assert math.isclose(got[k], ref[k], rel_tol=1e-12), k
    # and the metrics module's faiss path on the same shared pool
    faiss_res = evaluate_retrieval(uv, ie, cases.pool, cases.targets, ks=(1, 5, 20),
                                   metric="cosine", options=RetrievalIndexOptions(progress=False))
    for k in ("HR@1", "HR@5", "NDCG@5", "NDCG@20", "MRR@20"):
        assert math.isclose(got[k], faiss_res[k], rel_tol=1e-9), k
    # a single vector per case is the K = 1 case
    one = evaluate_multi_interest(uv[:, 0], ie, cases, progress=False)
    assert one == evaluate_multi_interest(uv[:, :1], ie, cases, progress=False)
    # an item bias: scale * max-over-interests cosine + bias[item]
    bias = torch.randn(120, generator=gen, dtype=torch.float64) * 2
    got_b = evaluate_multi_interest(uv, ie, cases, progress=False, batch_size=7,
                                    item_bias=bias, scale=5.0)
    ref_b = evaluate_scores(lambda users, cands: 5.0 * score_fn(users, cands)
                            + bias[cands.clamp(min=0)], cases, progress=False)
    for k in ref_b:
        assert math.isclose(got_b[k], ref_b[k], rel_tol=1e-12), k
    assert got_b["MRR"] != got["MRR"]  # the bias moves the ranking
    with pytest.raises(ValueError, match="item_bias: expected 120 finite values"):
        evaluate_multi_interest(uv, ie, cases, progress=False, item_bias=bias[:5])
    with pytest.raises(ValueError, match="got NaN/Inf at item 0"):
        evaluate_multi_interest(uv, ie, cases, progress=False,
                                item_bias=torch.full((120,), math.nan))


def test_merge_diagnostics_match_brute_force():
    """interest_top1_share / distinct_top10_items against a per-case loop; an interest
    along the items' shared direction takes every case's top item and the head is the
    same for everyone (10 distinct items)."""
    off, item, ts = make_log(5, num_users=40, num_items=150)
    cases = make_eval_cases(off, item, ts, 150, ProtocolConfig(pool_size=80, ks=(10,)))
    gen = torch.Generator().manual_seed(2)
    uv = torch.randn(len(cases), 3, 8, generator=gen, dtype=torch.float64)
    ie = torch.randn(150, 8, generator=gen, dtype=torch.float64)
    got = evaluate_multi_interest(uv, ie, cases, progress=False, batch_size=6)
    q, v = F.normalize(uv, dim=-1), F.normalize(ie[cases.pool], dim=-1)
    wins, heads = [0, 0, 0], set()
    for i in range(len(cases)):
        targets = set(cases.targets[i][cases.targets[i] >= 0].tolist())
        s = q[i] @ v.T  # [K, P]
        order = [j for j in s.amax(0).argsort(descending=True).tolist()
                 if int(cases.pool[j]) not in targets][:10]
        wins[int(s[:, order[0]].argmax())] += 1
        heads.update(int(cases.pool[j]) for j in order)
    assert got["interest_top1_share"] == pytest.approx([w / len(cases) for w in wins])
    assert got["distinct_top10_items"] == len(heads) > 10
    n = len(cases)
    pairs = [[float(q[a, j] @ q[b, j]) for a in range(n) for b in range(n) if a != b]
             for j in range(3)]
    assert got["interest_user_cosine"] == pytest.approx([np.mean(p) for p in pairs])

    shared = torch.zeros(8, dtype=torch.float64)
    shared[0] = 1.0
    skewed = F.normalize(ie, dim=-1) + 3 * shared  # every item close to one direction
    uv2 = uv.clone()
    uv2[:, 0] = shared  # interest 0 points along it, the others stay random
    dom = evaluate_multi_interest(uv2, skewed, cases, progress=False)
    assert dom["interest_top1_share"][0] == 1.0 and sum(dom["interest_top1_share"]) == 1.0
    assert dom["distinct_top10_items"] <= 10 + int((cases.targets >= 0).sum())
    assert dom["interest_user_cosine"][0] == pytest.approx(1.0)  # same for every case
    assert abs(dom["interest_user_cosine"][1]) < 0.2  # random per case


def test_metric_input_errors():
    off, item, ts = make_log(2, num_users=10, num_items=30)
    cases = make_eval_cases(off, item, ts, 30, ProtocolConfig(pool_size=10))
    s = torch.zeros(len(cases), cases.num_candidates)
    with pytest.raises(ValueError, match=r"scores: expected \[U'="):
        evaluate_scores(s[:, 1:], cases, progress=False)
    s[2, cases.num_candidates - 3] = float("nan")  # the first target column: valid
    with pytest.raises(ValueError, match=rf"case 2 \(user {int(cases.users[2])}\), candidate "
                                         rf"column {cases.num_candidates - 3}"):
        evaluate_scores(s, cases, progress=False)
    with pytest.raises(ValueError, match="score_fn: expected"):
        evaluate_scores(lambda u, c: torch.zeros(3), cases, progress=False)
    with pytest.raises(ValueError, match="user_vecs: 3 rows"):
        evaluate_multi_interest(torch.randn(3, 2, 4), torch.randn(30, 4), cases)
    uv = torch.randn(len(cases), 2, 4)
    uv[1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="user_vecs: 1 case.* first case 1"):
        evaluate_multi_interest(uv, torch.randn(30, 4), cases)
    with pytest.raises(ValueError, match=r"item_emb: expected \[N=30"):
        evaluate_multi_interest(torch.randn(len(cases), 4), torch.randn(29, 4), cases)
