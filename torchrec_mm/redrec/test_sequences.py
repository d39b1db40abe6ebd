import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrec_mm.data.io import load_interaction_columns
from torchrec_mm.data.schema import DataError
from torchrec_mm.data.split import load_split, make_split
from torchrec_mm.data.synth import SynthConfig, generate
from torchrec_mm.redrec.sequences import (
    PAD,
    POLICIES,
    SEQ_FEATURES,
    EventLog,
    MixConfig,
    MixedSequences,
    action_bits,
    allocate_quotas,
    mix,
    mix_reference,
    next_targets,
    split_window,
    target_cutoffs,
)

FIELDS = MixedSequences._PADDED + ("length",)


def _assert_same(a: MixedSequences, b: MixedSequences) -> None:
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
        assert getattr(a, f).dtype == getattr(b, f).dtype, f


def _random_log(rng, num_users, num_events, num_scenarios, t_max):
    return EventLog.from_arrays(
        rng.integers(0, num_users, num_events), rng.integers(0, 30, num_events),
        rng.integers(0, num_scenarios, num_events), rng.integers(0, 8, num_events),
        rng.integers(0, t_max, num_events), rng.random(num_events).astype(np.float32),
        num_users=num_users, num_scenarios=num_scenarios, num_actions=3)


@st.composite
def _configs(draw, num_scenarios):
    last_n = draw(st.integers(1, 12))
    quotas = None
    if draw(st.booleans()):
        q = draw(st.lists(st.integers(0, last_n), min_size=num_scenarios,
                          max_size=num_scenarios))
        while sum(q) > last_n:
            q[int(np.argmax(q))] -= 1
        # some scenarios left out of the dict (quota 0)
        quotas = {f"s{s}": v for s, v in enumerate(q) if v or draw(st.booleans())}
    return MixConfig(policy=draw(st.sampled_from(POLICIES)), last_n=last_n, quotas=quotas,
                     redistribute=draw(st.booleans()),
                     gap_buckets=draw(st.sampled_from([(2, 5, 11, 40), (1,), (60, 3600)])),
                     utc_offset=draw(st.sampled_from([0, 3600, -7200])))


@settings(max_examples=120, deadline=None)
@given(data=st.data(), seed=st.integers(0, 10_000), num_users=st.integers(1, 6),
       num_events=st.integers(0, 80), num_scenarios=st.integers(1, 4),
       t_max=st.sampled_from([5, 40, 200_000]))
def test_mix_matches_reference(data, seed, num_users, num_events, num_scenarios, t_max):
    rng = np.random.default_rng(seed)
    log = _random_log(rng, num_users, num_events, num_scenarios, t_max)
    cfg = data.draw(_configs(num_scenarios))
    B = data.draw(st.integers(0, 9))
    users = rng.integers(0, num_users, B)  # repeats allowed
    # cutoffs at, between, before and after event times
    t_now = rng.integers(-1, t_max + 2, B)
    if num_events and B:
        hit = rng.random(B) < 0.5
        t_now[hit] = log.timestamp[rng.integers(0, num_events, int(hit.sum()))]
    got = mix(log, users, t_now, cfg)
    _assert_same(got, mix_reference(log, users, t_now, cfg))
    assert got.item.shape == (B, cfg.last_n)
    # every kept event is strictly before the cutoff, padding is padding
    valid = got.mask
    assert (got.timestamp[valid] < np.repeat(t_now, got.length)).all()
    assert (got.item[~valid] == PAD).all() and (got.actions[~valid] == 0).all()


@settings(max_examples=200, deadline=None)
@given(avail=st.lists(st.integers(0, 40), min_size=1, max_size=5), last_n=st.integers(1, 60),
       data=st.data())
