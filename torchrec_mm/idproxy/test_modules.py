"""IDProxy stage 2 and the ID-slot wrappers: values against direct formulas, gradients,
unmodified rankers end to end, fx tracing, bad input."""

import os

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrec_mm.idproxy.artifacts import Proxies, group_basis, save_proxies
from torchrec_mm.idproxy.modules import (
    FineProxy,
    IDProxyConfig,
    IDProxyEmbeddingBagCollection,
    IDProxyEmbeddingCollection,
)
from torchrec_mm.idproxy.plugin import IDProxyPlugin, train_impression_counts
from torchrec_mm.models.rankers import (
    RankerConfig,
    RankerTrain,
    build_collections,
    build_ranker,
    table_configs,
)
from torchrec_mm.plugins import PluginContext, apply_plugins
from torchrec_mm.testing import random_samples

N_ITEMS, D, G, DC = 40, 8, 3, 6
MODES = ["augment", "swap", "cold_only"]


@pytest.fixture(scope="module")
def samples():
    return random_samples(num_interactions=1500, num_users=50, num_items=N_ITEMS,
                          history_length=6, seed=2)


def _proxies(n=N_ITEMS, d=D, seed=0) -> Proxies:
    g = torch.Generator().manual_seed(seed)
    has = torch.ones(n, dtype=torch.bool)
    has[::7] = False
    return Proxies(p_coarse=torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1),
                   z_groups=torch.randn(n, G, DC, generator=g), has_content=has)


def _cold(n=N_ITEMS) -> torch.Tensor:
    c = torch.zeros(n, dtype=torch.bool)
    c[1::3] = True
    return c


def _batch(samples, n=48):
    rows = samples.rows("train")[:n]
    return samples.make_batch(rows, "train")


def _fine_ref(fp: FineProxy, ids):
    pc = fp.p_coarse[ids]
    z = fp.z_in[ids]
    l1, l2 = fp.adaptor[0], fp.adaptor[2]
    raw = torch.relu(z @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias
    r = torch.sigmoid(torch.cat([pc, raw], 1) @ fp.gate.weight.T + fp.gate.bias)
    return pc, pc @ fp.coarse_map.weight.T + r * raw


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, N_ITEMS - 1), min_size=0, max_size=50), st.integers(0, 3),
       st.sampled_from([0, 2]))
def test_fine_proxy_matches_formula(ids, seed, z_rank):
    # few ids: adaptor over the distinct ids; >= N/2 ids: over the whole catalogue
    p = _proxies(seed=seed)
    torch.manual_seed(seed)
    fp = FineProxy(p.p_coarse, p.z_groups, hidden_dim=16, z_rank=z_rank)
    if z_rank:
        mean, basis = group_basis(p.z_groups, z_rank)
        ref_in = torch.einsum("ngd,gdr->ngr", p.z_groups - mean, basis).flatten(1)
        torch.testing.assert_close(fp.z_in, ref_in)
    else:
        assert torch.equal(fp.z_in, p.z_groups.flatten(1))
    with torch.no_grad():  # move W_c off the identity so it is really tested
        fp.coarse_map.weight.add_(0.1 * torch.randn(D, D))
    ids = torch.tensor(ids, dtype=torch.long)
    pc, pf = fp.proxies(ids)
    rpc, rpf = _fine_ref(fp, ids)
    assert pf.shape == (len(ids), D)
    torch.testing.assert_close(pc, rpc)
    torch.testing.assert_close(pf, rpf)
    torch.testing.assert_close(fp(ids), rpf)


def test_group_basis_is_pca():
    """Orthonormal columns by decreasing variance; they span the planted subspace."""
    g = torch.Generator().manual_seed(0)
    n, d, r = 500, 10, 3
    coords = torch.randn(n, G, r, generator=g) * torch.tensor([5.0, 3.0, 2.0])
    frames = torch.linalg.qr(torch.randn(G, d, d, generator=g))[0][:, :, :r]
    z = torch.einsum("ngr,gdr->ngd", coords, frames) + 0.01 * torch.randn(n, G, d, generator=g)
    mean, basis = group_basis(z + 7.0, r)
    assert basis.shape == (G, d, r)
    torch.testing.assert_close(mean, (z + 7.0).mean(0))
    for j in range(G):
        torch.testing.assert_close(basis[j].T @ basis[j], torch.eye(r), atol=1e-5, rtol=0)
        proj = frames[j] @ frames[j].T  # the planted subspace contains every column
        torch.testing.assert_close(proj @ basis[j], basis[j], atol=1e-2, rtol=0)
        var = ((z[:, j] - z[:, j].mean(0)) @ basis[j]).var(0)
        assert bool((var[:-1] >= var[1:]).all())
    # a stored basis of higher rank is cut to z_rank columns
    fp = FineProxy(torch.randn(n, D), z, z_rank=2, z_mean=mean - 7.0, z_basis=basis)
    assert fp.z_in.shape == (n, G * 2)


