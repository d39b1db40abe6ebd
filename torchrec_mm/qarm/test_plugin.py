"""The ``qarm`` plugin: code features in the batch, their tables in unmodified
rankers, the CrossNet against a direct computation, fx tracing, bad options."""

import numpy as np
import pytest
import torch

from torchrec_mm.models.rankers import (
    RankerConfig,
    RankerTrain,
    build_collections,
    build_ranker,
    table_configs,
)
from torchrec_mm.plugins import PluginContext, apply_plugins, install_batch_transforms
from torchrec_mm.qarm.codes import QARMCodes, RQConfig, VQConfig, build_codes
from torchrec_mm.qarm.modules import QARMCrossCollection
from torchrec_mm.qarm.plugin import QARMPlugin
from torchrec_mm.testing import random_samples

N_ITEMS, D = 80, 8


@pytest.fixture(scope="module")
def codes() -> QARMCodes:
    g = np.random.default_rng(0)
    centers = g.normal(size=(4, 16))
    reps = centers[np.arange(N_ITEMS) % 4] + 0.3 * g.normal(size=(N_ITEMS, 16))
    has = np.ones(N_ITEMS, dtype=bool)
    has[5] = False  # an item without content: the reserved "no code" rows
    return build_codes(reps.astype(np.float32), has, VQConfig(k=5),
                       RQConfig(levels=3, codebook_size=4), progress=False)


@pytest.fixture(scope="module")
def samples():
    return random_samples(num_interactions=3000, num_users=60, num_items=N_ITEMS,
                          history_length=12, seed=3)


def _model(samples, codes, kind, **options):
    cfg = RankerConfig(kind=kind, embedding_dim=D)
    ctx = PluginContext(layout=samples.layout, ranker=cfg,
                        extras={"qarm_codes": codes, "samples": samples})
    spec = {"plugins": [{"name": "qarm", "options": {"codes": "-", "match_len": 4, **options}}]}
    from torchrec_mm.plugins import parse_spec

    spec = parse_spec(spec)
    plugins = spec.instantiate()
    install_batch_transforms(plugins, samples, ctx)
    torch.manual_seed(0)
    tables = apply_plugins(table_configs(samples.layout, cfg), spec, ctx, plugins)
    coll = apply_plugins(build_collections(samples.layout, cfg, tables), spec, ctx, plugins)
    return build_ranker(samples.layout, cfg, collections=coll)


def _batch(samples, n=64):
    return samples.make_batch(samples.rows("train")[:n], "train")


@pytest.mark.parametrize("kind", ["dlrm", "dlrm_dcn", "target_attention"])
@pytest.mark.parametrize("cross", ["attention", "pooled"])
def test_unmodified_rankers_train_with_codes(samples, codes, kind, cross):
    model = _model(samples, codes, kind, cross=cross, user_vq=True)
    batch = _batch(samples)
    keys = batch.sparse_features.keys()
    assert {"qarm_vq", "qarm_rq", "qarm_hist_rq", "qarm_hist_vq", "qarm_match_l1",
            "qarm_match_l3"} <= set(keys)
    loss, (_, logits, _) = RankerTrain(model)(batch)
    assert logits.shape == (64,) and torch.isfinite(loss)
    loss.backward()
    ebc = model.sparse_arch.embedding_bag_collection if hasattr(model, "sparse_arch") \
        else model.embedding_bag_collection
    inner = ebc.embedding_bag_collection if cross == "attention" else ebc
    for t in ("t_qarm_vq", "t_qarm_rq"):
        w = inner.embedding_bags[t].weight
        assert w.grad is not None and w.grad.abs().sum() > 0, t
    if cross == "attention":
        assert isinstance(ebc, QARMCrossCollection)
        w = ebc.code_collection.embeddings["t_qarm_rq_cross"].weight
        assert w.grad.abs().sum() > 0
        assert ebc.attention[0].mlp[1].weight.grad.abs().sum() > 0