def test_allocate_quotas_water_filling(avail, last_n, data):
    S = len(avail)
    q = np.array(data.draw(st.lists(st.integers(0, last_n), min_size=S, max_size=S)))
    while q.sum() > last_n:
        q[np.argmax(q)] -= 1
    a = np.array([avail])
    take = allocate_quotas(a, q, last_n)[0]
    assert (take >= np.minimum(a[0], q)).all() and (take <= a[0]).all()
    assert take.sum() == min(last_n, a[0].sum())
    # water-filling: a scenario got extra slots only if every scenario with events
    # left over got at least as many extra slots minus one
    extra = take - np.minimum(a[0], q)
    left = take < a[0]
    if left.any() and extra.any():
        assert extra.max() <= extra[left].min() + 1
    hard = allocate_quotas(a, q, last_n, redistribute=False)[0]
    np.testing.assert_array_equal(hard, np.minimum(a[0], q))


def test_quota_rule_documented_example():
    cfg = MixConfig(last_n=128)
    q = cfg.resolve_quotas(["homefeed", "search", "ads"])
    np.testing.assert_array_equal(q, [43, 43, 42])
    np.testing.assert_array_equal(allocate_quotas(np.array([[100, 2, 100]]), q, 128),
                                  [[64, 2, 62]])
    np.testing.assert_array_equal(allocate_quotas(np.array([[100, 2, 100], [0, 0, 0]]), q,
                                                  128, redistribute=False),
                                  [[43, 2, 42], [0, 0, 0]])
    with pytest.raises(ValueError, match="unknown scenarios"):
        MixConfig(quotas={"feed": 3}).resolve_quotas(["homefeed"])
    with pytest.raises(ValueError, match="more than last_n"):
        MixConfig(last_n=4, quotas={"a": 3, "b": 2})
    with pytest.raises(ValueError, match="unknown mixing policy"):
        MixConfig(policy="2D")
    with pytest.raises(ValueError, match="gap_buckets"):
        MixConfig(gap_buckets=(10, 5))


def _planted_log():
    """User 0: 200 recent homefeed events, 5 old ads events, no search events."""
    n_h, n_a = 200, 5
    scen = np.array([0] * n_h + [2] * n_a)
    ts = np.concatenate([10_000 + np.arange(n_h), np.arange(n_a)])
    return EventLog.from_arrays(np.zeros(n_h + n_a, np.int64), np.arange(n_h + n_a), scen,
                                np.ones(n_h + n_a, np.int64), ts,
                                scenario_names=["homefeed", "search", "ads"],
                                action_names=["is_click"])


def test_2d_keeps_rare_scenario_global_time_drops_it():
    log = _planted_log()
    u, t = np.array([0]), np.array([10**9])
    two_d = mix(log, u, t, MixConfig(policy="2d", last_n=128))
    glob = mix(log, u, t, MixConfig(policy="global_time", last_n=128))
    assert two_d.length[0] == glob.length[0] == 128
    counts_2d = np.bincount(two_d.scenario[0], minlength=3)
    counts_g = np.bincount(glob.scenario[0], minlength=3)
    np.testing.assert_array_equal(counts_2d, [123, 0, 5])   # search quota water-filled
    np.testing.assert_array_equal(counts_g, [128, 0, 0])
    # 2d: merged chronologically, so the old ads events come first
    assert (np.diff(two_d.timestamp[0]) >= 0).all()
    np.testing.assert_array_equal(two_d.scenario[0, :5], 2)
    # the homefeed events kept are the latest ones
    assert two_d.timestamp[0, 5] == 10_000 + 200 - 123


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), last_n=st.integers(3, 30))
def test_2d_keeps_min_quota_available_per_scenario(seed, last_n):
    rng = np.random.default_rng(seed)
    log = _random_log(rng, 3, 150, 3, 1000)
    t_now = rng.integers(0, 1100, 3)
    users = np.arange(3)
    cfg = MixConfig(policy="2d", last_n=last_n)
    seq = mix(log, users, t_now, cfg)
    q = cfg.resolve_quotas(log.scenario_names)
    for b in range(3):
        lo, hi = log.user_offsets[b], log.user_offsets[b + 1]
        before = log.timestamp[lo:hi] < t_now[b]
        avail = np.bincount(log.scenario[lo:hi][before], minlength=3)
        kept = np.bincount(seq.scenario[b, : seq.length[b]], minlength=3)
        assert (kept >= np.minimum(q, avail)).all()
        assert seq.length[b] == min(last_n, avail.sum())