def test_fine_proxy_init_identity_and_frozen_buffers():
    p = _proxies()
    fp = FineProxy(p.p_coarse, p.z_groups)
    assert torch.equal(fp.coarse_map.weight, torch.eye(D))
    assert "p_coarse" not in fp.state_dict() and "z_groups" not in fp.state_dict()
    names = {n for n, _ in fp.named_parameters()}
    assert not any("p_coarse" in n or "z_groups" in n for n in names)


def _use_proxy(mode, p, cold):
    if mode == "swap":
        return p.has_content
    if mode == "cold_only":
        return cold & p.has_content
    return torch.zeros_like(p.has_content)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("use_fine", [True, False])
def test_embedding_collection_wrapper(samples, mode, use_fine):
    layout = samples.layout
    cfg = RankerConfig(kind="target_attention", embedding_dim=D)
    torch.manual_seed(0)
    ec = build_collections(layout, cfg).ec
    p, cold = _proxies(), _cold()
    w = IDProxyEmbeddingCollection(ec, p, IDProxyConfig(mode=mode, use_fine=use_fine), cold)
    kjt = _batch(samples).sparse_features
    out = w(kjt)
    inner = ec(kjt)
    assert set(out) == set(inner)
    src = w.source
    mult = (3 if use_fine else 2) if mode == "augment" else 1
    assert {c.name: c.embedding_dim for c in w.embedding_configs()}["t_item_id"] == mult * D
    use = _use_proxy(mode, p, cold)
    for key in ("item_id", "hist_item_id"):
        ids = kjt[key].values()
        e = inner[key].values()
        assert torch.equal(out[key].lengths(), inner[key].lengths())
        mask = p.has_content[ids].float().unsqueeze(1)
        pc = p.p_coarse[ids] * mask
        pf = (_fine_ref(src.fine, ids)[1] * mask) if use_fine else None
        if mode == "augment":
            ref = torch.cat([e, pc] + ([pf] if use_fine else []), 1)
        else:
            prox = pf if use_fine else pc
            ref = torch.where(use[ids].unsqueeze(1), prox, e)
        torch.testing.assert_close(out[key].values(), ref)
    if mode != "augment":  # the ID embedding really is replaced somewhere, kept elsewhere
        ids = kjt["hist_item_id"].values()
        assert use[ids].any() and (~use[ids]).any()
    # gradients reach the adaptor, gate, W_c; not the frozen proxies
    loss = sum(v.values().pow(2).sum() for v in out.values())
    loss.backward()
    if use_fine:
        for prm in (src.fine.adaptor[0].weight, src.fine.gate.weight,
                    src.fine.coarse_map.weight):
            assert prm.grad is not None and prm.grad.abs().sum() > 0
        assert not src.fine.p_coarse.requires_grad and src.fine.p_coarse.grad is None
        assert not src.fine.z_in.requires_grad


def _pooled_ref(ebc, p, src, kjt, mode, use_fine, cold):
    """Straightforward per-sample reference from the ID table's weight."""
    weight = ebc.embedding_bags["t_item_id"].weight
    use = _use_proxy(mode, p, cold)

    def prox(i, kind="replace"):
        pc, pf = p.p_coarse[i] * p.has_content[i], None
        if use_fine:
            pf = _fine_ref(src.fine, torch.tensor([i]))[1][0] * p.has_content[i]
        if kind == "coarse":
            return pc
        if kind == "fine":
            return pf
        return pf if use_fine else pc

    def per_item(i):
        return prox(i) if use[i] else weight[i]

    t = kjt["item_id"].values().tolist()
    h = kjt["hist_item_id"]
    hs = [x.tolist() for x in torch.split(h.values(), h.lengths().tolist())]
    zero = torch.zeros(D)
    out = {}
    if mode in ("augment", "feature"):
        for kind in (["coarse", "fine"] if use_fine else ["coarse"]):
            out[f"item_id_{kind}"] = torch.stack([prox(i, kind) for i in t])
            out[f"hist_item_id_{kind}"] = torch.stack(
                [torch.stack([prox(i, kind) for i in row]).mean(0) if row else zero
                 for row in hs])
    else:
        out["item_id"] = torch.stack([per_item(i) for i in t])
        out["hist_item_id"] = torch.stack(
            [torch.stack([per_item(i) for i in row]).mean(0) if row else zero for row in hs])
    return out


