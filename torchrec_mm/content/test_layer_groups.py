import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrec_mm.content.layer_groups import (brute_force_contiguous, contiguous_kmeans,
                                              default_layer_groups, group_layers,
                                              kmeans_layer_labels, layer_similarity,
                                              partition_cost)


def _assert_valid(groups, num_layers, k):
    assert len(groups) == min(k, num_layers)
    assert [i for g in groups for i in g] == list(range(num_layers))  # ordered, covering
    for g in groups:
        assert g and g == list(range(g[0], g[-1] + 1))  # contiguous, non-empty


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), num_layers=st.integers(1, 9), k=st.integers(1, 4),
       dim=st.integers(1, 6))
def test_contiguous_kmeans_is_optimal_and_valid(seed, num_layers, k, dim):
    x = np.random.default_rng(seed).normal(size=(num_layers, dim))
    gram = x @ x.T
    groups = contiguous_kmeans(gram, k)
    _assert_valid(groups, num_layers, k)
    best_cost, _ = brute_force_contiguous(gram, k)
    # equal to the best contiguous partition, found by enumeration
    assert partition_cost(gram, groups) == pytest.approx(best_cost, rel=1e-9, abs=1e-9)
    # partition_cost is the k-means objective: check against explicit centroids
    explicit = sum(((x[g] - x[g].mean(0)) ** 2).sum() for g in groups)
    assert partition_cost(gram, groups) == pytest.approx(explicit, rel=1e-9, abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(2, 12), num_layers=st.integers(1, 10),
       k=st.integers(1, 4))
def test_group_layers_random_states_valid_and_deterministic(seed, n, num_layers, k):
    states = torch.from_numpy(np.random.default_rng(seed).normal(size=(n, num_layers, 5)))
    groups = group_layers(states, k, seed=seed, max_items=6)
    _assert_valid(groups, num_layers, k)
    assert group_layers(states, k, seed=seed, max_items=6) == groups


def _planted_states(sizes, n=40, d=24, seed=0):
    """Layers of block b share the item geometry Z_b, up to a random rotation, a random
    scale spanning 5 orders of magnitude, and a little noise."""
    rng = np.random.default_rng(seed)
    layers = []
    for size in sizes:
        z = rng.normal(size=(n, d))
        for _ in range(size):
            q, _ = np.linalg.qr(rng.normal(size=(d, d)))
            scale = 10.0 ** rng.uniform(-2, 3)
            layers.append(scale * (z @ q + 0.05 * rng.normal(size=(n, d))) + rng.normal(size=d))
    return torch.from_numpy(np.stack(layers, 1))  # [N, L, D]


@pytest.mark.parametrize("sizes", [(3, 5, 4), (1, 6, 2), (4, 4, 4, 4)])
def test_recovers_planted_blocks(sizes):
    states = _planted_states(sizes)
    groups = group_layers(states, num_groups=len(sizes))
    bounds = np.cumsum((0,) + sizes)
    assert groups == [list(range(bounds[i], bounds[i + 1])) for i in range(len(sizes))]
    sim = layer_similarity(states).numpy()
    assert np.allclose(np.diag(sim), 1.0)
    # plain Lloyd k-means on the same geometry agrees here (constraint not binding)
    labels = kmeans_layer_labels(sim, len(sizes), seed=0)
    assert labels == [b for b, s in enumerate(sizes) for _ in range(s)]


def test_default_groups_and_errors():
    assert default_layer_groups(6, 3, first=1) == [[1, 2], [3, 4], [5, 6]]
    assert default_layer_groups(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert default_layer_groups(2, 3) == [[0], [1]]
    with pytest.raises(ValueError):
        group_layers(torch.zeros(1, 4, 3), 3)
    with pytest.raises(ValueError):
        layer_similarity(torch.zeros(4, 3))
