import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrec_mm.data.io import DatasetWriter, load_interaction_columns
from torchrec_mm.data.schema import DataError
from torchrec_mm.data.split import (
    TEST_COLD,
    TEST_WARM,
    TRAIN,
    compute_split,
    load_split,
    make_split,
)


@st.composite
def interactions(draw):
    num_items = draw(st.integers(1, 40))
    n = draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    # skewed popularity and coarse timestamps (many ties)
    item = np.minimum(rng.zipf(1.5, n) - 1, num_items - 1)
    ts = rng.integers(0, draw(st.integers(1, 50)), n) * 1000
    return num_items, item, ts


@settings(max_examples=150, deadline=None)
@given(interactions(), st.floats(0, 0.9), st.floats(0, 0.9), st.integers(0, 5))
def test_split_properties(data, cold_frac, time_frac, seed):
    num_items, item, ts = data
    split = compute_split(item, ts, num_items, cold_frac, time_frac, seed)
    part = split.assign(item, ts)
    assert part.dtype == np.int8 and part.shape == item.shape
    assert set(np.unique(part)) <= {TRAIN, TEST_WARM, TEST_COLD}
    active = np.unique(item)
    # cold items are items with interactions; all their interactions are test_cold,
    # so no cold item is seen in training
    assert np.isin(split.cold_items, active).all()
    is_cold = np.isin(item, split.cold_items)
    assert (part[is_cold] == TEST_COLD).all() and (part[~is_cold] != TEST_COLD).all()
    # at least one warm item remains; the cold count follows the fraction
    assert len(split.cold_items) < len(active) or len(active) == 0
    if len(active) > 1:
        expected = min(max(round(cold_frac * len(active)), 1 if cold_frac > 0 else 0),
                       len(active) - 1)
        assert len(split.cold_items) == expected
    # time ordering: every train interaction precedes every test_warm one
    train, warm = ts[part == TRAIN], ts[part == TEST_WARM]
    if len(train) and len(warm):
        assert train.max() < split.time_cut <= warm.min()
    n_warm_items = int((~is_cold).sum())
    if time_frac == 0:
        assert len(warm) == 0
    else:
        assert len(warm) >= time_frac * n_warm_items - 1e-9  # ties go to the test side
        assert len(train) <= np.floor((1 - time_frac) * n_warm_items)
    # deterministic
    again = compute_split(item, ts, num_items, cold_frac, time_frac, seed)
    np.testing.assert_array_equal(again.cold_items, split.cold_items)
    assert again.time_cut == split.time_cut
    assert sum(split.info["counts"].values()) == len(item)


@settings(max_examples=100, deadline=None)
@given(interactions(), st.floats(0, 0.9), st.floats(0, 0.9), st.floats(0.01, 0.9),
       st.integers(0, 5), st.integers(1, 30))
def test_held_out_users(data, cold_frac, time_frac, user_frac, seed, num_users):
    num_items, item, ts = data
    user = np.random.default_rng(seed).integers(0, num_users, item.shape[0])
    split = compute_split(item, ts, num_items, cold_frac, time_frac, seed, user_frac, user)
    part = split.assign(item, ts, user)
    users = np.unique(user)
    held = np.isin(user, split.test_users)
    # a fraction of the users with interactions, at least one user left for training
    assert np.isin(split.test_users, users).all()
    if len(users) > 1:
        assert len(split.test_users) == min(max(round(user_frac * len(users)), 1),
                                            len(users) - 1)
    else:
        assert len(split.test_users) == 0
    # nothing of a held-out user is trained on; cold items stay test_cold
    is_cold = np.isin(item, split.cold_items)
    assert (part[held & ~is_cold] == TEST_WARM).all()
    assert (part[is_cold] == TEST_COLD).all()
    assert not (part[held] == TRAIN).any()
    # the cold items do not depend on held-out users (independent seed streams)
    plain = compute_split(item, ts, num_items, cold_frac, time_frac, seed)
    np.testing.assert_array_equal(plain.cold_items, split.cold_items)
    # the time cut is over the training users only
    train, late = ts[part == TRAIN], ts[(part == TEST_WARM) & ~held]
    if len(train) and len(late):
        assert train.max() < split.time_cut <= late.min()
    assert sum(split.info["counts"].values()) == len(item)
    if len(split.test_users):
        with pytest.raises(ValueError, match="user_id"):
            split.assign(item, ts)