@pytest.mark.parametrize("mode", MODES + ["feature"])
@pytest.mark.parametrize("use_fine", [True, False])
def test_embedding_bag_collection_wrapper(samples, mode, use_fine):
    layout = samples.layout
    cfg = RankerConfig(kind="dlrm", embedding_dim=D)
    torch.manual_seed(0)
    ebc = build_collections(layout, cfg).ebc
    p, cold = _proxies(), _cold()
    w = IDProxyEmbeddingBagCollection(ebc, p, IDProxyConfig(mode=mode, use_fine=use_fine),
                                      cold)
    kjt = _batch(samples).sparse_features
    assert (kjt["hist_item_id"].lengths() == 0).any()  # empty histories are covered
    out = w(kjt).to_dict()
    inner = ebc(kjt).to_dict()
    extra = ([f"{f}_{k}" for f in ("item_id", "hist_item_id")
              for k in (["coarse", "fine"] if use_fine else ["coarse"])]
             if mode in ("augment", "feature") else [])
    assert list(out) == list(inner) + extra
    assert [f for c in w.embedding_bag_configs() for f in c.feature_names] == list(out)
    ref = _pooled_ref(ebc, p, w.source, kjt, mode, use_fine, cold)
    for k, v in out.items():
        if k in ref:
            torch.testing.assert_close(v, ref[k], atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(v, inner[k])
    if mode in ("augment", "feature"):
        torch.testing.assert_close(out["item_id"], inner["item_id"])
        torch.testing.assert_close(out["hist_item_id"], inner["hist_item_id"])
    else:
        assert not torch.allclose(out["hist_item_id"], inner["hist_item_id"])
    loss = sum(v.pow(2).sum() for v in out.values())
    loss.backward()
    if use_fine:
        for prm in (w.source.fine.adaptor[0].weight, w.source.fine.gate.weight,
                    w.source.fine.coarse_map.weight):
            assert prm.grad is not None and prm.grad.abs().sum() > 0
        assert w.source.fine.z_in.grad is None


def _build(samples, kind, mode, tmp_path, **options):
    save_proxies(str(tmp_path / "px"), _proxies())
    spec = {"plugins": [{"name": "idproxy",
                         "options": {"proxies": str(tmp_path / "px"), "mode": mode,
                                     "cold_threshold": 33, "hidden_dim": 16, **options}}]}
    cfg = RankerConfig(kind=kind, embedding_dim=D)
    ctx = PluginContext(layout=samples.layout, ranker=cfg, extras={"samples": samples})
    torch.manual_seed(0)
    tables = apply_plugins(table_configs(samples.layout, cfg), spec, ctx)
    coll = apply_plugins(build_collections(samples.layout, cfg, tables), spec, ctx)
    return build_ranker(samples.layout, cfg, collections=coll)


@pytest.mark.parametrize("kind", ["dlrm", "dlrm_dcn", "target_attention"])
@pytest.mark.parametrize("mode", MODES + ["feature"])
def test_unmodified_rankers_train_with_plugin(samples, tmp_path, kind, mode):
    model = _build(samples, kind, mode, tmp_path)
    wrapped = (model.embedding_collection if kind == "target_attention" and mode != "feature"
               else _ebc_of(model))
    if mode == "feature" and kind == "target_attention":
        # v4: proxies as pooled features; the attention's item slots stay ID-only
        assert type(model.embedding_collection).__name__ == "EmbeddingCollection"
        assert isinstance(wrapped, IDProxyEmbeddingBagCollection)
        assert {"item_id_fine", "hist_item_id_fine"} <= {
            f for c in wrapped.embedding_bag_configs() for f in c.feature_names}
    assert isinstance(wrapped, (IDProxyEmbeddingCollection, IDProxyEmbeddingBagCollection))
    train = RankerTrain(model)
    batch = _batch(samples, 64)
    if mode == "cold_only":  # rare training items are cold: both kinds in the batch
        use = wrapped.source.use_proxy[batch.sparse_features["hist_item_id"].values()]
        assert use.any() and (~use).any()
    loss, (_, logits, _) = train(batch)
    assert logits.shape == (64,) and torch.isfinite(loss)
    loss.backward()
    fine = wrapped.source.fine
    assert fine.adaptor[0].weight.grad.abs().sum() > 0
    # the ID table trains too (in swap: through the items without content)
    if kind == "target_attention" and mode == "feature":
        table = model.embedding_collection.embeddings["t_item_id"]
    elif kind == "target_attention":
        table = wrapped.embedding_collection.embeddings["t_item_id"]
    else:
        table = wrapped.embedding_bag_collection.embedding_bags["t_item_id"]
    assert table.weight.grad is not None and table.weight.grad.abs().sum() > 0


def _ebc_of(model):
    if hasattr(model, "sparse_arch"):
        return model.sparse_arch.embedding_bag_collection
    return model.embedding_bag_collection


def test_feature_mode_is_not_for_the_sequence_table():
    with pytest.raises(ValueError, match="wraps the EmbeddingBagCollection"):
        IDProxyEmbeddingCollection(None, _proxies(), IDProxyConfig(mode="feature"))


def test_fx_trace_target_attention(samples, tmp_path):
    import torchrec.fx

    model = _build(samples, "target_attention", "augment", tmp_path)
    gm = torchrec.fx.symbolic_trace(model)
    batch = _batch(samples)
    with torch.no_grad():
        torch.testing.assert_close(gm(batch.dense_features, batch.sparse_features),
                                   model(batch.dense_features, batch.sparse_features))


def test_build_model_with_yaml_spec(samples, tmp_path):
    from torchrec_mm.training.trainer import TrainConfig, build_model

    save_proxies(str(tmp_path / "px"), _proxies())
    spec = tmp_path / "idproxy.yaml"
    raw = yaml.safe_load(open("plugins/idproxy.yaml"))
    raw["plugins"][0]["options"]["proxies"] = str(tmp_path / "px")
    spec.write_text(yaml.safe_dump(raw))
    cfg = TrainConfig(data="-", out="-", ranker=RankerConfig(kind="dlrm", embedding_dim=D),
                      plugins=str(spec), progress=False)
    model, plugins = build_model(cfg, samples.layout)
    assert isinstance(plugins[0], IDProxyPlugin)
    loss, _ = model(_batch(samples))
    assert torch.isfinite(loss)


def test_cold_mask_counts(samples):
    counts = train_impression_counts(PluginContext(extras={"samples": samples}), N_ITEMS)
    ref = np.zeros(N_ITEMS, dtype=np.int64)
    for i, s in zip(samples.item, samples.split):
        if s == 0:
            ref[i] += 1
    np.testing.assert_array_equal(counts, ref)
    cold_split_items = np.unique(samples.item[samples.split == 2])
    assert len(cold_split_items) and (counts[cold_split_items] == 0).all()
    plugin = IDProxyPlugin(mode="cold_only", cold_threshold=int(np.median(ref)))
    mask = plugin.cold_mask(PluginContext(extras={"samples": samples}), N_ITEMS)
    assert torch.equal(mask, torch.from_numpy(ref < int(np.median(ref))))


def test_bad_input(samples):
    layout = samples.layout
    ec = build_collections(layout, RankerConfig(kind="target_attention", embedding_dim=D)).ec
    with pytest.raises(ValueError, match="t_item_id.*embedding_dim 8"):
        IDProxyEmbeddingCollection(ec, _proxies(d=4), IDProxyConfig())
    ebc = build_collections(layout, RankerConfig(kind="dlrm", embedding_dim=D)).ebc
    with pytest.raises(ValueError, match="t_item_id"):
        IDProxyEmbeddingBagCollection(ebc, _proxies(d=16), IDProxyConfig())
    with pytest.raises(ValueError, match="cover 20 items.*t_item_id"):
        IDProxyEmbeddingBagCollection(ebc, _proxies(n=20), IDProxyConfig())
    with pytest.raises(ValueError, match="cold"):
        IDProxyEmbeddingCollection(ec, _proxies(), IDProxyConfig(mode="cold_only"))
    with pytest.raises(ValueError, match="mode"):
        IDProxyConfig(mode="replace")
    with pytest.raises(ValueError, match="unknown option"):
        IDProxyPlugin(modes="swap")
    # an id beyond the proxies: the wrapper over a larger table than the proxies is
    # refused above, so exercise the runtime check with an inner table larger than N
    big = build_collections(layout.__class__(**{**layout.__dict__, "num_items": 2 * N_ITEMS}),
                            RankerConfig(kind="target_attention", embedding_dim=D)).ec
    w = IDProxyEmbeddingCollection(ec, _proxies(), IDProxyConfig())
    w.embedding_collection = big
    kjt = _batch(samples).sparse_features
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    d = kjt.to_dict()
    item = d["item_id"].values().clone()
    item[5] = N_ITEMS + 3
    keys = kjt.keys()
    values = torch.cat([item if k == "item_id" else d[k].values() for k in keys])
    lengths = torch.cat([d[k].lengths() for k in keys])
    bad = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)
    with pytest.raises(ValueError, match=f"item id {N_ITEMS + 3} of feature 'item_id'.*t_item_id"):
        w(bad)
    with pytest.raises(FileNotFoundError, match="idproxy fit"):
        IDProxyPlugin(proxies="/nonexistent/px").wrap_collections(
            build_collections(layout, RankerConfig(kind="dlrm", embedding_dim=D)),
            PluginContext(layout=layout))


