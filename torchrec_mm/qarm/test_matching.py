"""QARM code features: matching sequences vs the per-sample reference, hand-checked
cases, jagged helpers, the KJT builder, bad input, fx tracing."""

from typing import List

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mm.qarm import matching
from torchrec_mm.qarm.matching import (
    CodeFeatureConfig,
    code_feature_kjt,
    code_matching_reference,
    code_matching_sequences,
    expand_item_codes,
    latest_items,
    level_offsets,
)

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def problems(draw):
    """Small random codes (tiny codebooks so that prefixes collide at several levels),
    some items with the no-code index, jagged histories with duplicates and empty rows."""
    n = draw(st.integers(1, 12))
    L = draw(st.integers(1, 4))
    cb = draw(st.integers(1, 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    rq = torch.randint(0, cb, (n, L), generator=g)
    none_rows = torch.rand(n, generator=g) < 0.2
    rq[none_rows] = cb
    B = draw(st.integers(0, 6))
    lengths = torch.randint(0, 9, (B,), generator=g)
    lengths[torch.rand(B, generator=g) < 0.2] = 0
    hist = torch.randint(0, n, (int(lengths.sum()),), generator=g)
    target = torch.randint(0, n, (B,), generator=g)
    levels = draw(st.integers(1, L))
    max_len = draw(st.sampled_from([0, 1, 2, 3, 100]))
    dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    return target, hist, lengths.to(dtype), rq, levels, max_len, cb


def _rows(values: torch.Tensor, lengths: torch.Tensor) -> List[List[int]]:
    out, start = [], 0
    for n in lengths.tolist():
        out.append(values[start:start + n].tolist())
        start += n
    return out


# ------------------------------------------------------------------ matching sequences


@SETTINGS
@given(problems(), st.booleans())
def test_matching_equals_reference(problem, use_none):
    target, hist, lengths, rq, levels, max_len, cb = problem
    none = cb if use_none else None
    values, out_lengths = code_matching_sequences(target, hist, lengths, rq, levels,
                                                  max_len, none)
    ref_values, ref_lengths = code_matching_reference(target, hist, lengths, rq, levels,
                                                      max_len, none)
    assert out_lengths.dtype == lengths.dtype
    assert out_lengths.shape == (levels * target.shape[0],)
    assert torch.equal(out_lengths, ref_lengths)
    assert torch.equal(values, ref_values)
    assert int(out_lengths.sum()) == values.shape[0]
    if out_lengths.numel():
        assert int(out_lengths.max()) <= max_len


@SETTINGS
@given(problems())
def test_matching_levels_are_nested(problem):
    """Without truncation, level l+1's matches are a subsequence of level l's, and each
    level-l match shares the target's first l codes."""
    target, hist, lengths, rq, levels, _, cb = problem
    B = target.shape[0]
    values, out_lengths = code_matching_sequences(target, hist, lengths, rq, levels,
                                                  10**6, cb)
    rows = _rows(values, out_lengths)
    for lv in range(levels):
        for b in range(B):
            row = rows[lv * B + b]
            for item in row:
                assert torch.equal(rq[item, :lv + 1], rq[target[b], :lv + 1])
                assert bool((rq[item, :lv + 1] != cb).all())
            if lv + 1 < levels:
                deeper = iter(row)
                assert all(any(x == y for y in deeper) for x in rows[(lv + 1) * B + b])


def test_matching_hand_checked():
    """Target codes (1, 2, 3); history latest first: a (1,2,3), b (1,2,0), c (0,2,3),
    d (1,2,3), e = no code, a again; sample 2 has an empty history, sample 3 a no-code
    target."""
    cb = 4
    rq = torch.tensor([[1, 2, 3],   # 0 target / a
                       [1, 2, 0],   # 1 b
                       [0, 2, 3],   # 2 c
                       [1, 2, 3],   # 3 d
                       [4, 4, 4]])  # 4 e: no code
    target = torch.tensor([0, 0, 4])
    hist = torch.tensor([0, 1, 2, 3, 4, 0, 4, 0])
    lengths = torch.tensor([6, 0, 2])
    values, out = code_matching_sequences(target, hist, lengths, rq, 3, 3, cb)
    assert _rows(values, out) == [[0, 1, 3], [], [],
                                  [0, 1, 3], [], [],
                                  [0, 3, 0], [], []]
    values, out = code_matching_sequences(target, hist, lengths, rq, 2, 1, cb)
    assert _rows(values, out) == [[0], [], [], [0], [], []]
    # without the no-code index, a no-code target matches no-code history items
    values, out = code_matching_sequences(target, hist, lengths, rq, 1, 5, None)
    assert _rows(values, out) == [[0, 1, 3, 0], [], [4]]


def test_cached_table_layouts_follow_in_place_changes():
    """Derived layouts of a code table are cached per tensor; an in-place write, a new
    tensor and inference-mode tensors must not see stale ones."""
    rq = torch.tensor([[0, 0], [0, 1], [1, 1]])
    args = (torch.tensor([0]), torch.tensor([1, 2]), torch.tensor([2]))
    assert code_matching_sequences(*args, rq, 2, 5, 2)[0].tolist() == [1]
    rq[2, 0] = 0
    assert code_matching_sequences(*args, rq, 2, 5, 2)[0].tolist() == [1, 2]
    rq2 = rq.clone()
    rq2[1] = 2
    assert code_matching_sequences(*args, rq2, 2, 5, 2)[0].tolist() == [2]
    with torch.inference_mode():
        rq3 = torch.tensor([[0, 0], [0, 0], [0, 0]])
        assert code_matching_sequences(*args, rq3, 2, 5, 2)[0].tolist() == [1, 2, 1, 2]
    cfg = CodeFeatureConfig(levels=1, user_len=1, use_vq=False, vq_none=3, rq_none=2)
    kjt = KeyedJaggedTensor.from_lengths_sync(["item_id", "hist_item_id"],
                                              torch.tensor([0, 1, 2]), torch.tensor([1, 2]))
    assert code_feature_kjt(kjt, rq, None, cfg)["qarm_hist_rq"].values().tolist() == [0, 4]
    rq[1, 1] = 0
    assert code_feature_kjt(kjt, rq, None, cfg)["qarm_hist_rq"].values().tolist() == [0, 3]


def test_matching_empty_batch_and_histories():
    rq = torch.randint(0, 3, (5, 2))
    v, n = code_matching_sequences(torch.zeros(0, dtype=torch.long),
                                   torch.zeros(0, dtype=torch.long),
                                   torch.zeros(0, dtype=torch.long), rq, 2, 4, 3)
    assert v.shape == (0,) and n.shape == (0,)
    v, n = code_matching_sequences(torch.tensor([1, 2]), torch.zeros(0, dtype=torch.long),
                                   torch.zeros(2, dtype=torch.long), rq, 2, 4, 3)
    assert v.shape == (0,) and torch.equal(n, torch.zeros(4, dtype=torch.long))


def test_matching_bad_input():
    rq = torch.zeros(5, 3, dtype=torch.long)
    ok = dict(target=torch.tensor([0, 1]), hist_values=torch.tensor([1, 2, 3]),
              hist_lengths=torch.tensor([1, 2]), rq=rq, levels=2, max_len=3)
    with pytest.raises(ValueError, match=r"levels = 4 .* 3 levels"):
        code_matching_sequences(**{**ok, "levels": 4})
    with pytest.raises(ValueError, match=r"levels = 0"):
        code_matching_sequences(**{**ok, "levels": 0})
    with pytest.raises(ValueError, match=r"item id 7 of feature 'history' \(sample 1\)"):
        code_matching_sequences(**{**ok, "hist_values": torch.tensor([1, 2, 7])})
    with pytest.raises(ValueError, match=r"item id -1 of feature 'target' \(sample 1\)"):
        code_matching_sequences(**{**ok, "target": torch.tensor([0, -1])})
    with pytest.raises(ValueError, match=r"lengths sum to 4 but there are 3 values"):
        code_matching_sequences(**{**ok, "hist_lengths": torch.tensor([2, 2])})
    with pytest.raises(ValueError, match=r"max_len"):
        code_matching_sequences(**{**ok, "max_len": -1})


# -------------------------------------------------------------------- jagged helpers


@SETTINGS
@given(problems(), st.integers(0, 5))
def test_latest_items(problem, n):
    _, hist, lengths, _, _, _, _ = problem
    values, out = latest_items(hist, lengths, n)
    assert out.dtype == lengths.dtype
    assert _rows(values, out) == [row[:n] for row in _rows(hist, lengths)]


@SETTINGS
@given(problems(), st.booleans())
def test_expand_item_codes(problem, with_offsets):
    _, hist, lengths, rq, _, _, cb = problem
    L = rq.shape[1]
    offsets = level_offsets(L, cb) if with_offsets else None
    values, out = expand_item_codes(hist, lengths, rq, offsets)
    off = offsets.tolist() if with_offsets else [0] * L
    expected = [[c + o for item in row for c, o in zip(rq[item].tolist(), off)]
                for row in _rows(hist, lengths)]
    assert torch.equal(out, lengths * L)
    assert _rows(values, out) == expected
    with pytest.raises(ValueError, match="offsets has shape"):
        expand_item_codes(hist, lengths, rq, torch.zeros(L + 1, dtype=torch.long))


# ----------------------------------------------------------------------- the QARM KJT


def _batch(seed: int, B: int, n: int, max_hist: int, int32: bool = True):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_hist + 1, (B,), generator=g)
    target = torch.randint(0, n, (B,), generator=g)
    hist = torch.randint(0, n, (int(lengths.sum()),), generator=g)
    user = torch.arange(B)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["user_id", "item_id", "hist_item_id"],
        values=torch.cat([user, target, hist]),
        lengths=torch.cat([torch.ones(2 * B, dtype=torch.long), lengths]).to(
            torch.int32 if int32 else torch.int64))
    return kjt, target, hist, lengths


