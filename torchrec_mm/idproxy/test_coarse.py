"""Tests of IDProxy stage 1: the alignment loss, recall@K, planted-signal recovery with
MiniLM, resume, the artefact and the CLI."""

import argparse
import itertools
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrec_mm.idproxy.artifacts import load_proxies
from torchrec_mm.idproxy.coarse import (
    CoarseFitConfig,
    ProxyHead,
    _length_bucketed_batches,
    fit_coarse,
    format_metrics,
    proxy_alignment_loss,
    recall_at_k,
)
from torchrec_mm.idproxy.targets import make_targets
from torchrec_mm.idproxy.test_targets import make_data_and_run

os.environ.setdefault("HF_HUB_OFFLINE", "1")
EMPTY_ITEM = 7  # its text is blanked in the fixture


@pytest.fixture(scope="module")
def data_run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("idproxy_coarse"))
    data, run = make_data_and_run(root)
    path = os.path.join(data, "items.parquet")
    table = pq.read_table(path)
    texts = table.column("text").to_pylist()
    texts[EMPTY_ITEM] = ""
    table = table.set_column(table.schema.get_field_index("text"), table.schema.field("text"),
                             [texts])
    pq.write_table(table, path)
    return data, run


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from torchrec_mm.content.testing import build_tiny_llama

    return build_tiny_llama(str(tmp_path_factory.mktemp("tiny") / "llama"), num_layers=2)


def planted_targets(data: str, dim: int = 16, noise: float = 0.1):
    """ID embeddings = a fixed random linear map of the items' planted topics."""
    from torchrec_mm.data.synth import SynthTruth

    topic = torch.from_numpy(SynthTruth.load(data).item_topic)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(int(topic.max()) + 1, dim, generator=g)
    table = w[topic] + noise * torch.randn(len(topic), dim, generator=g)
    return make_targets(table, np.full(len(topic), 10), tau=5, name="planted")


# ------------------------------------------------------------------- unit tests


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 12), d=st.integers(1, 8), temp=st.floats(0.02, 2.0),
       seed=st.integers(0, 10**6))
def test_alignment_loss_matches_loop(b, d, temp, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    e = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    ref = 0.0
    for i in range(b):
        num = torch.exp(h[i] @ e[i] / temp)
        den = sum(torch.exp(h[i] @ e[j] / temp) for j in range(b))
        ref += -torch.log(num / den)
    ref /= b
    torch.testing.assert_close(proxy_alignment_loss(h, e, temp), ref)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 20), m=st.integers(1, 60), d=st.integers(1, 6),
       seed=st.integers(0, 10**6))
def test_recall_matches_bruteforce(n, m, d, seed):
    rng = np.random.default_rng(seed)
    targets = torch.from_numpy(rng.normal(size=(m, d)).astype(np.float32))
    proxies = torch.from_numpy(rng.normal(size=(n, d)).astype(np.float32))
    own = torch.from_numpy(rng.integers(0, m, size=n))
    scores = (proxies.double() @ targets.double().T).numpy()
    own_score = scores[np.arange(n), own.numpy()]
    rank = (scores > own_score[:, None] + 1e-4).sum(1)  # targets strictly closer
    # faiss orders (near-)ties arbitrarily: compare on rows without them
    clear = (np.abs(scores - own_score[:, None]) <= 1e-4).sum(1) == 1
    if not clear.any():
        return
    idx = torch.from_numpy(np.nonzero(clear)[0])
    got = recall_at_k(proxies[idx], own[idx], targets, (1, 3, 10))
    for k in (1, 3, 10):
        assert got[f"recall@{k}"] == pytest.approx(float((rank[clear] < k).mean()))


def test_proxy_head_unit_norm():
    head = ProxyHead(12, 5, hidden=7)
    out = head(torch.randn(4, 12))
    assert out.shape == (4, 5)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(4))


def test_length_bucketed_batches():
    lengths = np.random.default_rng(0).integers(5, 60, size=101)
    b1 = _length_bucketed_batches(lengths, 8, np.random.default_rng(3), pool=4)
    b2 = _length_bucketed_batches(lengths, 8, np.random.default_rng(3), pool=4)
    assert all(np.array_equal(x, y) for x, y in zip(b1, b2))
    flat = np.concatenate(b1)
    assert len(flat) == len(set(flat.tolist())) and len(flat) >= 100  # <= 1 singleton dropped
    assert all(2 <= len(b) <= 8 for b in b1)
    # pools are sorted by length: within-batch spread is below the global spread
    spread = np.mean([np.ptp(lengths[b]) for b in b1])
    assert spread < 0.5 * np.ptp(lengths)


