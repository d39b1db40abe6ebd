import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrec_mm.data.io import load_interaction_columns
from torchrec_mm.data.split import TRAIN, load_split, make_split
from torchrec_mm.data.synth import SynthConfig, generate
from torchrec_mm.redrec.protocol import ProtocolConfig, evaluate_multi_interest, make_eval_cases
from torchrec_mm.redrec.sasrec import (
    CAND_ITEM,
    NEG_ITEM,
    SASRec,
    SASRecConfig,
    evaluate_sasrec,
    fit_sasrec,
    load_sasrec,
    make_training_segments,
    padded_to_kjt,
    train_sasrec,
)
from torchrec_mm.redrec.sequences import EventLog


def small_model(num_items=30, max_len=8, seed=0, **kw):
    torch.manual_seed(seed)
    return SASRec(SASRecConfig(num_items=num_items, dim=16, num_layers=2, num_heads=2,
                               max_len=max_len, **kw)).eval()


def successor_log(num_users, length, succ, seed, t0=1_000_000):
    """Users whose items follow ``succ`` from a random start, one event per minute."""
    rng = np.random.default_rng(seed)
    n = len(succ)
    items = np.empty((num_users, length), np.int64)
    items[:, 0] = rng.integers(0, n, num_users)
    for j in range(1, length):
        items[:, j] = succ[items[:, j - 1]]
    users = np.repeat(np.arange(num_users), length)
    ts = t0 + 60 * np.tile(np.arange(length), num_users) + 7 * users
    return EventLog.from_arrays(users, items.ravel(), np.zeros(users.size, np.int64),
                                np.zeros(users.size, np.int64), ts, num_scenarios=1)


# --------------------------------------------------------------------------- model


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 8), st.integers(0, 7), st.integers(0, 10**6))
def test_causal_mask(length, j, seed):
    """Changing event j changes no output at positions < j (and does change j..)."""
    j = min(j, length - 1)
    model = small_model(seed=seed % 7)
    rng = np.random.default_rng(seed)
    a = torch.from_numpy(rng.integers(0, 30, (1, length)))
    b = a.clone()
    b[0, j] = (a[0, j] + 1 + int(rng.integers(0, 28))) % 30
    with torch.no_grad():
        ha = model.forward_with_items(padded_to_kjt(a))[0]
        hb = model.forward_with_items(padded_to_kjt(b))[0]
    torch.testing.assert_close(ha[0, :j], hb[0, :j], rtol=0, atol=1e-6)
    assert (ha[0, j:] - hb[0, j:]).abs().amax(-1).min() > 1e-4


@settings(max_examples=10, deadline=None)
@given(st.lists(st.integers(1, 8), min_size=1, max_size=5), st.integers(0, 10**6))
def test_padding_and_batch_invariance(lengths, seed):
    """A row's user vector = the vector of that row alone, whatever the padding / batch."""
    model = small_model()
    rng = np.random.default_rng(seed)
    width = max(lengths) + int(rng.integers(0, 3))
    items = torch.full((len(lengths), width), -1, dtype=torch.long)
    for r, n in enumerate(lengths):
        items[r, :n] = torch.from_numpy(rng.integers(0, 30, n))
    with torch.no_grad():
        batch = model(padded_to_kjt(items))
        alone = torch.cat([model(padded_to_kjt(items[r:r + 1, :n]))
                           for r, n in enumerate(lengths)])
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-5)
    # user_vectors keeps the last max_len events of longer rows
    long = torch.from_numpy(rng.integers(0, 30, (2, 12)))
    long[1, 10:] = -1
    vec = model.user_vectors(long)
    ref = torch.cat([model(padded_to_kjt(long[:1, 4:])), model(padded_to_kjt(long[1:, 2:10]))])
    torch.testing.assert_close(vec, ref.detach(), rtol=1e-5, atol=1e-5)


