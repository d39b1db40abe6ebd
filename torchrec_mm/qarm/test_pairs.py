"""Tests of QARM pair mining: Swing and history pairs against straightforward loop
references, a hand-computed Swing value, planted-group recovery, caps, input errors and
``mine_pairs`` on a small synthetic dataset."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchrec_mm.qarm.pairs import (
    SOURCE_CODES,
    ItemNeighbors,
    SwingConfig,
    _swing_graph,
    dedup_pairs,
    mine_pairs,
    pairs_from_history,
    pairs_from_history_reference,
    pairs_from_swing,
    swing,
    swing_reference,
)

FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def _assert_matches_reference(nb: ItemNeighbors, ref: dict, num_items: int, k: int) -> None:
    """Top-k of ``nb`` equals the reference similarities (order up to float ties)."""
    assert nb.idx.shape == (num_items, k) and nb.score.shape == (num_items, k)
    assert nb.idx.dtype == np.int64 and nb.score.dtype == np.float32
    for i in range(num_items):
        row = ref.get(i, {})
        want = sorted(row.values(), reverse=True)[:k]
        m = int((nb.idx[i] >= 0).sum())
        assert m == len(want), (i, nb.idx[i], row)
        assert (nb.idx[i, :m] >= 0).all() and (nb.idx[i, m:] == -1).all()
        assert (nb.score[i, m:] == 0).all()
        np.testing.assert_allclose(nb.score[i, :m], want, rtol=1e-5)
        assert (np.diff(nb.score[i, :m]) <= 0).all()  # best first
        assert len(set(nb.idx[i, :m].tolist())) == m and i not in nb.idx[i, :m]
        for j, s in zip(nb.idx[i, :m].tolist(), nb.score[i, :m].tolist()):
            assert row[j] == pytest.approx(s, rel=1e-5)


@st.composite
def swing_cases(draw):
    n = draw(st.integers(0, 70))
    n_users = draw(st.integers(1, 9))
    n_items = draw(st.integers(1, 10))
    user = np.array(draw(st.lists(st.integers(0, n_users - 1), min_size=n, max_size=n)),
                    np.int64) * 3 + 5  # sparse user ids
    item = np.array(draw(st.lists(st.integers(0, n_items - 1), min_size=n, max_size=n)),
                    np.int64)
    ts = np.array(draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)), np.int64)
    binding = draw(st.booleans())
    cfg = SwingConfig(
        alpha=draw(st.sampled_from([0.0, 0.5, 1.0, 3.0])),
        user_weight=draw(st.booleans()),
        max_items_per_user=draw(st.integers(1, 4)) if binding else 1000,
        max_users_per_item=draw(st.integers(2, 4)) if binding else 1000,
        top_k=draw(st.integers(1, 6)),
        seed=draw(st.integers(0, 3)),
        work_per_chunk=draw(st.sampled_from([1, 7, 10**6])),
        max_pair_entries=draw(st.sampled_from([1, 10**9])),  # 1: chunked intersections
    )
    return user, item, ts, n_items, cfg


@FAST
@given(swing_cases())
def test_swing_matches_reference(case):
    user, item, ts, n_items, cfg = case
    nb = swing(user, item, ts, n_items, cfg)
    _assert_matches_reference(nb, swing_reference(user, item, ts, n_items, cfg), n_items,
                              cfg.top_k)


def test_swing_both_strategies_agree_and_symmetric():
    rng = np.random.default_rng(1)
    user, item = rng.integers(0, 60, 1500), rng.integers(0, 80, 1500)
    ts = rng.integers(0, 100, 1500)
    cfg = SwingConfig(top_k=80, max_users_per_item=20, max_items_per_user=30,
                      work_per_chunk=2000)
    a = swing(user, item, ts, 80, cfg)
    b = swing(user, item, ts, 80, SwingConfig(**{**cfg.__dict__, "max_pair_entries": 1}))
    np.testing.assert_allclose(a.score, b.score, rtol=1e-6)
    dense = np.zeros((80, 80))
    rows = np.repeat(np.arange(80), 80)
    ok = a.idx.reshape(-1) >= 0
    dense[rows[ok], a.idx.reshape(-1)[ok]] = a.score.reshape(-1)[ok]
    assert ok.sum() > 1000
    np.testing.assert_allclose(dense, dense.T, rtol=1e-6)


def test_swing_hand_computed():
    # users 0, 1, 2 all have items {0, 1}; user 3 has {1, 2}
    # pairs sharing 0 and 1: {0,1}, {0,2}, {1,2}: |I_u ∩ I_v| = 2, w_u w_v = 1/2
    user = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    item = np.array([0, 1, 0, 1, 0, 1, 1, 2])
    ts = np.arange(8)
    nb = swing(user, item, ts, 3, SwingConfig(alpha=1.0, top_k=2))
    assert nb.idx[0].tolist() == [1, -1]
    assert nb.score[0, 0] == pytest.approx(3 * 0.5 / (1 + 2))
    assert nb.idx[1].tolist() == [0, -1]  # item 2 has a single user: no pair with it
    assert nb.idx[2].tolist() == [-1, -1]
    nb = swing(user, item, ts, 3, SwingConfig(alpha=0.0, user_weight=False, top_k=2))
    assert nb.score[0, 0] == pytest.approx(3 * 1.0 / 2)


def test_swing_caps():
    # user 0 clicks items 0..9 at times 0..9 (and item 3 again, latest); cap 3 keeps the
    # latest three distinct items {8, 9, 3}
    user = np.zeros(11, np.int64)
    item = np.array(list(range(10)) + [3])
    ts = np.arange(11)
    u, i, _ = _swing_graph(user, item, ts, SwingConfig(max_items_per_user=3))
    assert sorted(i.tolist()) == [3, 8, 9]
    # equal timestamps: the larger item id counts as later
    u, i, _ = _swing_graph(np.zeros(4, np.int64), np.array([5, 1, 7, 2]), np.zeros(4, np.int64),
                           SwingConfig(max_items_per_user=2))
    assert sorted(i.tolist()) == [5, 7]
    # user sampling: 50 users on item 0, 3 on item 1, cap 10
    user = np.concatenate([np.arange(50), np.arange(3)])
    item = np.concatenate([np.zeros(50, np.int64), np.ones(3, np.int64)])
    samples = []
    for seed in (0, 1):
        u, i, _ = _swing_graph(user, item, np.zeros(53, np.int64),
                               SwingConfig(max_users_per_item=10, seed=seed))
        assert (np.bincount(i) == [10, 3]).all()
        samples.append(set(u[i == 0].tolist()))
    assert samples[0] != samples[1]  # the seed matters
    u2, i2, _ = _swing_graph(user, item, np.zeros(53, np.int64),
                             SwingConfig(max_users_per_item=10, seed=0))
    assert set(u2[i2 == 0].tolist()) == samples[0]  # and is reproducible


def test_swing_recovers_planted_groups():
    rng = np.random.default_rng(0)
    n_groups, per_group, n_users, per_user = 8, 25, 400, 12
    n_items = n_groups * per_group
    group_of_user = rng.integers(0, n_groups, n_users)
    user = np.repeat(np.arange(n_users), per_user)
    in_group = rng.random(user.shape[0]) < 0.8
    item = np.where(in_group,
                    group_of_user[user] * per_group + rng.integers(0, per_group, user.shape[0]),
                    rng.integers(0, n_items, user.shape[0]))
    ts = rng.integers(0, 1000, user.shape[0])
    nb = swing(user, item, ts, n_items, SwingConfig(top_k=5))
    ok = nb.idx >= 0
    assert ok.mean() > 0.95
    same = (nb.idx // per_group) == (np.arange(n_items)[:, None] // per_group)
    precision = same[ok].mean()
    assert precision > 0.8, precision  # chance: 1/8
    # and the top-1 pairs are in-group too
    a, b = pairs_from_swing(nb, per_item=1)
    assert ((a // per_group) == (b // per_group)).mean() > 0.8


def test_pairs_from_swing():
    nb = ItemNeighbors(idx=np.array([[2, 1, -1], [-1, -1, -1], [0, 1, 3], [2, -1, -1]]),
                       score=np.array([[0.9, 0.2, 0], [0, 0, 0], [0.9, 0.5, 0.4], [0.1, 0, 0]],
                                      np.float32))
    a, b = pairs_from_swing(nb)
    assert a.tolist() == [0, 2, 3] and b.tolist() == [2, 0, 2]
    a, b = pairs_from_swing(nb, per_item=2, min_score=0.3)
    assert a.tolist() == [0, 2, 2] and b.tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="per_item"):
        pairs_from_swing(nb, per_item=0)


# --------------------------------------------------------------------------- history


@st.composite
def history_cases(draw):
    n = draw(st.integers(0, 60))
    n_items = draw(st.integers(1, 8))
    user = np.array(draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)), np.int64)
    item = np.array(draw(st.lists(st.integers(0, n_items - 1), min_size=n, max_size=n)),
                    np.int64)
    ts = np.array(draw(st.lists(st.integers(0, 6), min_size=n, max_size=n)), np.int64)
    pos = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), bool)
    emb = np.random.default_rng(draw(st.integers(0, 100))).normal(size=(n_items, 4))
    zero = draw(st.lists(st.integers(0, n_items - 1), max_size=2))
    emb[zero] = 0.0  # zero rows: cosine 0
    return (user, item, ts, pos, emb, draw(st.integers(1, 6)), draw(st.integers(1, 7)),
            draw(st.sampled_from([1, 2, 3, 64])))


def _cos(emb, a, b):
    na, nb = np.linalg.norm(emb[a], axis=1), np.linalg.norm(emb[b], axis=1)
    den = na * nb
    return np.where(den > 0, (emb[a] * emb[b]).sum(1) / np.where(den > 0, den, 1), 0.0)


@FAST
@given(history_cases())
def test_history_matches_reference(case):
    user, item, ts, pos, emb, window, chunk, block = case
    a, b = pairs_from_history(user, item, ts, pos, emb, window=window, chunk=chunk,
                              block=block)
    ra, rb = pairs_from_history_reference(user, item, ts, pos, emb, window=window)
    assert a.dtype == np.int64 and b.dtype == np.int64
    assert b.tolist() == rb.tolist()  # same target rows, input order
    assert (a != b).all()
    # the trigger is the reference's or an equally similar item (float ties)
    np.testing.assert_allclose(_cos(emb, a, b), _cos(emb, ra, rb), atol=1e-5)


def test_history_long_time_tie_runs(monkeypatch):
    """Blocks that start inside a long run of equal timestamps overflow their matmul
    context; those rows take the per-offset gather path and give the same pairs."""
    from torchrec_mm.qarm import pairs as mod

    rng = np.random.default_rng(0)
    user = np.repeat(np.arange(6), 40)
    ts = np.repeat(rng.integers(0, 4, 6 * 8), 5)  # runs of 5+ equal times per user
    ts = np.sort(ts.reshape(6, 40), axis=1).reshape(-1)
    item = rng.integers(0, 30, user.shape[0])
    pos = rng.random(user.shape[0]) < 0.8
    emb = rng.normal(size=(30, 6))
    calls = []
    gather = mod._history_best_gather
    monkeypatch.setattr(mod, "_history_best_gather",
                        lambda *a: calls.append(len(a[4])) or gather(*a))
    ra, rb = pairs_from_history_reference(user, item, ts, pos, emb, window=3)
    for block in (4, 64):
        a, b = pairs_from_history(user, item, ts, pos, emb, window=3, chunk=16, block=block)
        assert b.tolist() == rb.tolist()
        np.testing.assert_allclose(_cos(emb, a, b), _cos(emb, ra, rb), atol=1e-5)
    assert calls and calls[0] > 0  # block 4 used the fallback


def test_history_time_ties_window_and_self():
    emb = np.eye(5)
    emb[4] = emb[0] + 0.1 * emb[3]  # 4 is most similar to 0
    emb[2] = emb[3] + 0.5 * emb[1]  # 2 is most similar to 3
    # user 0: items 0 (t=1), 1 and 2 (t=2), 4 (t=3), 3 (t=4); user 1: 0 then 4 at t=9
    user = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    item = np.array([0, 1, 2, 4, 3, 0, 4, 4])
    ts = np.array([1, 2, 2, 3, 4, 9, 9, 10])
    pos = np.array([1, 1, 1, 1, 1, 1, 1, 0], bool)
    a, b = pairs_from_history(user, item, ts, pos, emb, window=50)
    # t=1: nothing before; t=2 rows: only item 0 is strictly earlier (not each other);
    # item 4 at t=3 picks 0; item 3 picks 2; user 1: same time → no pair; negative row
    # (t=10) is no target
    assert list(zip(a.tolist(), b.tolist())) == [(0, 1), (0, 2), (0, 4), (2, 3)]
    # window 1: item 3 only sees item 4 (the latest)
    a, b = pairs_from_history(user, item, ts, pos, emb, window=1)
    assert list(zip(a.tolist(), b.tolist()))[-1] == (4, 3)
    # equal cosines (items 1 and 2 share an embedding): the most recent candidate wins
    e = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    for order in ([1, 2], [2, 1]):
        for fn in (pairs_from_history, pairs_from_history_reference):
            a, b = fn([0, 0, 0], order + [0], [0, 1, 2], [True] * 3, e)
            assert a.tolist() == [order[0], order[1]] and b.tolist() == [order[1], 0]
    # the target item itself is never its trigger, but keeps its window slot
    a, b = pairs_from_history([0, 0, 0], [1, 2, 2], [0, 1, 2], [True] * 3, np.eye(3), window=1)
    assert list(zip(a.tolist(), b.tolist())) == [(1, 2)]


def test_history_planted_similarity():
    """The trigger is the most similar earlier item, not simply the most recent one."""
    rng = np.random.default_rng(0)
    n_users, hist, n_hist_items = 200, 20, 400
    user = np.repeat(np.arange(n_users), hist)
    item = rng.integers(0, n_hist_items, user.shape[0])
    # the last positive of user u is a new item (id 400 + u) whose embedding is a near
    # copy of that of one random earlier item of u
    last = np.arange(n_users) * hist + hist - 1
    planted = last - 1 - rng.integers(0, hist - 1, n_users)
    item[last] = n_hist_items + np.arange(n_users)
    emb = rng.normal(size=(n_hist_items + n_users, 16))
    emb[item[last]] = emb[item[planted]] + 1e-2 * rng.normal(size=(n_users, 16))
    ts = np.tile(np.arange(hist), n_users)
    a, b = pairs_from_history(user, item, ts, np.ones(user.shape[0], bool), emb, window=50)
    trigger = dict(zip(b.tolist(), a.tolist()))
    hit = np.mean([trigger[int(item[r])] == int(item[p]) for r, p in zip(last, planted)])
    assert hit == 1.0
    # window 3 only sees the 3 latest items: the planted one only when it is among them
    a, b = pairs_from_history(user, item, ts, np.ones(user.shape[0], bool), emb, window=3)
    trigger = dict(zip(b.tolist(), a.tolist()))
    in_window = (last - planted) <= 3
    got = np.array([trigger[int(item[r])] == int(item[p]) for r, p in zip(last, planted)])
    assert got[in_window].all() and got[~in_window].mean() < 0.1


# --------------------------------------------------------------------------- errors


def test_bad_inputs():
    u, i, t = np.array([0, 1]), np.array([0, 1]), np.array([0, 1])
    with pytest.raises(ValueError, match="'item' has 3 rows"):
        swing(u, np.array([0, 1, 2]), t, 3)
    with pytest.raises(ValueError, match=r"'item' row 1: id 5 is out of range \[0, 3\)"):
        swing(u, np.array([0, 5]), t, 3)
    with pytest.raises(ValueError, match="'item' row 0: id -1"):
        swing(u, np.array([-1, 0]), t, 3)
    with pytest.raises(ValueError, match="'user' row 1: id -4 must be >= 0"):
        swing(np.array([0, -4]), i, t, 3)
    with pytest.raises(ValueError, match="'timestamp' must hold integers"):
        swing(u, i, np.array([0.5, 1.0]), 3)
    with pytest.raises(ValueError, match="alpha"):
        swing(u, i, t, 3, SwingConfig(alpha=-1))
    emb = np.ones((3, 2))
    emb[2, 1] = np.nan
    with pytest.raises(ValueError, match="'item_emb' row 2 .*NaN"):
        pairs_from_history(u, i, t, [True, True], emb)
    with pytest.raises(ValueError, match="'positive' has shape"):
        pairs_from_history(u, i, t, [True], np.ones((3, 2)))
    with pytest.raises(ValueError, match="'positive' row 1"):
        pairs_from_history(u, i, t, [1, 7], np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"'item' row 1: id 1 is out of range \[0, 1\)"):
        pairs_from_history(u, i, t, [True, True], np.ones((1, 2)))
    with pytest.raises(ValueError, match="'timestamp' has 1 rows"):
        pairs_from_history(u, i, t[:1], [True, True], np.ones((3, 2)))


def test_dedup_pairs():
    a = np.array([1, 2, 3, 1, 4, 2])
    b = np.array([2, 1, 3, 2, 5, 1])
    assert dedup_pairs(a, b).tolist() == [0, 4]
    assert dedup_pairs(a, b, unordered=False).tolist() == [0, 1, 4]


# --------------------------------------------------------------------------- mine_pairs


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    from torchrec_mm.data.split import make_split
    from torchrec_mm.data.synth import SynthConfig, generate

    d = str(tmp_path_factory.mktemp("qarm_pairs") / "synth")
    generate(SynthConfig(num_users=150, num_items=300, num_interactions=6000, seed=3), d)
    make_split(d, cold_item_frac=0.1, test_time_frac=0.2, seed=0)
    return d


def test_mine_pairs(synth_dir):
    from torchrec_mm.data.io import load_interaction_columns
    from torchrec_mm.data.split import load_split

    emb = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    cfg = SwingConfig(top_k=10)
    out = mine_pairs(synth_dir, item_emb=emb, swing_cfg=cfg, window=20)
    a, b, src, stats = out["a"], out["b"], out["source"], out["stats"]
    assert a.dtype == np.int64 and src.dtype == np.int8 and a.shape == b.shape == src.shape
    assert stats["history_pairs"] > 0 and stats["swing_pairs"] > 0
    assert stats["pairs"] == a.shape[0] == stats["history_pairs"] + stats["swing_pairs"]
    assert set(np.unique(src).tolist()) == set(SOURCE_CODES.values())
    assert (a != b).all()
    key = np.minimum(a, b) * 300 + np.maximum(a, b)
    assert np.unique(key).shape[0] == key.shape[0]
    split = load_split(synth_dir)
    assert not split.cold_mask[a].any() and not split.cold_mask[b].any()
    # same as the building blocks on the train rows
    c = load_interaction_columns(synth_dir, ["user_id", "item_id", "timestamp", "label"])
    tr = split.assign(c["item_id"], c["timestamp"]) == 0
    ha, hb = pairs_from_history(c["user_id"][tr], c["item_id"][tr], c["timestamp"][tr],
                                c["label"][tr] == 1, emb, window=20)
    assert stats["history_pairs_raw"] == ha.shape[0]
    h = src == SOURCE_CODES["history"]
    keep = dedup_pairs(ha, hb)
    assert a[h].tolist() == ha[keep].tolist() and b[h].tolist() == hb[keep].tolist()
    assert (c["timestamp"][tr] < split.time_cut).all()
    # swing only: no embeddings needed
    only = mine_pairs(synth_dir, sources=("swing",), swing_cfg=cfg)
    assert (only["source"] == SOURCE_CODES["swing"]).all()
    assert only["stats"]["pairs"] >= stats["swing_pairs"]


def test_mine_pairs_errors(synth_dir):
    with pytest.raises(ValueError, match="needs item_emb"):
        mine_pairs(synth_dir)
    with pytest.raises(ValueError, match="unknown pair source"):
        mine_pairs(synth_dir, sources=("swing", "graph"))
    with pytest.raises(ValueError, match="'item_emb' has 10 rows"):
        mine_pairs(synth_dir, item_emb=np.ones((10, 4)))
