"""Tests of the mean-of-history content baseline: metrics against a per-case reference
(built on the per-user mixing reference), the planted topic signal, the experiment
variant and bad input."""

import json
import os

import numpy as np
import pytest
import yaml

from torchrec_mm.data.split import make_split
from torchrec_mm.data.synth import SynthConfig, SynthTruth, generate
from torchrec_mm.experiment import run_experiment
from torchrec_mm.redrec.content_mean import evaluate_content_mean
from torchrec_mm.redrec.protocol import ProtocolConfig, make_eval_cases
from torchrec_mm.redrec.sequences import EventLog, MixConfig, mix_reference
from torchrec_mm.redrec.test_train import write_vector_store
from torchrec_mm.redrec.train import eval_target_rows

NUM_ITEMS, TOPICS = 240, 8


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Topic-only data (uniform popularity) and a store of noisy topic vectors with a
    large shared offset (as MiniLM's [EMB] states have)."""
    root = tmp_path_factory.mktemp("content_mean")
    data = str(root / "data")
    generate(SynthConfig(num_users=120, num_items=NUM_ITEMS, num_interactions=4800,
                         num_topics=TOPICS, zipf_exponent=0.0, pop_share=(0.0, 0.0, 0.0),
                         interest_concentration=0.05, intent_share_sparse=0.0,
                         intent_share_homefeed=0.0, seed=0), data)
    make_split(data)
    rng = np.random.default_rng(0)
    truth = SynthTruth.load(data)
    vecs = np.concatenate([truth.item_topic_mix, 0.3 * rng.standard_normal((NUM_ITEMS, 8))],
                          1) + 5.0
    store = write_vector_store(str(root / "store"), vecs.astype(np.float32))
    return {"root": root, "data": data, "store": store, "vecs": vecs}


def _reference(env, cfg, mix_cfg):
    """HR@K by hand: numpy centring, per-user mixing reference, a target's rank = the
    non-target candidates scored >= it; and HR@K of a random ranking."""
    data = env["data"]
    v = env["vecs"] - env["vecs"].mean(0)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    log = EventLog.from_dataset(data)
    cases = make_eval_cases(log.user_offsets, log.item, log.timestamp, NUM_ITEMS, cfg,
                            target_rows=eval_target_rows(log, data, "test"))
    pool = set(cases.pool.tolist())
    hits = {k: [] for k in cfg.ks}
    chance = {k: [] for k in cfg.ks}
    for i, tg in enumerate(cases.targets.numpy()):
        seq = mix_reference(log, cases.users.numpy()[i:i + 1],
                            cases.cutoff_time.numpy()[i:i + 1], mix_cfg)
        items = seq.item[0][seq.item[0] >= 0]
        u = v[items].mean(0) if items.size else np.zeros(v.shape[1])
        u = u / max(np.linalg.norm(u), 1e-12)
        score = v @ u
        targets = {int(t) for t in tg if t >= 0}
        others = np.array(sorted(pool - targets), dtype=np.int64)
        best = min(int((score[others] >= score[t] - 1e-6).sum()) for t in targets)
        for k in cfg.ks:
            hits[k].append(best < k)
            chance[k].append(1 - (1 - k / (len(others) + len(targets))) ** len(targets))
    return ({k: float(np.mean(h)) for k, h in hits.items()}, len(cases),
            {k: float(np.mean(c)) for k, c in chance.items()})


@pytest.mark.parametrize("policy,last_n", [("2d", 16), ("global_time", 8)])
def test_metrics_match_a_per_case_reference(env, policy, last_n):
    cfg = ProtocolConfig(pool_size=150, ks=(5, 20, 50), max_users=60, seed=2)
    mix_cfg = MixConfig(policy=policy, last_n=last_n)
    got = evaluate_content_mean(env["data"], env["store"], cfg, mix_cfg=mix_cfg,
                                batch_size=7)
    want, n, chance = _reference(env, cfg, mix_cfg)
    assert got["num_users"] == n > 20
    for k, hr in want.items():
        # ties within float rounding may order differently: at most one case apart
        assert abs(got[f"HR@{k}"] - hr) <= 1.0 / n + 1e-9, (k, got[f"HR@{k}"], hr)
    # the planted topic signal (next items follow the user's topic): far above chance,
    # which the shared offset would hide without the centring
    assert got["HR@5"] > 2 * chance[5]


def test_experiment_variant_and_bad_input(env, tmp_path):
    spec = {"name": "cm", "task": "retrieval", "seeds": [0, 1],
            "train": {"eval_ks": [10, 50], "eval_max_users": 60, "item_embedding": "content",
                      "content_store": env["store"], "last_n": 16, "window": 4},
            "variants": {"content_mean": {"model": "content_mean"},
                         "content_mean_8": {"model": "content_mean", "last_n": 8,
                                            "policy": "global_time"}}}
    path = str(tmp_path / "spec.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(spec, f)
    out = str(tmp_path / "out")
    run_experiment(path, env["data"], out)
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)["metrics"]
    pcfg = ProtocolConfig(ks=(10, 50), max_users=60)
    # the events the user tower reads at evaluation: last_n - window
    for name, mix_cfg in (("content_mean", MixConfig(last_n=12)),
                          ("content_mean_8", MixConfig(policy="global_time", last_n=4))):
        v = m["variants"][name]
        assert v["model"] == "content_mean" and v["per_seed"][0] == v["per_seed"][1]
        direct = evaluate_content_mean(env["data"], env["store"], pcfg, mix_cfg=mix_cfg)
        assert v["per_seed"][0]["HR@10"] == pytest.approx(direct["HR@10"])
    spec["variants"] = {"bad": {"model": "content_mean", "epochs": 3}}
    with open(path, "w") as f:
        yaml.safe_dump(spec, f)
    with pytest.raises(ValueError, match="unknown content_mean option"):
        run_experiment(path, env["data"], str(tmp_path / "bad"))
    small = write_vector_store(str(tmp_path / "small"), np.ones((5, 4), np.float32))
    with pytest.raises(ValueError, match="made for 5 items"):
        evaluate_content_mean(env["data"], small)
    with pytest.raises(ValueError, match="no field 'pooled'"):
        evaluate_content_mean(env["data"], env["store"], field="pooled")
