"""Tests of the ``redrec_user`` ranker feature: snapshot selection (never at/after the
sample time), snapshot vectors vs a direct user-tower forward on the same cut history,
the resumable embedding job, the plugin with unmodified rankers (unsharded, fx, DMP
through the trainer) and a planted time-varying signal only the feature carries.

Batches need the samples' times (``Batch.timestamps``); until ``make_batch`` fills them,
the helpers here attach ``RankingSamples.timestamp[rows]`` themselves.
"""

import argparse
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrec_mm.data.batching import Batch, FeatureLayout, RankingSamples
from torchrec_mm.data.io import load_interaction_columns
from torchrec_mm.data.split import TRAIN, load_split, make_split
from torchrec_mm.data.synth import SynthConfig, generate
from torchrec_mm.models.rankers import RankerConfig
from torchrec_mm.plugins import get_plugin
from torchrec_mm.redrec import user_features as uf
from torchrec_mm.redrec.sequences import EventLog, mix
from torchrec_mm.redrec.test_tower import build_tiny_bert
from torchrec_mm.redrec.train import RedRecConfig, train_redrec
from torchrec_mm.redrec.user_features import (
    ROW_FEATURE,
    EmbedUsersConfig,
    RedRecUserCollection,
    SnapshotRowTransform,
    UserSnapshots,
    embed_users,
    load_snapshots,
    select_snapshot,
    snapshot_times,
)
from torchrec_mm.training.trainer import TrainConfig, build_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NUM_USERS, NUM_ITEMS = 60, 120
SNAPSHOTS = 4


