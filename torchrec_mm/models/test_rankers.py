import pytest
import torch
import torchrec.fx

from torchrec_mm.models.rankers import (
    ITEM_TABLE,
    RankerConfig,
    RankerTrain,
    build_ranker,
    table_configs,
)
from torchrec_mm.models.target_attention import TargetAttention
from torchrec_mm.testing import random_samples


@pytest.fixture(scope="module")
def samples():
    return random_samples(num_interactions=3000, history_length=8, seed=0)


@pytest.mark.parametrize("kind", ["dlrm", "dlrm_dcn", "target_attention"])
def test_forward_and_backward(samples, kind):
    torch.manual_seed(0)
    model = RankerTrain(build_ranker(samples.layout, RankerConfig(kind=kind)))
    batch = samples.make_batch(samples.rows("train")[:32])
    loss, (_, logits, labels) = model(batch)
    assert logits.shape == (32,) and torch.isfinite(loss)
    loss.backward()
    item_weights = [p for n, p in model.named_parameters() if ITEM_TABLE in n]
    assert item_weights and all(p.grad is not None for p in item_weights)


def test_item_table_serves_target_and_history(samples):
    for kind in ("dlrm", "target_attention"):
        tables = table_configs(samples.layout, RankerConfig(kind=kind))
        where, t = tables.find("hist_item_id")
        assert t.name == ITEM_TABLE and "item_id" in t.feature_names
        assert where == ("sequence" if kind == "target_attention" else "pooled")


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown ranker kind"):
        RankerConfig(kind="wide_deep")
    with pytest.raises(ValueError, match="unknown ranker option"):
        RankerConfig.from_dict({"kind": "dlrm", "layers": 3})


def test_target_attention_matches_loop_reference():
    torch.manual_seed(0)
    att = TargetAttention(4, [8])
    B, T, D = 5, 6, 4
    target, seq = torch.randn(B, D), torch.randn(B, T, D)
    lengths = torch.tensor([0, 1, 3, 6, 2])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    out = att(target, seq, mask)
    for b in range(B):
        n = int(lengths[b])
        if n == 0:
            assert torch.allclose(out[b], torch.zeros(D))
            continue
        h = seq[b, :n]
        t = target[b].expand(n, D)
        w = torch.softmax(att.mlp(torch.cat([h, t, h - t, h * t], 1)).squeeze(1), 0)
        assert torch.allclose(out[b], (w[:, None] * h).sum(0), atol=1e-6)


@pytest.mark.parametrize("kind", ["dlrm", "target_attention"])
def test_fx_traceable(samples, kind):
    """TrainPipelineSparseDist traces the model with torchrec.fx."""
    model = build_ranker(samples.layout, RankerConfig(kind=kind))
    gm = torchrec.fx.symbolic_trace(model)
    batch = samples.make_batch(samples.rows("train")[:16])
    torch.testing.assert_close(gm(batch.dense_features, batch.sparse_features),
                               model(batch.dense_features, batch.sparse_features))


def test_builds_on_meta(samples):
    model = build_ranker(samples.layout, RankerConfig(kind="target_attention"),
                         device=torch.device("meta"))
    assert all(p.is_meta for p in model.parameters())