def test_lookups_are_the_item_table_and_bad_ids_raise():
    model = small_model()
    kjt = padded_to_kjt(torch.tensor([[1, 2, -1], [3, -1, -1]]), torch.tensor([[4, 5], [6, -1]]),
                        torch.tensor([7, 8, 9]))
    _, lengths, look = model.forward_with_items(kjt)
    table = model.item_embeddings()
    assert lengths.tolist() == [2, 1]
    torch.testing.assert_close(look[CAND_ITEM].values(), table[[4, 5, 6]])
    torch.testing.assert_close(look[NEG_ITEM].values(), table[[7, 8, 9]])
    with pytest.raises(ValueError, match="seq_item_id.*item id 30"):
        model(padded_to_kjt(torch.tensor([[1, 30]])))
    with pytest.raises(ValueError, match="no history"):
        model(padded_to_kjt(torch.tensor([[1, 2], [-1, -1]])))
    with pytest.raises(ValueError, match="max_len"):
        model(padded_to_kjt(torch.zeros(1, 9, dtype=torch.long)))


def test_training_segments_cover_each_target_once():
    lens = [1, 2, 5, 9, 0, 4]
    users = np.repeat(np.arange(len(lens)), lens)
    items = np.arange(users.size)
    log = EventLog.from_arrays(users, items, np.zeros_like(users), np.zeros_like(users),
                               np.arange(users.size), num_scenarios=1)
    seg = make_training_segments(log, max_len=3)
    # reference: per-user loop
    ref = []
    for u, n in enumerate(lens):
        ev = items[users == u]
        for s in range(0, max(n - 1, 0), 3):
            row = ev[s:s + 4]
            ref.append(np.concatenate([row, -np.ones(4 - len(row), np.int64)]))
    np.testing.assert_array_equal(seg, np.array(ref))
    tgt = seg[:, 1:][seg[:, 1:] >= 0]
    first = np.concatenate([[0], np.cumsum(lens)[:-1]])[np.array(lens) > 0]
    np.testing.assert_array_equal(np.sort(tgt), np.setdiff1d(items, first))


def test_target_actions_restrict_next_item_targets():
    """target_actions: only engaged events are next-item targets (all stay inputs), in
    training and in evaluate_sasrec."""
    rng = np.random.default_rng(0)
    lens = [5, 9, 1, 6]
    users = np.repeat(np.arange(len(lens)), lens)
    n = users.size
    acts = rng.integers(0, 2, n)
    log = EventLog.from_arrays(users, rng.integers(0, 30, n), np.zeros(n, np.int64), acts,
                               np.arange(n), num_scenarios=1, action_names=["is_click"])
    first = np.concatenate([[0], np.cumsum(lens)[:-1]])
    kw = dict(num_items=30, dim=16, num_layers=1, max_len=3, epochs=1, batch_size=2,
              negatives=4)
    model, m = fit_sasrec(log, SASRecConfig(target_actions=["is_click"], **kw),
                          progress=False)
    assert m["num_targets"] == int(acts.sum() - acts[first].sum()) > 0
    assert fit_sasrec(log, SASRecConfig(**kw), progress=False)[1]["num_targets"] == \
        n - len(lens)
    with pytest.raises(ValueError, match=r"unknown action\(s\) \['click'\]"):
        fit_sasrec(log, SASRecConfig(target_actions=["click"], **kw), progress=False)
    pcfg = ProtocolConfig(pool_size=30, ks=(10,))
    res = evaluate_sasrec(model, log, pcfg, target_actions=["is_click"], progress=False)
    cases = make_eval_cases(log.user_offsets, log.item, log.timestamp, 30, pcfg,
                            log.action_mask(["is_click"]))
    assert res["num_users"] == len(cases) > 0
    assert (acts[cases.cutoff_index.numpy()] == 1).all()


# --------------------------------------------------------------------------- planted signal