def test_cold_mask_from_dataset_dir(tmp_path):
    """The data-dir path (interactions + split.json) counts like the in-memory index,
    and a relative ``proxies`` path resolves against the dataset's parent."""
    from torchrec_mm.data.batching import RankingSamples
    from torchrec_mm.data.split import make_split
    from torchrec_mm.data.synth import SynthConfig, generate

    data = tmp_path / "data"
    meta = generate(SynthConfig(num_users=40, num_items=60, num_interactions=1200,
                                min_user_interactions=2), str(data))
    make_split(str(data))
    samples = RankingSamples.from_dataset(str(data), history_length=5)
    n = meta.num_items
    from_dir = train_impression_counts(PluginContext(data_dir=str(data)), n)
    from_samples = train_impression_counts(PluginContext(extras={"samples": samples}), n)
    np.testing.assert_array_equal(from_dir, from_samples)
    assert from_dir.sum() == (samples.split == 0).sum() > 0
    save_proxies(str(tmp_path / "px"), _proxies(n=n))
    plugin = IDProxyPlugin(proxies="px", mode="cold_only", cold_threshold=3, hidden_dim=8)
    cfg = RankerConfig(kind="dlrm", embedding_dim=D)
    ctx = PluginContext(data_dir=str(data), layout=samples.layout, ranker=cfg)
    coll = plugin.wrap_collections(build_collections(samples.layout, cfg), ctx)
    has = _proxies(n=n).has_content
    assert torch.equal(coll.ebc.source.use_proxy, torch.from_numpy(from_dir < 3) & has)


