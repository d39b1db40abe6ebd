import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torchrec.fx

from torchrec_mm.models.rankers import (
    ITEM_TABLE,
    RankerConfig,
    RankerTrain,
    build_ranker,
    table_configs,
)
from torchrec_mm.models.target_attention import TargetAttention, probe_attention
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


def _din_reference(att, target, seq_rows, lengths, max_len):
    """Per-sample DIN attention with the concatenated [h, t, h - t, h * t] input."""
    out, start = [], 0
    for b, n in enumerate(lengths.tolist()):
        h = seq_rows[start:start + n][:max_len]
        start += n
        if h.shape[0] == 0:
            out.append(torch.zeros(target.shape[1]))
            continue
        t = target[b].expand_as(h)
        w = torch.softmax(att.mlp(torch.cat([h, t, h - t, h * t], 1)).squeeze(1), 0)
        out.append((w[:, None] * h).sum(0))
    return torch.stack(out)


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(0, 9), min_size=1, max_size=6),
       max_len=st.integers(1, 10), dim=st.sampled_from([2, 4, 6]), seed=st.integers(0, 99))
def test_target_attention_matches_concat_reference(lengths, max_len, dim, seed):
    """The expanded first layer (padded and jagged forms) gives the concatenated-input
    DIN unit's outputs and gradients, incl. empty rows and rows cut to max_len."""
    torch.manual_seed(seed)
    att = TargetAttention(dim, [8, 4])
    lengths = torch.tensor(lengths)
    target = torch.randn(len(lengths), dim, requires_grad=True)
    rows = torch.randn(int(lengths.sum()), dim, requires_grad=True)
    ref = _din_reference(att, target, rows, lengths, max_len)
    jag = att.forward_jagged(target, rows, lengths, max_len)
    padded = torch.ops.fbgemm.jagged_to_padded_dense(
        rows, [torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)], [max_len], 0.0)
    mask = torch.arange(max_len)[None, :] < lengths.clamp(max=max_len)[:, None]
    pad = att(target, padded, mask)
    torch.testing.assert_close(jag, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pad, ref, atol=1e-5, rtol=1e-5)
    if rows.numel() == 0:
        return
    g = torch.randn_like(ref)
    inputs = [target, rows] + list(att.parameters())
    grads_ref = torch.autograd.grad((ref * g).sum(), inputs)
    grads_jag = torch.autograd.grad((jag * g).sum(), inputs)
    for a, b in zip(grads_jag, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _segment_mean(rows, lengths, max_len):
    out, start = [], 0
    for n in lengths.tolist():
        h = rows[start:start + min(n, max_len)]
        start += n
        out.append(h.mean(0) if h.shape[0] else torch.zeros(rows.shape[1]))
    return torch.stack(out)


@settings(max_examples=20, deadline=None)
@given(lengths=st.lists(st.integers(0, 9), min_size=1, max_size=6),
       max_len=st.integers(1, 10), seed=st.integers(0, 99))
def test_attention_probe_statistics_and_uniform_weights(lengths, max_len, seed):
    """probe_attention: the recorded normalised entropy / effective fraction are those
    of the learned weights (reference: per-sample softmax of the DIN scores), equal in
    the jagged and padded forms; uniform=True turns the attention into the mean of the
    attended items; the probe is gone after the block."""
    torch.manual_seed(seed)
    dim = 4
    att = TargetAttention(dim, [8, 4])
    lengths = torch.tensor(lengths)
    target, rows = torch.randn(len(lengths), dim), torch.randn(int(lengths.sum()), dim)
    ents, effs, start = [], [], 0
    for b, n in enumerate(lengths.tolist()):
        h = rows[start:start + min(n, max_len)]
        start += n
        if h.shape[0] < 2:
            continue
        t = target[b].expand_as(h)
        w = torch.softmax(att.mlp(torch.cat([h, t, h - t, h * t], 1)).squeeze(1), 0).double()
        H = float(-(w * w.log()).sum())
        ents.append(H / float(torch.log(torch.tensor(float(h.shape[0])))))
        effs.append(float(torch.exp(torch.tensor(H))) / h.shape[0])
    padded = torch.ops.fbgemm.jagged_to_padded_dense(
        rows, [torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)], [max_len], 0.0)
    mask = torch.arange(max_len)[None, :] < lengths.clamp(max=max_len)[:, None]
    for uniform in (False, True):
        for form in ("jagged", "padded"):
            with probe_attention(att, uniform=uniform) as probe:
                out = att.forward_jagged(target, rows, lengths, max_len) if form == "jagged" \
                    else att(target, padded, mask)
            stats = probe.summary()
            assert stats["samples"] == len(ents)
            if ents:
                assert stats["normalized_entropy"] == pytest.approx(sum(ents) / len(ents),
                                                                    abs=1e-5)
                assert stats["effective_fraction"] == pytest.approx(sum(effs) / len(effs),
                                                                    abs=1e-5)
            if uniform:
                torch.testing.assert_close(out, _segment_mean(rows, lengths, max_len))
    assert att.probe is None
    torch.testing.assert_close(att.forward_jagged(target, rows, lengths, max_len),
                               _din_reference(att, target, rows, lengths, max_len),
                               atol=1e-5, rtol=1e-5)


def test_attention_probe_needs_target_attention(samples):
    model = build_ranker(samples.layout, RankerConfig(kind="dlrm"))
    with pytest.raises(ValueError, match="no TargetAttention"):
        with probe_attention(model):
            pass


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
