import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from torchrec_mm.data.batching import (
    HISTORY_FEATURE,
    SPLIT_TRAIN,
    FeatureLayout,
    RankingBatchDataset,
    RankingSamples,
)
from torchrec_mm.testing import random_samples


def _samples(n, users, items, hist_len, seed):
    rng = np.random.default_rng(seed)
    cols = {
        "user_id": rng.integers(0, users, n),
        "item_id": rng.integers(0, items, n),
        "scenario": rng.integers(0, 3, n),
        "timestamp": rng.integers(0, 50, n),  # many ties
        "label": (rng.random(n) < 0.5).astype(np.int8),
    }
    split = rng.integers(0, 3, n).astype(np.int8)
    layout = FeatureLayout(num_users=users, num_items=items, num_scenarios=3,
                           user_attrs={"attr_a": 4}, history_length=hist_len)
    return RankingSamples(cols, split, {"attr_a": rng.integers(0, 4, users)}, layout)


def _reference_history(s: RankingSamples, row: int, stream: str):
    """Per-row reference: earlier rows of the same user (in the index's sorted order)
    that are positive and visible, latest first, truncated."""
    out = []
    r = row - 1
    while r >= 0 and s.user[r] == s.user[row]:
        visible = s.label[r] > 0 and (stream == "all" or s.split[r] == SPLIT_TRAIN)
        if visible:
            out.append(int(s.item[r]))
        r -= 1
    return out[: s.layout.history_length]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 120), users=st.integers(1, 6), hist_len=st.integers(1, 7),
       seed=st.integers(0, 10_000), stream=st.sampled_from(["train", "all"]))
def test_history_matches_reference(n, users, hist_len, seed, stream):
    s = _samples(n, users, 20, hist_len, seed)
    rows = np.arange(len(s))
    lengths, values = s.history(rows, stream)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for r in rows:
        got = values[offsets[r]:offsets[r + 1]].tolist()
        assert got == _reference_history(s, r, stream)


def test_index_is_sorted_by_user_then_time():
    s = _samples(500, 7, 30, 5, 0)
    key = s.user * 10_000 + s.timestamp
    assert np.all(np.diff(key) >= 0)


def test_batch_structure():
    s = random_samples(num_interactions=3000, history_length=8, seed=2)
    rows = s.rows("train")[:64]
    b = s.make_batch(rows)
    kjt = b.sparse_features
    assert kjt.keys() == s.layout.sparse_keys
    lengths = kjt.length_per_key()
    for key, n in zip(kjt.keys(), lengths):
        if key != HISTORY_FEATURE:
            assert n == 64
    hist = kjt[HISTORY_FEATURE].lengths()
    assert int(hist.max()) <= 8 and int(hist.min()) >= 0
    assert torch.equal(kjt["item_id"].values(), torch.from_numpy(s.item[rows]))
    assert torch.equal(b.item_ids, torch.from_numpy(s.item[rows]))
    assert b.dense_features.shape == (64, s.layout.num_dense)
    assert torch.all(b.dense_features[:, 0] >= 0) and torch.all(b.dense_features[:, 0] <= 1)
    assert set(b.labels.unique().tolist()) <= {0.0, 1.0}


def test_train_history_hides_test_and_cold_items():
    s = random_samples(num_interactions=5000, history_length=50, seed=3)
    cold_items = set(s.item[s.split == 2].tolist())
    rows = s.rows("train")
    _, values = s.history(rows, "train")
    assert cold_items.isdisjoint(set(values.tolist()))


def test_ranks_partition_batches_and_resume():
    s = random_samples(num_interactions=4000, seed=4)
    world, B = 2, 50
    per_rank = [RankingBatchDataset(s, "train", B, seed=1, rank=r, world_size=world).batches()
                for r in range(world)]
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    seen = np.concatenate([b for batches in per_rank for b in batches])
    assert len(seen) == len(np.unique(seen))
    assert set(seen.tolist()) <= set(s.rows("train").tolist())
    ds = RankingBatchDataset(s, "train", B, seed=1)
    full = [b.item_ids for b in ds]
    ds.set_epoch(0, start_batch=3)
    resumed = [b.item_ids for b in ds]
    assert len(resumed) == len(full) - 3
    assert all(torch.equal(a, b) for a, b in zip(full[3:], resumed))
    ds.set_epoch(1)
    assert not torch.equal(next(iter(ds)).item_ids, full[0])  # reshuffled per epoch


def test_dataloader_workers_keep_order():
    s = random_samples(num_interactions=3000, seed=5)
    ds = RankingBatchDataset(s, "train", 64, seed=0)
    plain = [b.item_ids for b in DataLoader(ds, batch_size=None, num_workers=0)]
    workers = [b.item_ids for b in DataLoader(ds, batch_size=None, num_workers=2)]
    assert len(plain) == len(workers)
    assert all(torch.equal(a, b) for a, b in zip(plain, workers))


def test_no_history_gives_finite_features():
    """history_length 0 (no history feature values): the history-fill dense feature is
    0, not 0/0."""
    s = _samples(50, 4, 10, 0, 1)
    batch = s.make_batch(np.arange(20))
    assert torch.isfinite(batch.dense_features).all()
    assert (batch.dense_features[:, 0] == 0).all()
    assert int(batch.sparse_features["hist_item_id"].lengths().sum()) == 0