def test_fine_proxies_carry_a_planted_signal_to_cold_items():
    """Items' layer-group states encode their latent group (the click signal of
    random_samples); the ranker with v5 proxies in its ID slots must score cold items
    (never seen in training) far better than the ID-only ranker."""
    samples = random_samples(num_interactions=12000, num_users=150, num_items=300,
                             history_length=10, seed=4, cold_frac=0.2)
    # recover random_samples' item groups from its generator (same seed, same draws)
    rng = np.random.default_rng(4)
    rng.integers(0, 8, 150)
    item_group = rng.integers(0, 8, 300)
    g = torch.Generator().manual_seed(0)
    z = torch.zeros(300, G, 8)
    z[torch.arange(300), :, torch.from_numpy(item_group)] = 1.0
    z += 0.1 * torch.randn(300, G, 8, generator=g)
    proxies = Proxies(p_coarse=torch.nn.functional.normalize(torch.randn(300, D, generator=g)),
                      z_groups=z, has_content=torch.ones(300, dtype=torch.bool))
    cold_rows = np.nonzero(samples.split == 2)[0]
    aucs = {}
    for variant in ("base", "v5"):
        cfg = RankerConfig(kind="target_attention", embedding_dim=D)
        torch.manual_seed(0)
        coll = build_collections(samples.layout, cfg)
        if variant == "v5":
            ctx = PluginContext(layout=samples.layout, ranker=cfg,
                                extras={"idproxy_proxies": proxies})
            spec = {"plugins": [{"name": "idproxy", "options": {"proxies": "-",
                                                                "hidden_dim": 16}}]}
            coll = apply_plugins(coll, spec, ctx)
        model = RankerTrain(build_ranker(samples.layout, cfg, collections=coll))
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        train = samples.rows("train")
        order = np.random.default_rng(0).permutation(train)
        for _ in range(2):
            for i in range(0, len(order) - 255, 256):
                loss, _ = model(samples.make_batch(order[i:i + 256], "train"))
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            _, (_, logits, labels) = model(samples.make_batch(cold_rows, "all"))
        from torchrec_mm.metrics.ranking import auc

        aucs[variant] = float(auc(logits, labels))
    assert aucs["v5"] > aucs["base"] + 0.1 and aucs["v5"] > 0.7, aucs