def test_users_without_events_and_missing_scenarios():
    # user 1 has only scenario 0; users 0 and 2 have nothing
    log = EventLog.from_arrays([1, 1, 1], [5, 6, 7], [0, 0, 0], [0, 1, 0], [10, 20, 30],
                               num_users=3, num_scenarios=3, num_actions=1)
    for policy in POLICIES:
        seq = mix(log, np.array([0, 1, 2]), np.array([100, 100, 100]),
                  MixConfig(policy=policy, last_n=4))
        np.testing.assert_array_equal(seq.length, [0, 3, 0])
        np.testing.assert_array_equal(seq.item, [[-1] * 4, [5, 6, 7, -1], [-1] * 4])
        for f in ("scenario", "hour", "seq_pos", "gap_bucket", "timestamp"):
            assert (getattr(seq, f)[[0, 2]] == PAD).all()
        kjt = seq.to_kjt()
        assert kjt.lengths().tolist() == [0, 3, 0] * len(SEQ_FEATURES)


def test_out_of_order_input_is_sorted_stably():
    # rows in random time order, with ties: ties keep their original row order
    ts = np.array([50, 10, 30, 10, 50, 30, 10])
    log = EventLog.from_arrays(np.zeros(7, np.int64), np.arange(7), np.zeros(7, np.int64),
                               np.zeros(7, np.int64), ts, num_scenarios=1)
    np.testing.assert_array_equal(log.row, [1, 3, 6, 2, 5, 0, 4])
    np.testing.assert_array_equal(log.timestamp, [10, 10, 10, 30, 30, 50, 50])
    for policy in POLICIES:
        seq = mix(log, np.array([0]), np.array([51]), MixConfig(policy=policy, last_n=5))
        np.testing.assert_array_equal(seq.item[0], [6, 2, 5, 0, 4])  # the latest 5


def test_future_events_are_excluded():
    log = EventLog.from_arrays([0, 0, 0, 0], [1, 2, 3, 4], [0, 1, 0, 1], [0, 0, 0, 0],
                               [100, 200, 300, 400], num_scenarios=2)
    for policy in POLICIES:
        cfg = MixConfig(policy=policy, last_n=8)
        seq = mix(log, np.array([0, 0, 0, 0]), np.array([300, 301, 100, 0]), cfg)
        np.testing.assert_array_equal(seq.length, [2, 3, 0, 0])  # t == t_now excluded
        assert set(seq.item[0, :2]) == {1, 2} and set(seq.item[1, :3]) == {1, 2, 3}