def test_held_out_users_need_user_ids():
    with pytest.raises(ValueError, match="user_id"):
        compute_split(np.array([0, 1]), np.array([0, 1]), 2, test_user_frac=0.5)
    with pytest.raises(ValueError, match="test_user_frac"):
        compute_split(np.array([0, 1]), np.array([0, 1]), 2, test_user_frac=1.0,
                      user_id=np.array([0, 1]))


def test_cold_items_are_stratified_over_popularity():
    # item k has k + 1 interactions (distinct popularity); 300 active items, 30 cold
    num_items = 310
    item = np.repeat(np.arange(300), np.arange(300) + 1)
    rng = np.random.default_rng(0)
    ts = rng.integers(0, 10**6, len(item))
    for seed in range(5):
        split = compute_split(item, ts, num_items, cold_item_frac=0.1, seed=seed)
        assert len(split.cold_items) == 30
        # exactly 3 cold items in every popularity decile (a uniform draw would not be)
        np.testing.assert_array_equal(np.bincount(split.cold_items // 30, minlength=10),
                                      np.full(10, 3))
    draws = {tuple(compute_split(item, ts, num_items, 0.1, seed=s).cold_items) for s in range(5)}
    assert len(draws) == 5  # the seed matters


def _dataset(tmp_path, n=2000):
    rng = np.random.default_rng(5)
    out = str(tmp_path / "ds")
    with DatasetWriter(out, "t", ["homefeed"], ["is_click"]) as w:
        w.add_interactions({"user_id": rng.integers(0, 50, n), "item_id": rng.integers(0, 80, n),
                            "scenario": "homefeed", "timestamp": rng.integers(0, 10**6, n),
                            "label": rng.integers(0, 2, n)})
    return out


def test_make_and_load_split(tmp_path):
    out = _dataset(tmp_path)
    split = make_split(out, cold_item_frac=0.2, test_time_frac=0.25, seed=1)
    assert sorted(os.listdir(out)) == ["interactions", "items.parquet", "meta.json",
                                       "split.json", "users.parquet"]  # no temp file left
    loaded = load_split(out)
    np.testing.assert_array_equal(loaded.cold_items, split.cold_items)
    assert loaded.time_cut == split.time_cut and loaded.num_items == 80
    c = load_interaction_columns(out, ["item_id", "timestamp"])
    part = loaded.assign(c["item_id"], c["timestamp"])
    counts = np.bincount(part, minlength=3)
    assert loaded.info["counts"] == {"train": counts[0], "test_warm": counts[1],
                                     "test_cold": counts[2]}
    assert counts[1] == pytest.approx(0.25 * (counts[0] + counts[1]), abs=2)
    with pytest.raises(ValueError, match="item ids"):
        loaded.assign(np.array([80]), np.array([0]))
    assert loaded.test_users.size == 0 and loaded.info["test_user_frac"] == 0.0


def test_make_and_load_split_with_held_out_users(tmp_path):
    out = _dataset(tmp_path)
    split = make_split(out, cold_item_frac=0.1, test_time_frac=0.0, seed=2, test_user_frac=0.2)
    loaded = load_split(out)
    assert len(loaded.test_users) == 10  # 20% of 50 users
    np.testing.assert_array_equal(loaded.test_users, split.test_users)
    c = load_interaction_columns(out, ["user_id", "item_id", "timestamp"])
    part = loaded.assign(c["item_id"], c["timestamp"], c["user_id"])
    held = np.isin(c["user_id"], loaded.test_users)
    assert (part[~held] != TEST_WARM).all()  # test_time_frac 0: only held-out users test
    assert (part[held] != TRAIN).all()
    counts = np.bincount(part, minlength=3)
    assert loaded.info["counts"] == dict(zip(["train", "test_warm", "test_cold"], counts))
    path = os.path.join(out, "split.json")
    raw = json.load(open(path))
    raw["test_users"] = [1, -2]
    json.dump(raw, open(path, "w"))
    with pytest.raises(DataError) as e:
        load_split(out)
    assert e.value.field == "test_users"


def test_load_split_errors(tmp_path):
    out = _dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="data split"):
        load_split(out)
    make_split(out)
    path = os.path.join(out, "split.json")
    raw = json.load(open(path))
    raw["num_items"] = 81
    json.dump(raw, open(path, "w"))
    with pytest.raises(DataError, match="different version"):
        load_split(out)
    raw["num_items"] = 80
    raw["cold_items"] = [3, "x"]
    json.dump(raw, open(path, "w"))
    with pytest.raises(DataError) as e:
        load_split(out)
    assert e.value.field == "cold_items"