def test_fine_only_features_match_the_fine_keys_of_feature_mode(samples):
    """``feature_parts='fine'``: only the ``_fine`` keys, equal to those of the full
    feature mode (same initialisation)."""
    cfg = RankerConfig(kind="dlrm", embedding_dim=D)
    torch.manual_seed(0)
    ebc = build_collections(samples.layout, cfg).ebc
    kjt = _batch(samples).sparse_features
    outs = {}
    for parts in ("coarse_fine", "fine"):
        torch.manual_seed(1)
        w = IDProxyEmbeddingBagCollection(
            ebc, _proxies(), IDProxyConfig(mode="feature", feature_parts=parts))
        outs[parts] = w(kjt).to_dict()
        assert [f for c in w.embedding_bag_configs() for f in c.feature_names] == \
            list(outs[parts])
    fine = outs["fine"]
    assert [k for k in fine if k.endswith(("_coarse", "_fine"))] == \
        ["item_id_fine", "hist_item_id_fine"]
    for k, v in fine.items():
        torch.testing.assert_close(v, outs["coarse_fine"][k])
    with pytest.raises(ValueError, match="feature_parts"):
        IDProxyConfig(mode="augment", feature_parts="fine")
    with pytest.raises(ValueError, match="feature_parts"):
        IDProxyConfig(mode="feature", use_fine=False, feature_parts="fine")


def test_v4_stage1_in_slots_stage2_as_features(samples, tmp_path):
    """The paper's v4 as a stacked spec: p_coarse in the attention's ID slots (v3) and
    p_fine as ordinary pooled features; both train end to end with the ranker."""
    save_proxies(str(tmp_path / "px"), _proxies())
    px = str(tmp_path / "px")
    spec = {"plugins": [
        {"name": "idproxy", "options": {"proxies": px, "use_fine": False}},
        {"name": "idproxy", "options": {"proxies": px, "mode": "feature",
                                        "feature_parts": "fine", "hidden_dim": 16}}]}
    cfg = RankerConfig(kind="target_attention", embedding_dim=D)
    ctx = PluginContext(layout=samples.layout, ranker=cfg, extras={"samples": samples})
    torch.manual_seed(0)
    tables = apply_plugins(table_configs(samples.layout, cfg), spec, ctx)
    model = build_ranker(samples.layout, cfg, collections=apply_plugins(
        build_collections(samples.layout, cfg, tables), spec, ctx))
    ec, ebc = model.embedding_collection, _ebc_of(model)
    assert isinstance(ec, IDProxyEmbeddingCollection) and ec.source.fine is None
    assert isinstance(ebc, IDProxyEmbeddingBagCollection) and ebc.source.fine is not None
    assert ebc.extra_keys == ["item_id_fine", "hist_item_id_fine"]
    loss, _ = RankerTrain(model)(_batch(samples, 64))
    loss.backward()
    assert ebc.source.fine.adaptor[0].weight.grad.abs().sum() > 0
    assert ec.embedding_collection.embeddings["t_item_id"].weight.grad.abs().sum() > 0


def _assert_same_output(b, a, **tol):
    """Two wrappers' outputs agree: the EC wrapper's dicts of JaggedTensors key by key,
    the EBC wrapper's KeyedTensors as a whole."""
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            torch.testing.assert_close(b[k].values(), a[k].values(), **tol)
    else:
        assert a.keys() == b.keys()
        torch.testing.assert_close(b.values(), a.values(), **tol)


def _trained_wrapper(samples, kind):
    """(inner collection, wrapper class, proxies, wrapper of the inner collection whose
    adaptor is moved away from its identity-like init, as a trained one would be)."""
    cfg = RankerConfig(kind=kind, embedding_dim=D)
    torch.manual_seed(0)
    cols = build_collections(samples.layout, cfg)
    inner = cols.ec if kind == "target_attention" else cols.ebc
    wrap = IDProxyEmbeddingCollection if kind == "target_attention" else \
        IDProxyEmbeddingBagCollection
    p = _proxies()
    live = wrap(inner, p, IDProxyConfig(z_rank=4))
    with torch.no_grad():
        for m in (live.source.fine.adaptor, live.source.fine.gate, live.source.fine.coarse_map):
            for prm in m.parameters():
                prm.add_(0.3 * torch.randn_like(prm))
    return inner, wrap, p, live


@pytest.mark.parametrize("kind", ["dlrm", "target_attention"])
def test_stored_fine_proxies_equal_the_live_adaptor(samples, tmp_path, kind):
    """``fine_run``: p_fine of every item computed once by the run's adaptor (read from
    the run's checkpoint) and served from a frozen table gives the wrappers' outputs of
    the live adaptor, with no trainable proxy parameter."""
    from torchrec_mm.training.checkpoint import save_checkpoint

    inner, wrap, p, live = _trained_wrapper(samples, kind)
    # the run's checkpoint, as the trainer writes it (the basis is not in it: this
    # artefact has none, so the loader recomputes it from the catalogue as the run did)
    run = str(tmp_path / "v5")
    save_checkpoint(os.path.join(run, "checkpoints"), 3,
                    {"model": {f"model.ec.{k}": v for k, v in live.state_dict().items()}})
    stored = wrap(inner, p, IDProxyConfig(z_rank=4, fine_run=run))
    assert stored.source.fine is None and stored.source.width == 2 * D
    assert not any(prm.requires_grad for prm in stored.source.parameters())
    kjt = _batch(samples).sparse_features
    with torch.no_grad():
        _assert_same_output(stored(kjt), live(kjt), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="fine_run"):
        IDProxyConfig(fine_run="runs/v5", store="items.db")


