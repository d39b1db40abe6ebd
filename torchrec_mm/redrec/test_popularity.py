"""Tests of the most-popular baseline: metrics against a per-case reference, positives
by action, and the experiment variant."""

import json
import os

import numpy as np
import pytest
import yaml

from torchrec_mm.data.split import TRAIN, load_split, make_split
from torchrec_mm.data.synth import SynthConfig, generate
from torchrec_mm.experiment import run_experiment
from torchrec_mm.redrec.popularity import evaluate_popularity, popularity_counts
from torchrec_mm.redrec.protocol import ProtocolConfig, make_eval_cases
from torchrec_mm.redrec.sequences import EventLog
from torchrec_mm.redrec.train import eval_target_rows

NUM_ITEMS = 300


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("popularity") / "data")
    generate(SynthConfig(num_users=150, num_items=NUM_ITEMS, num_interactions=6000, seed=3),
             path)
    make_split(path)
    return path


def _reference_hr(data, cfg, counts, target_actions=None, scenarios=None):
    """HR@K by hand: a target's rank = the non-target candidates scored >= it."""
    log = EventLog.from_dataset(data)
    rows = eval_target_rows(log, data, "test", target_actions)
    if scenarios is not None:
        rows &= np.isin(np.array(log.scenario_names)[log.scenario], scenarios)
    cases = make_eval_cases(log.user_offsets, log.item, log.timestamp, NUM_ITEMS, cfg,
                            target_rows=rows)
    pool = set(cases.pool.tolist())
    hits = {k: [] for k in cfg.ks}
    chance = {k: [] for k in cfg.ks}  # HR@K of a random ranking
    for tg in cases.targets.numpy():
        targets = {int(t) for t in tg if t >= 0}
        others = np.array(sorted(pool - targets), dtype=np.int64)
        best = min(int((counts[others] >= counts[t]).sum()) for t in targets)
        for k in cfg.ks:
            hits[k].append(best < k)
            chance[k].append(1 - (1 - k / (len(others) + len(targets))) ** len(targets))
    return ({k: float(np.mean(v)) for k, v in hits.items()}, len(cases),
            {k: float(np.mean(v)) for k, v in chance.items()})


@pytest.mark.parametrize("target_actions,scenarios", [(None, None), (["is_click"], None),
                                                    (None, ["search", "ads"])])
def test_metrics_match_a_per_case_reference(data, target_actions, scenarios):
    cfg = ProtocolConfig(pool_size=200, ks=(5, 20, 100), max_users=80, seed=1)
    got = evaluate_popularity(data, cfg, "test", target_actions, scenarios=scenarios)
    train = EventLog.from_dataset(data, split_filter="train")
    counts = popularity_counts(train, NUM_ITEMS, target_actions)
    want, n, chance = _reference_hr(data, cfg, counts, target_actions, scenarios)
    assert got["num_users"] == n > 20
    for k, v in want.items():
        assert got[f"HR@{k}"] == pytest.approx(v)
    # the Zipf popularity of the generated impressions: far above a random ranking
    assert got["HR@20"] > 1.5 * chance[20]


def test_counts_by_action(data):
    train = EventLog.from_dataset(data, split_filter="train")
    clicked = train.item[(train.actions & 1) == 1]
    np.testing.assert_array_equal(popularity_counts(train, NUM_ITEMS, ["is_click"]),
                                  np.bincount(clicked, minlength=NUM_ITEMS))
    np.testing.assert_array_equal(popularity_counts(train, NUM_ITEMS),
                                  np.bincount(train.item, minlength=NUM_ITEMS))
    # the full log restricted to the train split's events counts the same
    full = EventLog.from_dataset(data)
    is_train = load_split(data).assign(full.item, full.timestamp, full.user) == TRAIN
    np.testing.assert_array_equal(
        popularity_counts(full, NUM_ITEMS, ["is_click"], events=is_train),
        popularity_counts(train, NUM_ITEMS, ["is_click"]))
    with pytest.raises(ValueError, match="unknown action"):
        popularity_counts(train, NUM_ITEMS, ["click"])
    with pytest.raises(ValueError, match="outside"):
        popularity_counts(train, 5)


def test_experiment_variant(data, tmp_path):
    spec = {"name": "pop", "task": "retrieval", "seeds": [0, 1],
            "train": {"eval_ks": [10, 50], "eval_max_users": 60,
                      "target_actions": ["is_click"]},
            "variants": {"popularity": {"model": "popularity"}}}
    path = str(tmp_path / "spec.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(spec, f)
    out = str(tmp_path / "out")
    run_experiment(path, data, out)
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)["metrics"]
    v = m["variants"]["popularity"]
    assert v["model"] == "popularity" and v["per_seed"][0] == v["per_seed"][1]
    direct = evaluate_popularity(data, ProtocolConfig(ks=(10, 50), max_users=60), "test",
                                 ["is_click"])
    assert v["per_seed"][0]["HR@10"] == pytest.approx(direct["HR@10"])
    assert m["protocol"]["num_cases"] == direct["num_users"]
    spec["variants"]["popularity"]["epochs"] = 3
    with open(path, "w") as f:
        yaml.safe_dump(spec, f)
    with pytest.raises(ValueError, match="popularity baseline takes no options"):
        run_experiment(path, data, str(tmp_path / "bad"))