def test_planted_successor_signal_and_protocol_parity():
    """Items follow a fixed successor map: the trained model's next-item HR@10 on unseen
    users is far above the untrained model's; evaluate_sasrec matches a direct per-case
    computation through make_eval_cases."""
    n = 120
    succ = np.random.default_rng(0).permutation(n)
    train = successor_log(160, 10, succ, seed=1)
    test = successor_log(80, 10, succ, seed=2, t0=5_000_000)
    cfg = SASRecConfig(num_items=n, dim=32, num_layers=1, num_heads=2, max_len=8,
                       dropout=0.1, lr=1e-2, epochs=4, batch_size=32, negatives=32, seed=0)
    model, metrics = fit_sasrec(train, cfg, progress=False)
    assert metrics["loss"][-1] < 0.5 * metrics["loss"][0]
    assert metrics["num_targets"] == 160 * 9 and metrics["num_segments"] == 320
    pcfg = ProtocolConfig(pool_size=n, ks=(10, 50), seed=3)
    res = evaluate_sasrec(model, test, pcfg, progress=False)
    untrained = evaluate_sasrec(SASRec(cfg).eval(), test, pcfg, progress=False)
    assert res["num_users"] == 80 and res["target_split"] == "all"
    assert res["HR@10"] > 0.9, res
    assert untrained["HR@10"] < 0.5 and res["MRR"] > untrained["MRR"] + 0.4, untrained

    # parity: the same cases, histories read straight from the log rows, one case at a time
    cases = make_eval_cases(test.user_offsets, test.item, test.timestamp, n, pcfg)
    vecs = []
    for i in range(len(cases)):
        hist = test.item[int(cases.history_start[i]):int(cases.cutoff_index[i])][-cfg.max_len:]
        with torch.no_grad():
            vecs.append(model(padded_to_kjt(torch.from_numpy(hist)[None])))
    ref = evaluate_multi_interest(torch.cat(vecs), model.item_embeddings().detach(), cases,
                                  progress=False)
    for k in ("HR@10", "NDCG@10", "HR@50", "MRR"):
        assert res[k] == pytest.approx(ref[k], abs=1e-9), k


# --------------------------------------------------------------------------- dataset


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sasrec") / "ds")
    generate(SynthConfig(num_users=40, num_items=100, num_interactions=1500, num_topics=4,
                         seed=2), out)
    make_split(out, cold_item_frac=0.1, test_time_frac=0.2, seed=0)
    return out


def test_train_on_dataset_train_split_and_reload(tiny_dataset, tmp_path):
    cols = load_interaction_columns(tiny_dataset, ["item_id", "timestamp"])
    part = load_split(tiny_dataset).assign(cols["item_id"], cols["timestamp"])
    cfg = SASRecConfig(num_items=100, dim=16, num_layers=1, max_len=10, epochs=1,
                       batch_size=16, negatives=8)
    out_dir = str(tmp_path / "run")
    res = train_sasrec(tiny_dataset, cfg, out_dir=out_dir, progress=False)
    assert res["num_train_events"] == int((part == TRAIN).sum())
    with open(os.path.join(out_dir, "metrics.json")) as f:
        saved = json.load(f)
    assert saved["num_segments"] == res["num_segments"] and "model" not in saved
    assert not [f for f in os.listdir(out_dir) if f.endswith(".tmp")]
    pcfg = ProtocolConfig(pool_size=50, ks=(10, 50), seed=0)
    a = evaluate_sasrec(res["model"], tiny_dataset, pcfg, progress=False)
    b = evaluate_sasrec(load_sasrec(out_dir), tiny_dataset, pcfg, progress=False)
    assert a == b and a["num_users"] > 0 and a["target_split"] == "test"
    assert 0.0 <= a["HR@10"] <= a["HR@50"] <= 1.0
    # only test-split events are targets
    log = EventLog.from_dataset(tiny_dataset)
    test_rows = load_split(tiny_dataset).assign(log.item, log.timestamp) != TRAIN
    cases = make_eval_cases(log.user_offsets, log.item, log.timestamp, 100, pcfg, test_rows)
    assert a["num_users"] == len(cases)
    assert test_rows[cases.cutoff_index.numpy()].all()
    with pytest.raises(ValueError, match="target_split"):
        evaluate_sasrec(res["model"], tiny_dataset, pcfg, target_split="valid")
    bad = EventLog.from_arrays(np.array([0, 0]), np.array([3, 120]), np.zeros(2, np.int64),
                               np.zeros(2, np.int64), np.array([1, 2]), num_scenarios=1,
                               row=np.array([10, 11]))
    with pytest.raises(ValueError, match="log row 11: item_id 120 outside"):
        fit_sasrec(bad, SASRecConfig(num_items=100, epochs=0), progress=False)
