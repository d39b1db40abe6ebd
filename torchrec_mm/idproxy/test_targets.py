"""Tests of the stage-1 targets: table lookup, tau filter, normalisation, errors."""

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrec_mm.idproxy.targets import (
    find_item_table,
    load_item_table,
    load_item_targets,
    make_targets,
    run_data_dir,
)
from torchrec_mm.utils.io import save_tensors


def make_data_and_run(root: str) -> tuple:
    """A tiny synthetic dataset with a split, and a 5-step target-attention run."""
    from torchrec_mm.data.split import make_split
    from torchrec_mm.data.synth import SynthConfig, generate
    from torchrec_mm.training.trainer import TrainConfig, train

    data, run = os.path.join(root, "data"), os.path.join(root, "run")
    generate(SynthConfig(num_users=200, num_items=300, num_interactions=20000), data)
    make_split(data)
    train(TrainConfig(data=data, out=run, world_size=1, epochs=1, max_steps=5, batch_size=256,
                      history_length=10, progress=False, evaluate=False))
    return data, run


@pytest.fixture(scope="module")
def data_run(tmp_path_factory):
    return make_data_and_run(str(tmp_path_factory.mktemp("idproxy_targets")))


def _reference_counts(data: str, num_items: int) -> np.ndarray:
    from torchrec_mm.data.batching import RankingSamples

    s = RankingSamples.from_dataset(data)
    return np.bincount(s.item[s.split == 0], minlength=num_items)


def test_targets_from_run(data_run):
    from torchrec_mm.training.checkpoint import latest_checkpoint, read_checkpoint

    data, run = data_run
    assert run_data_dir(run) == data
    _, _, tensors = read_checkpoint(latest_checkpoint(os.path.join(run, "checkpoints")))
    table = tensors["/model/model.embedding_collection.embeddings.t_item_id.weight"]
    t = load_item_targets(run, tau=5)
    counts = _reference_counts(data, 300)
    np.testing.assert_array_equal(t.counts.numpy(), counts)
    expected_ids = np.nonzero(counts >= 5)[0]
    assert 0 < len(expected_ids) < 300  # the filter does something on this data
    np.testing.assert_array_equal(t.item_ids.numpy(), expected_ids)
    assert t.embeddings.dtype == torch.float32 and t.embeddings.shape == (len(expected_ids), 16)
    torch.testing.assert_close(t.embeddings.norm(dim=1), torch.ones(len(expected_ids)))
    ref = table[expected_ids] / table[expected_ids].norm(dim=1, keepdim=True)
    torch.testing.assert_close(t.embeddings, ref)
    assert t.table.endswith("t_item_id.weight")
    assert t.info["dropped_below_tau"] == 300 - len(expected_ids)


def test_tau_filter(data_run):
    data, run = data_run
    counts = _reference_counts(data, 300)
    tau = int(np.median(counts[counts > 0]))
    t = load_item_targets(run, tau=tau, data_dir=data)
    np.testing.assert_array_equal(t.item_ids.numpy(), np.nonzero(counts >= tau)[0])
    with pytest.raises(ValueError, match="no item has >= 100000"):
        load_item_targets(run, tau=100000)


def test_table_file(data_run, tmp_path):
    data, run = data_run
    table = torch.randn(300, 8)
    path = str(tmp_path / "t.safetensors")
    save_tensors(path, {"item_emb": table, "user_emb": torch.randn(200, 8)})
    t = load_item_targets(None, tau=1, data_dir=data, table_file=path, table_key="item_emb")
    assert t.embeddings.shape[1] == 8 and t.table.endswith(":item_emb")
    torch.testing.assert_close(t.embeddings, torch.nn.functional.normalize(table[t.item_ids]))
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        load_item_targets(None, 1, data, path, "nope")
    with pytest.raises(ValueError, match=r"user_emb has 200 rows.*300 items"):
        load_item_targets(None, 1, data, path, "user_emb")
    with pytest.raises(ValueError, match="data_dir is required"):
        load_item_targets(None, 1, None, path, "item_emb")


def test_find_item_table_errors(tmp_path):
    a, b = torch.zeros(3, 2), torch.ones(3, 2)
    key, t = find_item_table({"/model/x.t_item_id.weight": a,
                              "/optimizer/state/x.t_item_id.weight": b}, "ck")
    assert key == "/model/x.t_item_id.weight" and t is a
    with pytest.raises(KeyError, match="no tensor whose key ends in 't_item_id.weight'"):
        find_item_table({"/model/t_user_id.weight": a}, "ck")
    with pytest.raises(KeyError, match=r"several tensors.*a.t_item_id.weight.*b.t_item_id"):
        find_item_table({"/model/a.t_item_id.weight": a, "/model/b.t_item_id.weight": b}, "ck")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_item_table(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_item_table(None, str(tmp_path / "missing.safetensors"))


def test_zero_and_nan_rows():
    table = torch.randn(6, 4)
    table[2] = 0.0
    counts = np.array([9, 9, 9, 1, 9, 9])
    t = make_targets(table, counts, tau=5, name="tbl")
    np.testing.assert_array_equal(t.item_ids.numpy(), [0, 1, 4, 5])
    assert t.info["dropped_zero"] == 1 and t.info["dropped_below_tau"] == 1
    table[4, 1] = float("nan")
    with pytest.raises(ValueError, match="tbl: embedding of item 4 is NaN"):
        make_targets(table, counts, tau=5, name="tbl")
    table[4, 1] = 0.0
    table[3, 0] = float("inf")  # below tau: dropped, not an error
    make_targets(table, counts, tau=5, name="tbl")
    with pytest.raises(ValueError, match="tbl has 6 rows.*5 items"):
        make_targets(table, counts[:5], tau=5, name="tbl")


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), d=st.integers(1, 8), tau=st.integers(0, 6),
       seed=st.integers(0, 10**6))
def test_make_targets_property(n, d, tau, seed):
    rng = np.random.default_rng(seed)
    table = torch.from_numpy(rng.normal(size=(n, d)).astype(np.float32))
    table[torch.from_numpy(rng.random(n) < 0.2)] = 0.0
    counts = rng.integers(0, 10, size=n)
    keep = (counts >= tau) & (table.norm(dim=1).numpy() > 0)
    if not keep.any():
        with pytest.raises(ValueError):
            make_targets(table, counts, tau)
        return
    t = make_targets(table, counts, tau)
    np.testing.assert_array_equal(t.item_ids.numpy(), np.nonzero(keep)[0])
    torch.testing.assert_close(t.embeddings.norm(dim=1), torch.ones(int(keep.sum())))
    # direction preserved
    cos = (t.embeddings * table[t.item_ids]).sum(1) / table[t.item_ids].norm(dim=1)
    torch.testing.assert_close(cos, torch.ones_like(cos))