pytestmark = pytest.mark.usefixtures("one_thread")  # redrec/conftest.py


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A small 3-scenario dataset with a split, a 2-step RED-Rec run (tiny BERT) and its
    user snapshots."""
    root = tmp_path_factory.mktemp("redrec_user")
    data = str(root / "data")
    generate(SynthConfig(num_users=NUM_USERS, num_items=NUM_ITEMS, num_interactions=1500,
                         num_topics=4, seed=0), data)
    make_split(data, cold_item_frac=0.2)
    bert = build_tiny_bert(str(root / "bert"))
    run = str(root / "run")
    train_redrec(RedRecConfig(
        data=data, out=run, model_path=bert, last_n=16, window=4, embedding_dim=16,
        interests_per_scenario=1, num_negatives=16, batch_size=16, max_steps=2,
        dropout=0.0, embedding_lr=0.5, evaluate=False, progress=False))
    emb = str(root / "users")
    manifest = embed_users(EmbedUsersConfig(run=run, out=emb, num_snapshots=SNAPSHOTS,
                                            chunk_users=25, batch_size=8, progress=False))
    return {"root": root, "data": data, "run": run, "emb": emb, "manifest": manifest}


_MAKE_BATCH = RankingSamples.make_batch


def _batch(samples: RankingSamples, rows: np.ndarray, stream=None) -> Batch:
    """``samples.make_batch`` with the sample times attached before the transforms."""
    rows = np.asarray(rows, dtype=np.int64)
    transforms, samples.batch_transforms = samples.batch_transforms, []
    try:
        batch = _MAKE_BATCH(samples, rows, stream)
    finally:
        samples.batch_transforms = transforms
    if getattr(batch, "timestamps", None) is None:
        batch.timestamps = torch.from_numpy(samples.timestamp[rows].copy())
    for transform in transforms:
        batch = transform(batch)
    return batch


def _spec(tmp_path, emb: str, **options) -> str:
    path = str(tmp_path / "spec.yaml")
    with open(path, "w") as f:
        json.dump({"plugins": [{"name": "redrec_user",
                                "options": {"embeddings": emb, **options}}]}, f)
    return path


# --------------------------------------------------------------------------- selection


def test_snapshot_time_rules():
    ts = np.array([100, 100, 100, 150, 200, 300, 400, 1000])
    q = snapshot_times(ts, num_snapshots=3)
    assert np.all(np.diff(q) > 0) and np.isin(q, ts).all() and len(q) <= 3
    np.testing.assert_array_equal(q, np.quantile(ts, [0.25, 0.5, 0.75], method="lower"))
    np.testing.assert_array_equal(snapshot_times(ts, snapshot_every=300), [400, 700, 1000])
    with pytest.raises(ValueError, match="longer than the log"):
        snapshot_times(ts, snapshot_every=10_000)
    with pytest.raises(ValueError, match="no events"):
        snapshot_times(np.zeros(0, np.int64))


@settings(max_examples=200, deadline=None)
@given(times=st.lists(st.integers(0, 60), min_size=1, max_size=8, unique=True),
       t=st.lists(st.integers(-5, 70), min_size=1, max_size=30))
def test_selection_is_the_latest_snapshot_strictly_before(times, t):
    times_t = torch.tensor(sorted(times), dtype=torch.int64)
    s = select_snapshot(times_t, torch.tensor(t, dtype=torch.int64)).tolist()
    for tb, sb in zip(t, s):
        before = [k for k, tau in enumerate(sorted(times)) if tau < tb]
        assert sb == (before[-1] if before else -1)
        if sb >= 0:
            assert sorted(times)[sb] < tb          # never a snapshot at/after the sample


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_transform_rows_and_fallback(data):
    S = data.draw(st.integers(1, 5))
    U = data.draw(st.integers(1, 6))
    times = sorted(data.draw(st.lists(st.integers(0, 50), min_size=S, max_size=S,
                                      unique=True)))
    has = np.array(data.draw(st.lists(st.booleans(), min_size=S * U, max_size=S * U)))
    index = np.full(S * U, -1, np.int32)
    index[has] = np.arange(int(has.sum()), dtype=np.int32)
    index = index.reshape(S, U)
    B = data.draw(st.integers(1, 12))
    users = np.array(data.draw(st.lists(st.integers(0, U - 1), min_size=B, max_size=B)))
    t = np.array(data.draw(st.lists(st.sampled_from(times + [0, 25, 60]), min_size=B,
                                    max_size=B)))
    tr = SnapshotRowTransform(torch.tensor(times), torch.from_numpy(index))
    rows = tr.rows(torch.from_numpy(users), torch.from_numpy(t)).tolist()
    for b in range(B):
        s = max([k for k in range(S) if times[k] < t[b]], default=-1)
        assert rows[b] == (0 if s < 0 else int(index[s, users[b]]) + 1)


def test_transform_appends_one_row_per_sample():
    samples = _small_samples()
    times = torch.tensor([5_000, 20_000, 60_000])
    index = torch.arange(3 * samples.layout.num_users, dtype=torch.int32).reshape(3, -1)
    rows = np.arange(0, 64)
    batch = _batch(samples, rows)
    out = SnapshotRowTransform(times, index)(batch)
    kjt = out.sparse_features
    assert kjt.keys() == batch.sparse_features.keys() + [ROW_FEATURE]
    assert kjt[ROW_FEATURE].lengths().tolist() == [1] * 64
    t = torch.from_numpy(samples.timestamp[rows])
    s = select_snapshot(times, t)
    want = torch.where(s >= 0, index[s.clamp(min=0), out.user_ids].long() + 1, 0)
    assert torch.equal(kjt[ROW_FEATURE].values(), want)
    assert bool((want == 0).any()) and bool((want > 0).any())
    torch.testing.assert_close(out.dense_features, batch.dense_features)
    del batch.timestamps
    with pytest.raises(ValueError, match="timestamps"):
        SnapshotRowTransform(times, index)(batch)


# --------------------------------------------------------------------------- embedding


def _visible_log(data: str, tau: int, time_cut: int) -> EventLog:
    """The events a snapshot at ``tau`` may see, rebuilt from the raw columns."""
    cols = load_interaction_columns(data, ["user_id", "item_id", "scenario", "actions",
                                           "duration", "timestamp"])
    part = load_split(data).assign(cols["item_id"], cols["timestamp"])
    keep = (cols["timestamp"] < tau) & ((part == TRAIN) | (tau >= time_cut))
    c = {k: v[keep] for k, v in cols.items()}
    log = EventLog.from_dataset(data)
    return EventLog.from_arrays(c["user_id"], c["item_id"], c["scenario"], c["actions"],
                                c["timestamp"], c["duration"], num_users=NUM_USERS,
                                scenario_names=log.scenario_names,
                                action_names=log.action_names,
                                row=np.flatnonzero(keep))


def test_vectors_match_a_direct_tower_forward(env):
    snaps = load_snapshots(env["emb"])
    tower, cfg, info = uf.load_tower(env["run"])
    assert snaps.meta["config_hash"] == uf.run_config_hash(env["run"])[1]
    assert snaps.meta["checkpoint"] == info["checkpoint"]
    split = load_split(env["data"])
    full = EventLog.from_dataset(env["data"])
    np.testing.assert_array_equal(snaps.times.numpy(),
                                  snapshot_times(full.timestamp, SNAPSHOTS))
    mix_cfg = cfg.mix_config(cfg.resolved_eval_last_n)
    dense = snaps.dense()
    hidden_by_split = 0
    for s, tau in enumerate(snaps.times.tolist()):
        log = _visible_log(env["data"], tau, split.time_cut)
        for u in range(NUM_USERS):
            seq = mix(log, np.array([u]), np.array([tau]), mix_cfg)
            if seq.length[0] == 0:
                assert int(snaps.index[s, u]) == -1
                continue
            assert int(snaps.index[s, u]) >= 0
            with torch.no_grad():
                want = tower(seq.to_kjt())[0]
            torch.testing.assert_close(dense[s, u], want, atol=2e-5, rtol=1e-4)
            before_all = int((full.timestamp[full.user_offsets[u]:full.user_offsets[u + 1]]
                              < tau).sum())
            hidden_by_split += int(seq.length[0]) < before_all <= mix_cfg.last_n
    # the split rule mattered: some pre-cut snapshot hid a cold-item event
    assert hidden_by_split > 0
    assert int((snaps.times < split.time_cut).sum()) >= 1


def test_resume_after_interruption_equals_one_run(env, tmp_path, monkeypatch):
    out = str(tmp_path / "users")
    cfg = EmbedUsersConfig(run=env["run"], out=out, num_snapshots=SNAPSHOTS, chunk_users=25,
                           batch_size=8, progress=False)
    real = uf.embed_sequences
    calls = {"n": 0}

    def failing(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")
        return real(*args, **kw)

    monkeypatch.setattr(uf, "embed_sequences", failing)
    with pytest.raises(KeyboardInterrupt):
        embed_users(cfg)
    assert not os.path.exists(os.path.join(out, uf.SNAPSHOT_FILE))  # nothing half-done
    assert len([f for f in os.listdir(os.path.join(out, uf.PARTIAL_DIR))
                if f.endswith(".safetensors")]) == 4

    def counting(*args, **kw):
        calls["n"] += 1
        return real(*args, **kw)

    calls["n"] = 0
    monkeypatch.setattr(uf, "embed_sequences", counting)
    manifest = embed_users(cfg)
    pieces = SNAPSHOTS * 3                        # 60 users in chunks of 25
    assert calls["n"] == pieces - 4               # only the missing pieces
    assert not os.path.exists(os.path.join(out, uf.PARTIAL_DIR))
    a, b = load_snapshots(out), load_snapshots(env["emb"])
    assert torch.equal(a.index, b.index) and torch.equal(a.times, b.times)
    torch.testing.assert_close(a.vectors, b.vectors)
    assert manifest["job_key"] == env["manifest"]["job_key"]
    calls["n"] = 0
    embed_users(cfg)                              # finished: nothing recomputed
    assert calls["n"] == 0
    other = dataclasses.replace(cfg, num_snapshots=2)
    with pytest.raises(FileExistsError, match="overwrite"):
        embed_users(other)
    embed_users(dataclasses.replace(other, overwrite=True, dtype="float16"))
    c = load_snapshots(out)
    assert c.num_snapshots == 2 and c.vectors.dtype == torch.float16


def test_cli_and_experiment_step(env, tmp_path, capsys):
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="redrec_command")
    uf.add_embed_users_parser(sub)
    out = str(tmp_path / "cli")
    args = p.parse_args(["embed-users", "--run", env["run"], "--out", out, "--every",
                         str(7 * 86400), "--visibility", "all", "--no-progress"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    snaps = load_snapshots(out)
    assert printed["times"] == snaps.times.tolist()
    assert np.all(np.diff(snaps.times.numpy()) == 7 * 86400)
    assert snaps.meta["visibility"] == "all"

    from torchrec_mm.experiment import _get_step

    step = _get_step("redrec_embed_users")
    res = step(env["data"], str(tmp_path / "step"), {"run": env["run"], "num_snapshots": 2},
               {})
    assert res["embeddings"] == str(tmp_path / "step") and len(res["times"]) == 2
    with pytest.raises(ValueError, match="'run'"):
        step(env["data"], str(tmp_path / "x"), {}, {})


def test_load_rejects_bad_artefacts(tmp_path):
    good = dict(times=torch.tensor([1, 2]), index=torch.tensor([[0, -1], [1, 2]],
                                                               dtype=torch.int32),
                vectors=torch.randn(3, 2, 4))
    path = str(tmp_path / "s.safetensors")
    UserSnapshots(**good).save(path)
    assert load_snapshots(path).num_users == 2
    for change, match in [({"times": torch.tensor([2, 1])}, "increasing"),
                          ({"index": torch.tensor([[0, 3], [1, 2]], dtype=torch.int32)},
                           r"'index'\[0, 1\] = 3"),
                          ({"vectors": torch.full((3, 2, 4), float("nan"))}, "NaN")]:
        UserSnapshots(**{**good, **change}).save(path)
        with pytest.raises(ValueError, match=match):
            load_snapshots(path)
    with pytest.raises(FileNotFoundError, match="embed-users"):
        load_snapshots(str(tmp_path / "missing"))


# --------------------------------------------------------------------------- plugin


@pytest.mark.parametrize("kind,pooling", [("dlrm", "mean"), ("dlrm_dcn", "concat"),
                                          ("target_attention", "concat")])
def test_plugin_with_unmodified_rankers(env, tmp_path, kind, pooling):
    assert get_plugin("redrec_user") is uf.RedRecUserPlugin
    samples = RankingSamples.from_dataset(env["data"], history_length=8)
    cfg = TrainConfig(data=env["data"], out=str(tmp_path / "r"),
                      ranker=RankerConfig(kind=kind, embedding_dim=8),
                      plugins=_spec(tmp_path, env["emb"], pooling=pooling))
    model, plugins = build_model(cfg, samples.layout, samples)
    coll = next(m for m in model.modules() if isinstance(m, RedRecUserCollection))
    rows = samples.rows("test")[:40]
    batch = _batch(samples, rows, "all")
    kt = coll(batch.sparse_features)
    inner = coll.embedding_bag_collection(batch.sparse_features)
    assert kt.keys() == inner.keys() + ["user_redrec"]
    assert [f for c in coll.embedding_bag_configs() for f in c.feature_names][-1] == \
        "user_redrec"
    snaps = load_snapshots(env["emb"])
    vec = snaps.lookup(batch.user_ids, torch.from_numpy(samples.timestamp[rows]))  # [B,K,d]
    pooled = vec.mean(1) if pooling == "mean" else vec.reshape(len(rows), -1)
    assert coll.projection.in_features == pooled.shape[1]
    torch.testing.assert_close(kt.to_dict()["user_redrec"], coll.projection(pooled))
    loss, (_, logits, _) = model(batch)
    assert logits.shape == (40,) and bool(torch.isfinite(loss))
    # samples before the first snapshot: the fallback (projection bias)
    early = np.flatnonzero(samples.timestamp <= int(snaps.times[0]))[:8]
    eb = _batch(samples, early)
    assert bool((eb.sparse_features[ROW_FEATURE].values() == 0).all())
    torch.testing.assert_close(coll(eb.sparse_features).to_dict()["user_redrec"],
                               coll.projection.bias.expand(len(early), -1))


@pytest.mark.parametrize("pipeline", [False, True])
def test_fx_trace_and_dmp_training(env, tmp_path, monkeypatch, pipeline):
    import torchrec.fx

    from torchrec_mm.training.trainer import train

    samples = RankingSamples.from_dataset(env["data"], history_length=8)
    spec = _spec(tmp_path, env["emb"])
    cfg = TrainConfig(data=env["data"], out=str(tmp_path / "run"),
                      ranker=RankerConfig(kind="dlrm", embedding_dim=8), plugins=spec,
                      batch_size=64, eval_batch_size=256, max_steps=4, progress=False,
                      history_length=8, pipeline=pipeline)
    model, _ = build_model(cfg, samples.layout, samples)
    batch = _batch(samples, samples.rows("train")[:32])
    ranker = model.model
    gm = torchrec.fx.symbolic_trace(ranker)
    with torch.no_grad():
        torch.testing.assert_close(gm(batch.dense_features, batch.sparse_features),
                                   ranker(batch.dense_features, batch.sparse_features))
    if "timestamps" not in {f.name for f in dataclasses.fields(Batch)}:
        monkeypatch.setattr(RankingSamples, "make_batch", _batch)
    result = train(cfg)                           # DMP (1 rank), TrainPipelineSparseDist
    assert result["steps"] == 4 and np.isfinite(result["eval"]["test"]["auc"])


# --------------------------------------------------------------------------- planted


def _small_samples(num_users: int = 40, per_user: int = 60, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = num_users * per_user
    cols = {"user_id": np.repeat(np.arange(num_users), per_user),
            "item_id": rng.integers(0, 20, n), "scenario": np.zeros(n, np.int64),
            "timestamp": rng.integers(0, 100_000, n), "label": rng.integers(0, 2, n)}
    layout = FeatureLayout(num_users=num_users, num_items=20, num_scenarios=1,
                           history_length=2)
    return RankingSamples(cols, np.zeros(n, np.int8), {}, layout)


def test_planted_time_varying_state_is_learned_only_with_the_feature(tmp_path):
    """Each user's state is redrawn at every snapshot; the click rate is 0.9 in state 1
    and 0.1 in state 0 (the state of the latest snapshot before the impression). No ID
    feature or history can know it (no user table; items and history items are
    random): only the snapshot vectors (one-hot of the state) carry it, and only when
    looked up at the right snapshot."""
    from torchrec_mm.metrics.ranking import auc

    rng = np.random.default_rng(0)
    U, S, n = 60, 6, 12_000
    day = 86_400                                              # 100 days: the hour of
    times = np.sort(rng.choice(np.arange(10, 90), S, replace=False)) * day  # day is noise
    state = rng.integers(0, 2, (S + 1, U))                    # state 0: before τ_0
    users, items = rng.integers(0, U, n), rng.integers(0, 40, n)
    ts = rng.integers(0, 100 * day, n)
    s = np.searchsorted(times, ts, side="left")               # 1 + latest τ < t
    label = (rng.random(n) < np.where(state[s, users] == 1, 0.9, 0.1)).astype(np.int8)
    split = np.where(rng.random(n) < 0.8, 0, 1).astype(np.int8)
    layout = FeatureLayout(num_users=U, num_items=40, num_scenarios=1, history_length=1)
    samples = RankingSamples({"user_id": users, "item_id": items,
                              "scenario": np.zeros(n, np.int64), "timestamp": ts,
                              "label": label}, split, {}, layout)
    onehot = torch.eye(2)[torch.from_numpy(state[1:])].reshape(S * U, 1, 2)
    snaps = UserSnapshots(times=torch.from_numpy(times),
                          index=torch.arange(S * U, dtype=torch.int32).reshape(S, U),
                          vectors=onehot)
    path = str(tmp_path / "snaps.safetensors")
    snaps.save(path)

    def fit(plugins):
        torch.manual_seed(0)
        cfg = TrainConfig(data=str(tmp_path), out=str(tmp_path / "r"), plugins=plugins,
                          ranker=RankerConfig(kind="dlrm", embedding_dim=8,
                                              use_user_id=False), history_length=1)
        samples.batch_transforms = []
        model, _ = build_model(cfg, layout, samples)
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        train_rows = samples.rows("train")
        for epoch in range(4):
            perm = np.random.default_rng(epoch).permutation(train_rows)
            for i in range(0, len(perm), 256):
                loss, _ = model(_batch(samples, perm[i:i + 256]))
                opt.zero_grad()
                loss.backward()
                opt.step()
        test = samples.rows("test_warm")
        with torch.no_grad():
            _, (_, logits, labels) = model(_batch(samples, test))
        return auc(logits.numpy(), labels.numpy())

    with_feature = fit(_spec(tmp_path, path))
    without = fit(None)
    # the same vectors one snapshot too late (τ_s >= t: the future) carry no signal,
    # except in the last interval where the shift happens to be right
    shifted = UserSnapshots(times=torch.from_numpy(np.concatenate([[0], times[:-1]])),
                            index=snaps.index, vectors=snaps.vectors)
    shifted.save(path)
    leaky_lookup = fit(_spec(tmp_path, path))
    assert with_feature > 0.8, with_feature
    assert without < 0.6 and leaky_lookup < 0.65, (without, leaky_lookup)