def test_bad_input_errors_name_row_and_field():
    ok = dict(user=[0, 0, 1], item=[1, 2, 3], scenario=[0, 1, 0], actions=[1, 3, 1],
              timestamp=[5, 6, 7])
    EventLog.from_arrays(**ok, num_scenarios=2, num_actions=2)
    with pytest.raises(DataError, match=r"record 1, field 'actions'.*bit >= 1"):
        EventLog.from_arrays(**ok, num_scenarios=2, action_names=["is_click"])
    with pytest.raises(DataError, match=r"events.npz: record 2, field 'scenario'.*\[0, 2\)"):
        EventLog.from_arrays(**{**ok, "scenario": [0, 1, 2]}, num_scenarios=2,
                             source="events.npz")
    with pytest.raises(DataError, match=r"record 0, field 'scenario'"):
        EventLog.from_arrays(**{**ok, "scenario": [-1, 1, 0]}, num_scenarios=2)
    with pytest.raises(DataError, match=r"record 1, field 'timestamp'"):
        EventLog.from_arrays(**{**ok, "timestamp": [5, -6, 7]}, num_scenarios=2)
    with pytest.raises(DataError, match=r"record 2, field 'user_id'"):
        EventLog.from_arrays(**ok, num_scenarios=2, num_users=1)
    with pytest.raises(DataError, match=r"field 'duration'"):
        EventLog.from_arrays(**ok, duration=[1.0, np.nan, 0.0], num_scenarios=2)
    with pytest.raises(DataError, match=r"field 'item_id'.*has 2 values"):
        EventLog.from_arrays(**{**ok, "item": [1, 2]}, num_scenarios=2)
    # the row named is the caller's row id (e.g. a dataset row), not the sorted position
    with pytest.raises(DataError, match=r"record 70, field 'actions'"):
        EventLog.from_arrays(**{**ok, "actions": [1, 1, 8]}, num_scenarios=2, num_actions=3,
                             row=[90, 80, 70])
    log = EventLog.from_arrays(**ok, num_scenarios=2)
    with pytest.raises(ValueError, match=r"users\[1\] = 2 out of range"):
        mix(log, np.array([0, 2]), np.array([9, 9]), MixConfig())
    with pytest.raises(ValueError, match="must both be"):
        mix(log, np.array([0, 1]), np.array([9]), MixConfig())


def test_hour_gap_bucket_and_positions():
    day = 86400
    t_now = 10 * day
    ts = np.array([t_now - day, t_now - 60, t_now - 30, 9 * day + 5 * 3600 + 10])
    log = EventLog.from_arrays(np.zeros(4, np.int64), np.arange(4), [0, 1, 0, 1],
                               np.zeros(4, np.int64), ts, num_scenarios=2)
    seq = mix(log, np.array([0]), np.array([t_now]), MixConfig(last_n=6))
    np.testing.assert_array_equal(seq.item[0, :4], [0, 3, 1, 2])   # chronological
    # gap edges 60 * 2**k: 86400 s in [61440, 122880) -> 11; 60 s -> 1; 30 s -> 0
    np.testing.assert_array_equal(seq.gap_bucket[0, :4], [11, 11, 1, 0])
    np.testing.assert_array_equal(seq.hour[0, :4], [0, 5, 23, 23])
    np.testing.assert_array_equal(seq.seq_pos[0], [0, 1, 2, 3, -1, -1])
    assert MixConfig().num_gap_buckets == 21
    shifted = mix(log, np.array([0]), np.array([t_now]), MixConfig(last_n=6, utc_offset=3600))
    np.testing.assert_array_equal(shifted.hour[0, :4], [1, 6, 0, 0])


def test_policies_share_events_and_differ_in_order_and_positions():
    rng = np.random.default_rng(3)
    log = _random_log(rng, 4, 300, 3, 10_000)
    users, t_now = np.arange(4), np.full(4, 8_000)
    out = {p: mix(log, users, t_now, MixConfig(policy=p, last_n=24)) for p in POLICIES}
    base = out["2d"]
    assert (np.diff(np.where(base.mask, base.timestamp, 10**9), axis=1) >= 0).all()
    for p in ("1d_position", "1d_time", "concat"):
        np.testing.assert_array_equal(out[p].length, base.length)
        for b in range(4):
            n = base.length[b]
            assert sorted(out[p].item[b, :n]) == sorted(base.item[b, :n])
    for p in ("1d_position", "1d_time"):
        np.testing.assert_array_equal(out[p].item, base.item)
    m = base.mask
    assert (out["1d_position"].gap_bucket[m] == 0).all()
    np.testing.assert_array_equal(out["1d_position"].seq_pos, base.seq_pos)
    assert (out["1d_time"].seq_pos[m] == 0).all()
    np.testing.assert_array_equal(out["1d_time"].gap_bucket, base.gap_bucket)
    assert len(np.unique(base.gap_bucket[m])) > 3
    cat = out["concat"]
    for b in range(4):
        n = cat.length[b]
        s, t = cat.scenario[b, :n], cat.timestamp[b, :n]
        assert (np.diff(s) >= 0).all()                        # blocks in scenario order
        assert all((np.diff(t[s == k]) >= 0).all() for k in range(3))
    assert not np.array_equal(cat.item, base.item)