@pytest.mark.parametrize("kind", ["dlrm", "target_attention"])
def test_history_grad_false_trains_the_adaptor_on_the_targets_only(samples, kind):
    """``history_grad: false``: the same outputs as the paper's joint stage 2, and the
    adaptor's gradient is exactly the one its target items' p_fine give — what the
    history slots read is a constant of the step."""
    inner, wrap, p, full = _trained_wrapper(samples, kind)
    split = wrap(inner, p, IDProxyConfig(z_rank=4, history_grad=False))
    split.source.fine.load_state_dict(full.source.fine.state_dict())
    kjt = _batch(samples).sparse_features
    g = torch.Generator().manual_seed(1)

    def fine_parts(out):
        """(target p_fine, history p_fine) of the wrapper's output."""
        if kind == "target_attention":
            return (out["item_id"].values()[:, 2 * D:], out["hist_item_id"].values()[:, 2 * D:])
        return out["item_id_fine"], out["hist_item_id_fine"]

    a, b = full(kjt), split(kjt)
    _assert_same_output(b, a)
    if kind != "target_attention":
        a, b = a.to_dict(), b.to_dict()
    t_a, h_a = fine_parts(a)
    t_b, h_b = fine_parts(b)
    w_t, w_h = torch.randn(t_a.shape, generator=g), torch.randn(h_a.shape, generator=g)
    ((t_b * w_t).sum() + (h_b * w_h).sum()).backward()
    # reference: the joint model's gradient from the target slots alone ...
    (t_a * w_t).sum().backward(retain_graph=True)
    params = {n: q for n, q in full.source.fine.named_parameters() if q.requires_grad}
    assert len(params) == 7  # φ̃: 2 weights, 2 biases; W_g and its bias; W_c
    for name, prm in split.source.fine.named_parameters():
        if prm.requires_grad:
            assert prm.grad is not None, name
            torch.testing.assert_close(prm.grad, params[name].grad, msg=name)
    # ... which is not what the history slots add in the joint model
    before = {n: q.grad.clone() for n, q in params.items()}
    (h_a * w_h).sum().backward()
    assert all(not torch.allclose(before[n], q.grad) for n, q in params.items())
    with pytest.raises(ValueError, match="history_grad false"):
        IDProxyConfig(mode="swap", history_grad=False)
    with pytest.raises(ValueError, match="history_grad false"):
        IDProxyConfig(use_fine=False, history_grad=False)