def _tables(seed: int, n: int, L: int, K: int, cb: int):
    g = torch.Generator().manual_seed(seed)
    rq = torch.randint(0, cb, (n, L), generator=g)
    vq = torch.randint(0, n, (n, K), generator=g)
    rq[:2] = cb  # items 0 and 1 have no code
    vq[:2] = n
    return rq, vq


@pytest.mark.parametrize("levels,user_len,use_vq,use_rq", [
    (3, 4, True, True), (1, 0, False, True), (0, 2, True, False), (4, 100, True, True)])
def test_code_feature_kjt_against_reference(levels, user_len, use_vq, use_rq):
    n, L, K, cb, B = 40, 4, 3, 2, 9
    rq, vq = _tables(0, n, L, K, cb)
    kjt, target, hist, lengths = _batch(1, B, n, 7)
    cfg = CodeFeatureConfig(levels=levels, match_len=2, user_len=user_len, use_vq=use_vq,
                            use_rq=use_rq, vq_none=n, rq_none=cb)
    out = code_feature_kjt(kjt, rq, vq, cfg)
    assert out.keys() == cfg.feature_names()
    assert out.stride() == B
    assert out.lengths().dtype == kjt.lengths().dtype
    assert int(out.lengths().sum()) == out.values().shape[0]
    off = (torch.arange(L) * (cb + 1)).tolist()
    hist_rows = _rows(hist, lengths)

    def rq_codes(item: int) -> List[int]:
        return [c + o for c, o in zip(rq[item].tolist(), off)]

    expected = {}
    if use_vq:
        expected["qarm_vq"] = [vq[t].tolist() for t in target.tolist()]
        expected["qarm_hist_vq"] = [[c for i in row[:user_len] for c in vq[i].tolist()]
                                    for row in hist_rows]
    if use_rq:
        expected["qarm_rq"] = [rq_codes(t) for t in target.tolist()]
        expected["qarm_hist_rq"] = [[c for i in row[:user_len] for c in rq_codes(i)]
                                    for row in hist_rows]
    for lv in range(1, levels + 1):
        rows = []
        for t, row in zip(target.tolist(), hist_rows):
            hits = [i for i in row if rq[i, :lv].tolist() == rq[t, :lv].tolist()
                    and cb not in rq[i, :lv].tolist()][:2]
            rows.append([c for i in hits for c in rq_codes(i)])
        expected[f"qarm_match_l{lv}"] = rows
    if not user_len:
        expected = {k: v for k, v in expected.items() if "hist" not in k}
    got = {k: jt.to_dense() for k, jt in out.to_dict().items()}
    assert set(got) == set(expected)
    for k in expected:
        assert [r.tolist() for r in got[k]] == expected[k], k
    if levels:
        # planted check that matches happen at all in this case (the test can fail)
        assert out["qarm_match_l1"].values().numel() > 0


