"""Tests of catalogue retrieval: the vectorised merge against a per-user loop, per-interest
search + merge equal to exhaustive max-over-interests scoring with an exact index, and
the approximate indexes' knobs (IVF nprobe, HNSW) measured by recall."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrec_mm.redrec.index import (
    IndexConfig,
    ItemIndex,
    exact_scores,
    merge_interest_results,
    recall_at_n,
)


def _merge_reference(scores, ids, n):
    out_s, out_i = [], []
    for srow, irow in zip(scores, ids):
        best = {}
        for j, (s, i) in enumerate(zip(srow, irow)):
            if i < 0:
                continue
            if i not in best or s > best[i][0]:
                best[i] = (s, j)
        ranked = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[1][1]))[:n]
        out_i.append([i for i, _ in ranked] + [-1] * (n - len(ranked)))
        out_s.append([v[0] for _, v in ranked] + [-np.inf] * (n - len(ranked)))
    return np.array(out_s, np.float32), np.array(out_i, np.int64)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_merge_matches_a_per_user_loop(data):
    U = data.draw(st.integers(1, 5))
    M = data.draw(st.integers(1, 12))
    n = data.draw(st.integers(1, 8))
    ids = np.array(data.draw(st.lists(st.integers(-1, 6), min_size=U * M, max_size=U * M)),
                   np.int64).reshape(U, M)
    # few distinct values: ties are common
    scores = np.array(data.draw(st.lists(st.sampled_from([0.1, 0.5, 0.5, 0.9, -0.3]),
                                         min_size=U * M, max_size=U * M)),
                      np.float32).reshape(U, M)
    got_s, got_i = merge_interest_results(scores, ids, n)
    want_s, want_i = _merge_reference(scores, ids, n)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_s, want_s)


@pytest.fixture(scope="module")
def catalogue():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, 16))
    items = (centres[rng.integers(0, 20, 2000)] + 0.5 * rng.standard_normal((2000, 16)))
    interests = items[rng.integers(0, 2000, (30, 4))] + 0.3 * rng.standard_normal((30, 4, 16))
    return items.astype(np.float32), interests.astype(np.float32)


def test_exact_index_merge_equals_exhaustive_scoring(catalogue):
    items, interests = catalogue
    ids = np.arange(2000, dtype=np.int64) * 7 + 3              # arbitrary item ids
    index = ItemIndex(items, IndexConfig(factory="Flat"), item_ids=ids)
    s, got = index.retrieve(interests, n=25, batch_size=7)     # several batches
    full = exact_scores(items, interests)                       # [U, N]
    top = full.topk(25, dim=1)
    np.testing.assert_array_equal(got, ids[top.indices.numpy()])
    np.testing.assert_allclose(s, top.values.numpy(), rtol=1e-5, atol=1e-5)
    assert recall_at_n(got, ids[top.indices.numpy()]) == 1.0


def test_item_bias_index_scores_scale_cos_plus_bias(catalogue):
    """With an item bias the per-interest search + merge returns the top items by
    ``scale * max_k cos + b`` (a bias that moves the ranking: the plain cosine top
    differs); bad bias / scale input raises."""
    items, interests = catalogue
    bias = np.random.default_rng(1).normal(0, 2, 2000).astype(np.float32)
    index = ItemIndex(items, IndexConfig(factory="Flat"), item_bias=bias, query_scale=8.0)
    s, got = index.retrieve(interests, n=25, batch_size=7)
    full = exact_scores(items, interests) * 8.0 + torch.from_numpy(bias)
    top = full.topk(25, dim=1)
    np.testing.assert_array_equal(got, top.indices.numpy())
    np.testing.assert_allclose(s, top.values.numpy(), rtol=1e-4, atol=1e-4)
    plain = exact_scores(items, interests).topk(25, dim=1).indices.numpy()
    assert recall_at_n(got, plain) < 0.9
    with pytest.raises(ValueError, match="item_bias: expected"):
        ItemIndex(items, item_bias=bias[:10])
    with pytest.raises(ValueError, match="query_scale: must be finite and > 0"):
        ItemIndex(items, item_bias=bias, query_scale=0.0)
    with pytest.raises(ValueError, match="queries have dim 15, the index 16"):
        index.search(items[:2, :15], 3)


def test_ivf_nprobe(catalogue):
    items, interests = catalogue
    _, exact = ItemIndex(items).retrieve(interests, n=50)
    recall = {p: recall_at_n(ItemIndex(items, IndexConfig(factory="IVF16,Flat", nprobe=p))
                             .retrieve(interests, n=50)[1], exact) for p in (1, 16)}
    assert recall[1] < recall[16] == 1.0                        # all 16 lists: exact


def test_hnsw_ef_search(catalogue):
    import faiss

    items, interests = catalogue
    _, exact = ItemIndex(items).retrieve(interests, n=50)
    index = ItemIndex(items, IndexConfig(factory="HNSW16", ef_search=20))
    _, got = index.retrieve(interests, n=50)
    assert faiss.downcast_index(index.index).hnsw.efSearch == 50   # raised to k
    assert recall_at_n(got, exact) > 0.95
    index.search(interests[:, 0], 10)
    assert faiss.downcast_index(index.index).hnsw.efSearch == 20


def test_small_catalogue_pads_and_bad_input():
    items = np.eye(4, dtype=np.float32)
    s, ids = ItemIndex(items).retrieve(torch.eye(4)[:2], n=6)
    assert ids.shape == (2, 6) and (ids[:, 4:] == -1).all() and np.isinf(s[:, 4:]).all()
    assert ids[0, 0] == 0 and ids[1, 0] == 1
    with pytest.raises(ValueError, match="row 1 has NaN"):
        ItemIndex(np.array([[1.0, 0.0], [np.nan, 1.0]]))
    with pytest.raises(ValueError, match="faiss cannot build"):
        ItemIndex(items, IndexConfig(factory="NoSuchIndex"))
    with pytest.raises(ValueError, match="dim"):
        ItemIndex(items).search(np.ones((1, 3)), 2)