def test_split_window():
    rng = np.random.default_rng(5)
    log = _random_log(rng, 5, 200, 3, 1_000_000)
    seq = mix(log, np.arange(5), np.array([10**6, 10**6, 300_000, 0, 60_000]),
              MixConfig(last_n=20))
    assert seq.length.tolist()[3] == 0 and seq.length.min() < 4 < seq.length.max()
    inputs, targets = split_window(seq, w=4, min_input=2)
    assert targets.shape == (5, 4)
    for b in range(5):
        L = seq.length[b]
        n_t = int(np.clip(L - 2, 0, 4))
        assert inputs.length[b] == L - n_t
        np.testing.assert_array_equal(targets[b, :n_t], seq.item[b, L - n_t:L])
        assert (targets[b, n_t:] == PAD).all()
        np.testing.assert_array_equal(inputs.item[b, : L - n_t], seq.item[b, : L - n_t])
        assert (inputs.item[b, L - n_t:] == PAD).all()
        if n_t:
            t_ref = seq.timestamp[b, L - n_t]
            assert inputs.t_now[b] == t_ref
            np.testing.assert_array_equal(
                inputs.gap_bucket[b, : L - n_t],
                np.searchsorted(seq.gap_edges, t_ref - seq.timestamp[b, : L - n_t], "right"))
        else:
            assert inputs.t_now[b] == seq.t_now[b]
            np.testing.assert_array_equal(inputs.gap_bucket[b], seq.gap_bucket[b])
    # rebasing equals mixing at the first target's time when the quota does not bind
    # (global_time takes the last N: the inputs are then exactly the last N - W)
    g = mix(log, np.array([0]), np.array([10**6]), MixConfig(policy="global_time", last_n=20))
    gi, _ = split_window(g, w=5)
    again = mix(log, np.array([0]), gi.t_now, MixConfig(policy="global_time", last_n=20))
    n = gi.length[0]
    np.testing.assert_array_equal(gi.gap_bucket[0, :n], again.gap_bucket[0, again.length[0] - n:
                                                                          again.length[0]])
    same, none = split_window(seq, w=0)
    assert none.shape == (5, 0)
    _assert_same(same, seq)
    with pytest.raises(ValueError):
        split_window(seq, w=-1)


def test_to_kjt_matches_padded_arrays():
    rng = np.random.default_rng(9)
    log = _random_log(rng, 4, 60, 2, 500)
    seq = mix(log, np.array([0, 1, 2, 3, 0]), np.array([600, 300, 0, 600, 100]),
              MixConfig(last_n=7))
    kjt = seq.to_kjt()
    assert kjt.keys() == list(SEQ_FEATURES) and kjt.stride() == 5
    d = kjt.to_dict()
    for key, arr in zip(SEQ_FEATURES, (seq.item, seq.scenario, seq.actions, seq.hour,
                                       seq.seq_pos, seq.gap_bucket)):
        jt = d[key]
        assert jt.lengths().tolist() == seq.length.tolist()
        for b, v in enumerate(jt.to_dense()):
            assert v.tolist() == arr[b, : seq.length[b]].tolist()
    sub = seq.to_kjt([SEQ_FEATURES[0]])
    assert sub.keys() == [SEQ_FEATURES[0]]
    with pytest.raises(KeyError):
        seq.to_kjt(["nope"])
    mh = seq.actions_multi_hot(3)
    np.testing.assert_array_equal((mh * (2 ** np.arange(3))).sum(-1).astype(np.int64)[seq.mask],
                                  seq.actions[seq.mask])


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("redrec") / "ds")
    generate(SynthConfig(num_users=60, num_items=150, num_interactions=3000, num_topics=4,
                         seed=1), out)
    make_split(out, cold_item_frac=0.1, test_time_frac=0.2, seed=0)
    return out


