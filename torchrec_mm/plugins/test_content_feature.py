import pytest
import torch

from torchrec_mm.models.rankers import RankerConfig, build_collections, build_ranker
from torchrec_mm.plugins import PluginContext, apply_plugins, parse_spec
from torchrec_mm.plugins.content_feature import ContentFeatureCollection
from torchrec_mm.testing import random_samples


@pytest.fixture(scope="module")
def samples():
    return random_samples(num_interactions=3000, num_items=200, history_length=6, seed=0)


def test_collection_appends_projected_content(samples):
    cfg = RankerConfig(kind="dlrm", embedding_dim=8)
    ebc = build_collections(samples.layout, cfg).ebc
    content = torch.randn(samples.layout.num_items, 5)
    wrapped = ContentFeatureCollection(ebc, content, 8)
    b = samples.make_batch(samples.rows("test")[:20], "all")
    kt = wrapped(b.sparse_features)
    inner = ebc(b.sparse_features)
    assert kt.keys() == inner.keys() + ["item_content", "hist_item_content"]
    d = kt.to_dict()
    torch.testing.assert_close(d["user_id"], inner.to_dict()["user_id"])
    torch.testing.assert_close(d["item_content"], wrapped.projection(content[b.item_ids]))
    hist = b.sparse_features["hist_item_id"]
    offsets = hist.offsets()
    for i in range(20):
        ids = hist.values()[offsets[i]:offsets[i + 1]]
        mean = content[ids].mean(0) if len(ids) else torch.zeros(5)
        torch.testing.assert_close(d["hist_item_content"][i], wrapped.projection(mean))
    names = [f for c in wrapped.embedding_bag_configs() for f in c.feature_names]
    assert names[-2:] == ["item_content", "hist_item_content"]


@pytest.mark.parametrize("kind", ["dlrm", "dlrm_dcn", "target_attention"])
def test_plugin_with_unmodified_rankers(samples, kind, tmp_path, monkeypatch):
    from torchrec_mm.content import store as store_mod

    content = torch.randn(samples.layout.num_items, 6)

    class FakeStore:
        def __init__(self, path):
            assert path.endswith("content")

        def contains(self, ids):
            return torch.as_tensor(ids) % 10 != 0  # every 10th item has no content

        def get(self, ids, field="pooled"):
            return content[torch.as_tensor(ids)]

    monkeypatch.setattr(store_mod, "ContentStore", FakeStore)
    cfg = RankerConfig(kind=kind, embedding_dim=8)
    spec = parse_spec({"plugins": [{"name": "content_feature",
                                    "options": {"store": str(tmp_path / "content")}}]})
    ctx = PluginContext(layout=samples.layout, ranker=cfg)
    cols = apply_plugins(build_collections(samples.layout, cfg), spec, ctx)
    assert isinstance(cols.ebc, ContentFeatureCollection)
    assert torch.all(cols.ebc.content[::10] == 0)  # missing content -> zeros
    model = build_ranker(samples.layout, cfg, collections=cols)
    b = samples.make_batch(samples.rows("train")[:16])
    out = model(b.dense_features, b.sparse_features)
    assert out.shape == (16, 1)
    out.sum().backward()
    assert cols.ebc.projection.weight.grad.abs().sum() > 0
    spec_err = parse_spec({"plugins": [{"name": "content_feature", "options": {
        "store": str(tmp_path / "content"), "missing": "error"}}]})
    with pytest.raises(ValueError, match="no content for item 0"):
        apply_plugins(build_collections(samples.layout, cfg), spec_err, ctx)