@pytest.mark.parametrize("kind", ["dlrm", "target_attention"])
def test_history_cache_serves_the_adaptor_of_its_last_write(samples, kind):
    """``history_refresh: k``: right after a write of the history cache the wrapper's
    outputs and the adaptor's gradient are those of ``history_grad: false`` (the
    history read without gradient, the targets live); between writes the history
    slots keep the adaptor of the last write while the targets follow the live one;
    the cache is rewritten every k training forwards and before an evaluation that
    follows training."""
    inner, wrap, p, full = _trained_wrapper(samples, kind)
    ref = wrap(inner, p, IDProxyConfig(z_rank=4, history_grad=False))
    cached = wrap(inner, p, IDProxyConfig(z_rank=4, history_grad=False, history_refresh=2))
    trained = {k: v for k, v in full.source.fine.state_dict().items()
               if not k.startswith("inputs.")}  # the adaptor, not the frozen inputs
    for m in (ref, cached):
        m.source.fine.load_state_dict(trained, strict=False)
    tables = {n: q for n, q in cached.source.named_parameters() if "t_idproxy_" in n}
    assert any("t_idproxy_history" in n for n in tables)
    assert not any(q.requires_grad for q in tables.values())
    kjt = _batch(samples).sparse_features
    g = torch.Generator().manual_seed(1)

    def parts(out):
        """(target slots, history slots) [.., 3d] / the four proxy keys, as tensors."""
        if kind == "target_attention":
            return out["item_id"].values(), out["hist_item_id"].values()
        d = out.to_dict()
        return (torch.cat([d["item_id_coarse"], d["item_id_fine"]], 1),
                torch.cat([d["hist_item_id_coarse"], d["hist_item_id_fine"]], 1))

    def perturb():
        with torch.no_grad():
            for m in (ref, cached):
                for prm in m.source.fine.adaptor.parameters():
                    prm.add_(0.2 * torch.randn(prm.shape, generator=torch.Generator()
                                               .manual_seed(prm.numel())))

    # forward 1 writes the cache: outputs and gradients of history_grad false
    t_a, h_a = parts(ref(kjt))
    t_b, h_b = parts(cached(kjt))
    torch.testing.assert_close(t_b, t_a)
    torch.testing.assert_close(h_b, h_a, atol=1e-5, rtol=1e-5)
    w_t, w_h = torch.randn(t_a.shape, generator=g), torch.randn(h_a.shape, generator=g)
    ((t_a * w_t).sum() + (h_a * w_h).sum()).backward()
    ((t_b * w_t).sum() + (h_b * w_h).sum()).backward()
    grads = {n: q.grad for n, q in cached.source.fine.named_parameters() if q.requires_grad}
    assert len(grads) == 7
    for name, q_a in ref.source.fine.named_parameters():
        if q_a.requires_grad:
            torch.testing.assert_close(grads[name], q_a.grad, msg=name)
    # forward 2 (one training forward since the write): the history is stale
    old_h = h_b.detach()
    perturb()
    t_a, h_a = parts(ref(kjt))
    t_b, h_b = parts(cached(kjt))
    torch.testing.assert_close(t_b, t_a)
    torch.testing.assert_close(h_b, old_h)
    assert (h_b - h_a).abs().max() > 1e-3
    # forward 3 (k = 2 since the write): rewritten
    t_b, h_b = parts(cached(kjt))
    torch.testing.assert_close(h_b, h_a, atol=1e-5, rtol=1e-5)
    # an evaluation after training forwards rewrites it first
    perturb()
    cached(kjt)
    cached.eval()
    ref.eval()
    with torch.no_grad():
        t_a, h_a = parts(ref(kjt))
        t_b, h_b = parts(cached(kjt))
    torch.testing.assert_close(t_b, t_a)
    torch.testing.assert_close(h_b, h_a, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="history_refresh"):
        IDProxyConfig(history_refresh=10)  # history_grad true
    with pytest.raises(ValueError, match="history_refresh"):
        IDProxyConfig(history_grad=False, history_refresh=-1)


@pytest.mark.parametrize("kind", ["dlrm", "target_attention"])
def test_fx_trace_does_not_write_the_history_cache(samples, tmp_path, kind):
    """TrainPipelineSparseDist traces the model: tracing must record the history
    cache's write (a training forward of its schedule, with collectives when sharded)
    as a call, not run it; the traced model then writes it as the model does."""
    import torchrec.fx

    model = _build(samples, kind, "augment", tmp_path, history_grad=False, history_refresh=2)
    source = next(m for m in model.modules() if hasattr(m, "write_history_cache"))
    gm = torchrec.fx.symbolic_trace(model)
    assert int(source.cache_age) == -1
    batch = _batch(samples)
    with torch.no_grad():
        got = gm(batch.dense_features, batch.sparse_features)
        assert int(source.cache_age) == 1
        torch.testing.assert_close(got, model(batch.dense_features, batch.sparse_features))


@pytest.mark.parametrize("kind", ["dlrm", "target_attention"])
def test_history_cache_resumes_on_its_schedule(samples, kind):
    """The cache and its age are in the state dict: a wrapper restored from it between
    writes serves the same stale history and rewrites it at the same forward as the
    wrapper that kept running (a resumed run equals the uninterrupted one)."""
    inner, wrap, p, _ = _trained_wrapper(samples, kind)
    config = IDProxyConfig(z_rank=4, history_grad=False, history_refresh=3)
    run = wrap(inner, p, config)
    kjt = _batch(samples).sparse_features
    adaptor = run.source.fine.adaptor[0].weight

    def step(m):
        out = m(kjt)
        with torch.no_grad():  # what an optimizer step would do to the adaptor
            m.source.fine.adaptor[0].weight.add_(0.05)
        return out

    for _ in range(2):
        step(run)
    resumed = wrap(inner, p, config)
    resumed.load_state_dict(run.state_dict())
    assert int(resumed.source.cache_age) == 2
    torch.testing.assert_close(resumed.source.fine.adaptor[0].weight, adaptor)
    for _ in range(3):  # stale, rewritten (age 3), stale
        _assert_same_output(step(resumed), step(run))