def test_held_out_users_are_not_trained_on_and_are_evaluated(tiny_dataset, tmp_path):
    """A split with held-out users (the paper's evaluation users are not training
    users): their events are absent from the training log, and the §4.3 cases of the
    ``test`` events are exactly theirs, with cutoffs anywhere in their timeline."""
    from torchrec_mm.redrec.protocol import ProtocolConfig, make_eval_cases
    from torchrec_mm.redrec.train import EVAL_SPLITS

    data = str(tmp_path / "ds")
    shutil.copytree(tiny_dataset, data)
    split = make_split(data, cold_item_frac=0.0, test_time_frac=0.0, seed=3,
                       test_user_frac=0.25)
    held = split.test_users
    assert len(held) == 15
    log = EventLog.from_dataset(data)
    np.testing.assert_array_equal(log.user, np.repeat(np.arange(60), np.diff(log.user_offsets)))
    train = EventLog.from_dataset(data, split_filter="train")
    assert (np.diff(train.user_offsets)[held] == 0).all()
    assert train.num_events == log.num_events - int(np.isin(log.user, held).sum())
    part = split.assign(log.item, log.timestamp, log.user)
    rows = np.isin(part, np.array(EVAL_SPLITS["test"], dtype=part.dtype))
    cases = make_eval_cases(log.user_offsets, log.item, log.timestamp, 150,
                            ProtocolConfig(min_history=5, seed=0), target_rows=rows)
    np.testing.assert_array_equal(cases.users.numpy(), held)
    # cutoffs spread over the users' timelines, not only their last events
    pos = cases.cutoff_index.numpy() - log.user_offsets[held]
    assert (pos < np.diff(log.user_offsets)[held] - 3).any()


def test_from_dataset_and_split_filter(tiny_dataset):
    cols = load_interaction_columns(tiny_dataset)
    log = EventLog.from_dataset(tiny_dataset)
    assert log.num_events == len(cols["user_id"]) and log.num_users == 60
    assert log.scenario_names == ["homefeed", "search", "ads"]
    assert log.action_names[0] == "is_click"
    # rows point back into the dataset and the CSR groups by user in time order
    np.testing.assert_array_equal(log.item, cols["item_id"][log.row])
    np.testing.assert_array_equal(log.duration, cols["duration"][log.row])
    user_of = np.repeat(np.arange(60), np.diff(log.user_offsets))
    np.testing.assert_array_equal(user_of, cols["user_id"][log.row])
    assert ((np.diff(log.timestamp) >= 0) | (np.diff(user_of) > 0)).all()

    part = load_split(tiny_dataset).assign(cols["item_id"], cols["timestamp"])
    train = EventLog.from_dataset(tiny_dataset, split_filter="train")
    np.testing.assert_array_equal(np.sort(train.row), np.flatnonzero(part == 0))
    test = EventLog.from_dataset(tiny_dataset, split_filter=["test_warm", "test_cold"])
    assert test.num_events == int((part > 0).sum()) > 0
    with pytest.raises(ValueError, match="unknown split"):
        EventLog.from_dataset(tiny_dataset, split_filter="valid")
    users = np.arange(60)
    t_now = np.full(60, int(cols["timestamp"].max()) + 1)
    _assert_same(mix(train, users, t_now, MixConfig(last_n=32)),
                 mix_reference(train, users, t_now, MixConfig(last_n=32)))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), w=st.integers(0, 6), min_input=st.integers(0, 3))