def test_code_feature_kjt_feeds_an_ebc():
    """Every emitted index is a valid row of tables sized by the config."""
    n, L, K, cb, B = 30, 3, 4, 2, 8
    rq, vq = _tables(2, n, L, K, cb)
    kjt, *_ = _batch(3, B, n, 6)
    cfg = CodeFeatureConfig.from_codes(
        type("Codes", (), {"vq_vocab": n + 1, "rq_vocab": cb + 1})(), levels=2,
        match_len=3, user_len=4)
    assert (cfg.vq_none, cfg.rq_none) == (n, cb)
    out = code_feature_kjt(kjt, rq, vq, cfg)
    tables = [EmbeddingBagConfig(name="t_qarm_vq", embedding_dim=4,
                                 num_embeddings=cfg.vq_table_rows,
                                 feature_names=["qarm_vq", "qarm_hist_vq"]),
              EmbeddingBagConfig(name="t_qarm_rq", embedding_dim=4,
                                 num_embeddings=cfg.rq_table_rows(L),
                                 feature_names=[k for k in cfg.feature_names()
                                                if "rq" in k or "match" in k])]
    ebc = EmbeddingBagCollection(tables=tables)
    assert int(out["qarm_rq"].values().max()) < cfg.rq_table_rows(L)
    kt = ebc(KeyedJaggedTensor.concat([kjt, out]))  # appended to the batch's features
    assert kt.values().shape == (B, 4 * len(cfg.feature_names()))