def test_item_without_codes_uses_the_reserved_rows(samples, codes):
    _model(samples, codes, "dlrm")
    rows = np.nonzero(samples.item == 5)[0]
    assert len(rows)
    kjt = samples.make_batch(rows[:3], "all").sparse_features
    vq = kjt["qarm_vq"].values().view(3, -1)
    assert bool((vq == codes.vq_none).all())
    rq = kjt["qarm_rq"].values().view(3, -1)
    L = codes.levels
    assert rq.tolist()[0] == [j * (codes.rq_none + 1) + codes.rq_none for j in range(L)]


def test_cross_net_matches_direct_computation(samples, codes):
    model = _model(samples, codes, "dlrm", cross="attention")
    cross = model.sparse_arch.embedding_bag_collection
    batch = _batch(samples, 32)
    kjt = batch.sparse_features
    kt = cross(kjt).to_dict()
    w = cross.code_collection.embeddings["t_qarm_rq_cross"].weight
    L = codes.levels
    for b in range(32):
        t_codes = kjt["qarm_rq"].to_dense()[b]
        target = w[t_codes].sum(0)
        for lv in range(1, L + 1):
            m = kjt[f"qarm_match_l{lv}"].to_dense()[b]
            items = w[m].view(-1, L, D).sum(1) if len(m) else torch.zeros(0, D)
            n = items.shape[0]
            seq = torch.zeros(1, 4, D)
            seq[0, :n] = items
            mask = torch.arange(4)[None] < n
            ref = cross.attention[lv - 1](target[None], seq, mask)[0]
            torch.testing.assert_close(kt[f"qarm_cross_l{lv}"][b], ref, atol=1e-5, rtol=1e-5)
    # the matched items really share the target's first l codes
    rq = codes.rq
    ids = kjt["item_id"].values()
    hist = kjt["hist_item_id"].to_dense()
    for b in range(32):
        for lv in range(1, L + 1):
            n = int(kjt[f"qarm_match_l{lv}"].lengths()[b]) // L
            cand = [h for h in hist[b].tolist() if bool((rq[h, :lv] == rq[ids[b], :lv]).all())
                    and int(rq[h, 0]) != codes.rq_none]
            assert n == min(len(cand), 4)


def test_fx_trace(samples, codes):
    import torchrec.fx

    model = _model(samples, codes, "target_attention")
    gm = torchrec.fx.symbolic_trace(model)
    batch = _batch(samples)
    with torch.no_grad():
        torch.testing.assert_close(gm(batch.dense_features, batch.sparse_features),
                                   model(batch.dense_features, batch.sparse_features))


def test_bad_options(samples, codes):
    with pytest.raises(ValueError, match="unknown cross"):
        QARMPlugin(cross="mlp")
    with pytest.raises(ValueError, match="levels"):
        _model(samples, codes, "dlrm", levels=9)
    with pytest.raises(ValueError, match="unknown option"):
        QARMPlugin(codebook=3)


@pytest.mark.parametrize("opts,present,absent", [
    ({}, {"qarm_vq", "qarm_rq", "qarm_hist_rq", "qarm_match_l1"}, {"qarm_hist_vq"}),
    ({"use_rq": False, "user_vq": True}, {"qarm_vq", "qarm_hist_vq"},
     {"qarm_rq", "qarm_hist_rq", "qarm_match_l1"}),
    ({"use_vq": False}, {"qarm_rq", "qarm_hist_rq", "qarm_match_l1"}, {"qarm_vq"}),
    ({"cross": "none", "user_len": 0}, {"qarm_vq", "qarm_rq"},
     {"qarm_hist_rq", "qarm_match_l1"}),
])
def test_feature_selection(samples, codes, opts, present, absent):
    model = _model(samples, codes, "dlrm", **opts)
    keys = set(_batch(samples).sparse_features.keys())
    assert present <= keys and not (absent & keys)
    loss, _ = RankerTrain(model)(_batch(samples))
    assert torch.isfinite(loss)