def test_split_window_eligible_targets(seed, w, min_input):
    """With ``eligible``, the window leaves the input exactly as without it, and the
    targets are the window's eligible events, in order, left-aligned."""
    rng = np.random.default_rng(seed)
    log = _random_log(rng, 6, 120, 3, 1_000_000)
    seq = mix(log, np.arange(6), rng.integers(0, 10**6, 6), MixConfig(last_n=12))
    eligible = rng.random(seq.item.shape) < 0.4
    inputs, targets = split_window(seq, w, min_input, eligible=eligible)
    plain_inputs, _ = split_window(seq, w, min_input)
    _assert_same(inputs, plain_inputs)
    assert targets.shape == (6, w)
    for b in range(6):
        L = int(seq.length[b])
        n_t = int(np.clip(L - min_input, 0, w))
        want = [int(seq.item[b, c]) for c in range(L - n_t, L) if eligible[b, c]]
        assert targets[b, :len(want)].tolist() == want
        assert (targets[b, len(want):] == PAD).all()
    with pytest.raises(ValueError, match="eligible"):
        split_window(seq, w, min_input, eligible=eligible[:, :3])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), w=st.integers(1, 5), min_history=st.integers(0, 4),
       t_max=st.sampled_from([20, 10**6]))
def test_target_cutoffs_and_next_targets_match_a_per_row_reference(seed, w, min_history,
                                                                     t_max):
    """``cutoffs="targets"``: the cutoff rows are the eligible events with at least
    ``min_history`` of their user's events strictly earlier (ties in time count as
    later, t_max 20 makes many), and a window holds the user's next ``w`` eligible
    events at or after the cutoff time, whatever lies between them."""
    rng = np.random.default_rng(seed)
    log = _random_log(rng, 7, 90, 3, t_max)
    eligible = rng.random(log.num_events) < 0.3
    want_rows = []
    for u in range(log.num_users):
        lo, hi = log.user_offsets[u], log.user_offsets[u + 1]
        for r in range(lo, hi):
            if eligible[r] and (log.timestamp[lo:hi] < log.timestamp[r]).sum() >= min_history:
                want_rows.append(r)
    rows = target_cutoffs(log, eligible, min_history)
    assert rows.tolist() == want_rows and rows.dtype == np.int64

    users = rng.integers(0, log.num_users, 12)
    t_now = rng.integers(0, t_max + 2, 12)
    got = next_targets(log, users, t_now, w, np.flatnonzero(eligible))
    assert got.shape == (12, w) and got.dtype == np.int64
    for b, (u, t) in enumerate(zip(users, t_now)):
        lo, hi = log.user_offsets[u], log.user_offsets[u + 1]
        want = [int(log.item[r]) for r in range(lo, hi)
                if eligible[r] and log.timestamp[r] >= t][:w]
        assert got[b, :len(want)].tolist() == want
        assert (got[b, len(want):] == PAD).all()
    assert (next_targets(log, users, t_now, w, np.zeros(0, np.int64)) == PAD).all()
    with pytest.raises(ValueError, match="eligible"):
        target_cutoffs(log, eligible[:-1])
    with pytest.raises(ValueError, match="w must be >= 1"):
        next_targets(log, users, t_now, 0, np.flatnonzero(eligible))


def test_action_mask_and_bits():
    log = EventLog.from_arrays(np.zeros(4, np.int64), np.arange(4), np.zeros(4, np.int64),
                               np.array([0, 1, 2, 3]), np.arange(4), num_scenarios=1,
                               action_names=["is_click", "is_like"])
    assert action_bits(log.action_names, ["is_like"]) == 2
    assert log.action_mask(["is_click"]).tolist() == [False, True, False, True]
    assert log.action_mask(["is_click", "is_like"]).tolist() == [False, True, True, True]
    with pytest.raises(ValueError, match=r"data/x: unknown action\(s\) \['click'\]; its "
                                         r"actions are \['is_click', 'is_like'\]"):
        log.action_mask(["click"], "data/x")
    with pytest.raises(ValueError, match="no action names"):
        log.action_mask([])