def test_code_feature_kjt_empty():
    n, L, K, cb = 10, 3, 2, 2
    rq, vq = _tables(0, n, L, K, cb)
    cfg = CodeFeatureConfig(levels=2, vq_none=n, rq_none=cb)
    kjt, *_ = _batch(0, 0, n, 5)
    out = code_feature_kjt(kjt, rq, vq, cfg)
    assert out.keys() == cfg.feature_names() and out.values().numel() == 0
    kjt, *_ = _batch(0, 4, n, 0)  # no history at all
    out = code_feature_kjt(kjt, rq, vq, cfg)
    d = out.to_dict()
    assert d["qarm_match_l2"].values().numel() == 0
    assert torch.equal(d["qarm_hist_rq"].lengths(), torch.zeros(4, dtype=torch.int32))
    assert torch.equal(d["qarm_rq"].lengths(), torch.full((4,), L, dtype=torch.int32))


def test_code_feature_kjt_bad_input():
    n, L, K, cb, B = 10, 3, 2, 2, 4
    rq, vq = _tables(0, n, L, K, cb)
    cfg = CodeFeatureConfig(levels=2, vq_none=n, rq_none=cb)
    kjt, target, hist, lengths = _batch(0, B, n, 3, int32=False)
    bad_hist = hist.clone()
    bad_hist[-1] = n + 5
    bad = KeyedJaggedTensor.from_lengths_sync(
        keys=["item_id", "hist_item_id"], values=torch.cat([target, bad_hist]),
        lengths=torch.cat([torch.ones(B, dtype=torch.long), lengths]))
    last = int(torch.nonzero(lengths)[-1, 0])  # the sample holding the last value
    with pytest.raises(ValueError, match=rf"item id {n + 5} of feature 'hist_item_id' "
                                         rf"\(sample {last}\)"):
        code_feature_kjt(bad, rq, vq, cfg)
    bad = KeyedJaggedTensor.from_lengths_sync(
        keys=["item_id", "hist_item_id"], values=torch.cat([target * 0 + n, hist]),
        lengths=torch.cat([torch.ones(B, dtype=torch.long), lengths]))
    with pytest.raises(ValueError, match=rf"item id {n} of feature 'item_id' \(sample 0\)"):
        code_feature_kjt(bad, rq, vq, cfg)
    with pytest.raises(ValueError, match=r"levels = 4 but the RQ codes have 3"):
        code_feature_kjt(kjt, rq, vq, CodeFeatureConfig(levels=4, vq_none=n, rq_none=cb))
    with pytest.raises(ValueError, match=r"no feature 'hist'"):
        code_feature_kjt(kjt, rq, vq, CodeFeatureConfig(history_feature="hist", vq_none=n,
                                                        rq_none=cb, levels=1))
    two = KeyedJaggedTensor.from_lengths_sync(
        keys=["item_id", "hist_item_id"], values=torch.tensor([1, 2, 3, 4]),
        lengths=torch.tensor([2, 1, 1, 0]))
    with pytest.raises(ValueError, match=r"exactly one item id per sample; sample 0 has 2"):
        code_feature_kjt(two, rq, vq, cfg)
    bad_rq = rq.clone()
    bad_rq[5, 1] = cb + 1
    with pytest.raises(ValueError, match=rf"rq code {cb + 1} of item 5 \(column 1\)"):
        code_feature_kjt(kjt, bad_rq, vq, cfg)
    # a table that passed is re-checked after an in-place change
    code_feature_kjt(kjt, rq, vq, cfg)
    vq[3, 0] = n + 1
    with pytest.raises(ValueError, match=rf"vq code {n + 1} of item 3 \(column 0\)"):
        code_feature_kjt(kjt, rq, vq, cfg)
    vq[3, 0] = 0
    with pytest.raises(ValueError, match=r"use_vq is on but no vq table"):
        code_feature_kjt(kjt, rq, None, cfg)
    out = code_feature_kjt(kjt, rq, None, CodeFeatureConfig(use_vq=False, levels=1,
                                                            vq_none=n, rq_none=cb))
    assert "qarm_vq" not in out.keys()
    with pytest.raises(ValueError, match=r"match_len must be >= 1"):
        CodeFeatureConfig(levels=1, match_len=0, vq_none=n, rq_none=cb)