def test_config_validation():
    with pytest.raises(ValueError, match="temperature"):
        CoarseFitConfig(temperature=0)
    with pytest.raises(ValueError, match="holdout_frac"):
        CoarseFitConfig(holdout_frac=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        CoarseFitConfig(batch_size=1)


# ---------------------------------------------------------------- planted signal


def test_planted_signal_minilm_and_artifact(data_run, tmp_path):
    """ID embeddings are a linear map of the planted topics, which the texts carry:
    the fit must raise held-out recall@10 far above the epoch-0 baseline and chance.
    The artefact has one row per dataset item, cold items included."""
    from torchrec_mm.data.split import load_split

    data, _ = data_run
    targets = planted_targets(data)
    out = str(tmp_path / "proxies")
    cfg = CoarseFitConfig(trainable_layers=1, epochs=2, batch_size=32, lr_head=5e-3,
                          holdout_frac=0.3, max_length=32, hidden=128, group_sample=16)
    m = fit_coarse(data, None, out, cfg, progress=False, targets=targets)
    base, final, chance = m["baseline"]["recall@10"], m["final"]["recall@10"], \
        m["chance"]["recall@10"]
    assert final >= 0.15 and final >= base + 0.1 and final >= 4 * chance, format_metrics(m)
    assert m["epochs"][2]["loss"] < m["epochs"][1]["loss"]
    assert m["num_train"] + m["num_holdout"] == 299  # the empty-text target is skipped

    px = load_proxies(out)
    assert px.num_items == 300 and px.dim == 16
    assert px.z_groups.shape == (300, 3, 384)
    assert not bool(px.has_content[EMPTY_ITEM]) and int(px.has_content.sum()) == 299
    assert float(px.p_coarse[EMPTY_ITEM].abs().sum()) == 0.0
    content = px.has_content
    torch.testing.assert_close(px.p_coarse[content].norm(dim=1), torch.ones(299))
    cold = load_split(data).cold_items
    assert len(cold) > 0 and bool(px.has_content[cold].all())
    assert bool(torch.isfinite(px.z_groups).all())
    assert px.meta["tau"] == 5 and px.meta["temperature"] == 0.07
    assert px.meta["metrics"]["final"]["recall@10"] == final
    with open(os.path.join(out, "fit_metrics.json")) as f:
        assert json.load(f)["final"]["recall@10"] == final
    assert m["layer_groups"] and len(m["layer_groups"]) == 3


# ------------------------------------------------------------------------ resume


def test_resume_matches_uninterrupted(data_run, tiny_llama, tmp_path):
    data, _ = data_run
    targets = planted_targets(data)
    cfg = CoarseFitConfig(model_path=tiny_llama, trainable_layers=-1, epochs=2, batch_size=32,
                          lr_encoder=1e-3, max_length=64, hidden=32, group_sample=8)
    full = fit_coarse(data, None, str(tmp_path / "a"), cfg, progress=False, targets=targets)
    assert full["epochs_run_this_call"] == 2 and full["complete"]

    out = str(tmp_path / "b")
    part = fit_coarse(data, None, out, cfg, progress=False, targets=targets,
                      max_epochs_this_call=1)
    assert part["epochs_run_this_call"] == 1 and not part["complete"]
    assert not os.path.exists(os.path.join(out, "proxies.json"))
    assert os.path.exists(os.path.join(out, "fit_state", "LATEST"))
    resumed = fit_coarse(data, None, out, cfg, progress=False, targets=targets)
    assert resumed["epochs_run_this_call"] == 1 and resumed["complete"]
    assert [e["epoch"] for e in resumed["epochs"]] == [0, 1, 2]
    for a, b in zip(full["epochs"], resumed["epochs"]):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (k, a, b)
    pa, pb = load_proxies(str(tmp_path / "a")), load_proxies(out)
    torch.testing.assert_close(pa.p_coarse, pb.p_coarse, rtol=1e-4, atol=1e-5)
    # the trained model reloads and reproduces the stored proxies from raw text
    from torchrec_mm.content.encode_job import read_items
    from torchrec_mm.idproxy.coarse import load_coarse_model

    model = load_coarse_model(out)
    texts = read_items(data).texts
    rows = [0, 1, 2, 100, 299]
    with torch.no_grad():
        p = model.head(model.encoder.encode_texts([texts[i] for i in rows]).pooled)
    torch.testing.assert_close(p, pb.p_coarse[rows], rtol=1e-4, atol=1e-5)
    # a finished fit re-run trains nothing
    again = fit_coarse(data, None, out, cfg, progress=False, targets=targets)
    assert again["epochs_run_this_call"] == 0
    # other settings in the same directory: refused
    with pytest.raises(FileExistsError, match="other settings"):
        fit_coarse(data, None, out, CoarseFitConfig(**{**cfg.to_dict(), "temperature": 0.5}),
                   progress=False, targets=targets)


def test_proxies_come_from_the_best_epoch(data_run, tiny_llama, tmp_path, monkeypatch):
    """select_best: held-out recall peaks at epoch 1 of 2 (a scripted recall) -> the
    artefact and the reloadable model are those of a 1-epoch fit; --last-epoch keeps
    epoch 2."""
    import torchrec_mm.idproxy.coarse as coarse

    data, _ = data_run
    targets = planted_targets(data)
    cfg = CoarseFitConfig(model_path=tiny_llama, trainable_layers=-1, epochs=2, batch_size=32,
                          lr_encoder=1e-3, max_length=64, hidden=32, group_sample=8)
    scripted = itertools.cycle([0.1, 0.9, 0.2])  # epochs 0, 1, 2 of each fit
    monkeypatch.setattr(coarse, "recall_at_k", lambda h, own, t, ks: {
        f"recall@{k}": next(scripted) if k == max(ks) else 0.0 for k in ks})
    best = fit_coarse(data, None, str(tmp_path / "best"), cfg, progress=False, targets=targets)
    last = fit_coarse(data, None, str(tmp_path / "last"),
                      CoarseFitConfig(**{**cfg.to_dict(), "select_best": False}),
                      progress=False, targets=targets)
    fit_coarse(data, None, str(tmp_path / "one"),
               CoarseFitConfig(**{**cfg.to_dict(), "epochs": 1}), progress=False,
               targets=targets)
    assert best["selected_epoch"] == 1 and best["final"]["epoch"] == 1
    assert last["selected_epoch"] == 2
    p_best, p_last, p_one = (load_proxies(str(tmp_path / n)).p_coarse
                             for n in ("best", "last", "one"))
    torch.testing.assert_close(p_best, p_one, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(p_best, p_last, atol=1e-3)
    from torchrec_mm.content.encode_job import read_items

    model = coarse.load_coarse_model(str(tmp_path / "best"))
    texts = read_items(data).texts
    with torch.no_grad():
        p = model.head(model.encoder.encode_texts([texts[i] for i in (0, 5, 200)]).pooled)
    torch.testing.assert_close(p, p_best[[0, 5, 200]], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- CLI


def test_cli_fit_end_to_end(data_run, tiny_llama, tmp_path, capsys):
    from torchrec_mm.idproxy.cli import register

    data, run = data_run
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    out = str(tmp_path / "px")
    args = parser.parse_args(["idproxy", "fit", "--data", data, "--run", run, "--out", out,
                              "--model", tiny_llama, "--epochs", "1", "--batch-size", "32",
                              "--tau", "3", "--trainable-layers", "1", "--no-progress"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "epoch 0: (before training)" in text and "epoch 1: loss" in text
    px = load_proxies(out)
    assert px.num_items == 300 and px.dim == 16  # the ranker's embedding dim
    assert px.meta["tau"] == 3 and px.meta["source_run"] == os.path.abspath(run)
    assert px.meta["table"].endswith("t_item_id.weight")
    with pytest.raises(SystemExit):
        args = parser.parse_args(["idproxy", "fit", "--data", data, "--out", out])
        args.func(args)


def test_generator_matches_artifact_and_ranker(data_run, tiny_llama, tmp_path):
    """New-item generation from raw text reproduces the artefact's p_coarse and the
    trained ranker's p_fine for the same items."""
    import yaml

    from torchrec_mm.data.io import load_items
    from torchrec_mm.idproxy.generate import ProxyGenerator, load_fine_weights
    from torchrec_mm.idproxy.modules import FineProxy
    from torchrec_mm.training.trainer import TrainConfig, train

    data, run = data_run
    out = str(tmp_path / "px")
    fit_coarse(data, run, out, CoarseFitConfig(model_path=tiny_llama, trainable_layers=1,
                                               epochs=1, batch_size=32, max_length=32,
                                               basis_rank=4), progress=False)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"plugins": [{"name": "idproxy", "options": {
        "proxies": out, "z_rank": 3, "hidden_dim": 8}}]}))
    run2 = str(tmp_path / "run_v5")
    cfg = TrainConfig(data=data, out=run2, world_size=1, epochs=1, max_steps=3, batch_size=64,
                      history_length=10, progress=False, evaluate=False, plugins=str(spec))
    train(cfg)
    gen = ProxyGenerator.load(out, run=run2, batch_size=16)
    assert gen.fine is not None and gen.fine.z_rank == 3
    items = load_items(data)
    ids = [3, 50, 299]
    texts = [items.column("text").to_pylist()[i] for i in ids]
    g = gen.generate(texts)
    px = load_proxies(out)
    torch.testing.assert_close(g.p_coarse, px.p_coarse[ids], atol=1e-4, rtol=0)
    torch.testing.assert_close(g.z_groups, px.z_groups[ids], atol=2e-2, rtol=0)  # fp16 store
    # the ranker's fine proxy (buffers of every item) with the run's trained weights
    fine = FineProxy(px.p_coarse, px.z_groups, 8, z_rank=3, z_mean=px.z_mean,
                     z_basis=px.z_basis)
    fine.load_state_dict(load_fine_weights(run2))
    with torch.no_grad():
        _, ref = fine.proxies(torch.tensor(ids))
    assert not torch.allclose(ref, px.p_coarse[ids], atol=1e-3)  # the adaptor is trained
    torch.testing.assert_close(g.p_fine, ref, atol=5e-3, rtol=0)

    # continual training with stored proxies (fine_run): the run's p_fine as a frozen
    # table in the ID slots; only the ranker trains
    from torchrec_mm.data.batching import RankingSamples
    from torchrec_mm.idproxy.modules import IDProxyEmbeddingCollection
    from torchrec_mm.models.rankers import (RankerConfig, RankerTrain, build_collections,
                                            build_ranker, table_configs)
    from torchrec_mm.plugins import PluginContext, apply_plugins, parse_spec

    samples = RankingSamples.from_dataset(data, history_length=10)
    rcfg = RankerConfig(kind="target_attention", embedding_dim=px.dim)
    stored = parse_spec({"plugins": [{"name": "idproxy", "options": {
        "proxies": out, "fine_run": run2}}]})
    ctx = PluginContext(layout=samples.layout, ranker=rcfg, data_dir=data)
    tables = apply_plugins(table_configs(samples.layout, rcfg), stored, ctx)
    model = build_ranker(samples.layout, rcfg, collections=apply_plugins(
        build_collections(samples.layout, rcfg, tables), stored, ctx))
    ec = model.embedding_collection
    assert isinstance(ec, IDProxyEmbeddingCollection) and ec.source.fine is None
    _, (pc, pf), present = ec.source.slot_tables(torch.tensor(ids))
    assert present.all()
    torch.testing.assert_close(pc, px.p_coarse[ids])
    torch.testing.assert_close(pf, ref, atol=1e-5, rtol=0)
    assert not any("idproxy" in n for n, p in model.named_parameters() if p.requires_grad)
    batch = samples.make_batch(samples.rows("train")[:32])
    loss, _ = RankerTrain(model)(batch)
    loss.backward()
    assert ec.embedding_collection.embeddings["t_item_id"].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="fine_run"):
        apply_plugins(build_collections(samples.layout, rcfg, tables), parse_spec(
            {"plugins": [{"name": "idproxy", "options": {
                "proxies": out, "fine_run": run2, "use_fine": False}}]}), ctx)