# -------------------------------------------------------------------------------- fx


class _QARMFeatures(torch.nn.Module):
    def __init__(self, rq: torch.Tensor, vq: torch.Tensor, cfg: CodeFeatureConfig) -> None:
        super().__init__()
        self.register_buffer("rq", rq)
        self.register_buffer("vq", vq)
        self.cfg = cfg

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        out = code_feature_kjt(kjt, self.rq, self.vq, self.cfg)
        # one more wrapped call through the module namespace
        latest, _ = matching.latest_items(out.values(), out.lengths(), 2)
        return torch.cat([out.values(), out.lengths().long(), latest])


@pytest.mark.parametrize("tracer", ["torch", "torchrec"])
def test_fx_trace(tracer):
    n, L, K, cb = 20, 3, 2, 2
    rq, vq = _tables(0, n, L, K, cb)
    module = _QARMFeatures(rq, vq, CodeFeatureConfig(levels=2, vq_none=n, rq_none=cb))
    if tracer == "torch":
        gm = torch.fx.symbolic_trace(module)
    else:
        import torchrec.fx
        gm = torchrec.fx.symbolic_trace(module)
    targets = {getattr(node.target, "__name__", str(node.target)) for node in gm.graph.nodes}
    assert "_code_features" in targets and "latest_items" in targets
    for seed in range(2):
        kjt, *_ = _batch(seed, 5, n, 6)
        assert torch.equal(gm(kjt), module(kjt))
