"""Tests of the RED-Rec user tower (tiny random BERT checkpoints, no downloads)."""

import os
from typing import Dict, List, Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mm.redrec.sequences import (
    SEQ_ACTIONS,
    SEQ_GAP,
    SEQ_HOUR,
    SEQ_ITEM,
    SEQ_POS,
    SEQ_SCENARIO,
    EventLog,
    MixConfig,
    mix,
    split_window,
)
from torchrec_mm.redrec.tower import (
    CAND_ITEM,
    UserTower,
    UserTowerConfig,
    UserTowerEncoder,
    UserTowerSharder,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NUM_ITEMS, S, A, LAST_N, GAPS = 40, 2, 3, 10, 21


def build_tiny_bert(path: str, seed: int = 0, dropout: float = 0.0,
                    initializer_range: float = 0.02) -> str:
    """Saves a tiny random ``BertModel`` (hidden 32, 2 layers) to ``path``."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=16, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=64, hidden_dropout_prob=dropout,
                         attention_probs_dropout_prob=dropout,
                         initializer_range=initializer_range)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> str:
    return build_tiny_bert(str(tmp_path_factory.mktemp("tiny_bert") / "bert"))


def _cfg(path: str, **kw) -> UserTowerConfig:
    base = dict(model_path=path, num_items=NUM_ITEMS, num_scenarios=S, num_actions=A,
                last_n=LAST_N, num_gap_buckets=GAPS, embedding_dim=16)
    base.update(kw)
    return UserTowerConfig(**base)


def _tower(path: str, seed: int = 0, **kw) -> UserTower:
    torch.manual_seed(seed)
    return UserTower(_cfg(path, **kw)).eval()


def random_events(rng: np.random.Generator, lengths: List[int]) -> Dict[str, np.ndarray]:
    n = int(sum(lengths))
    return {SEQ_ITEM: rng.integers(0, NUM_ITEMS, n), SEQ_SCENARIO: rng.integers(0, S, n),
            SEQ_ACTIONS: rng.integers(0, 2 ** A, n), SEQ_HOUR: rng.integers(0, 24, n),
            SEQ_POS: np.concatenate([np.arange(k) for k in lengths] + [np.zeros(0, int)]),
            SEQ_GAP: rng.integers(0, GAPS, n)}


def to_kjt(ev: Dict[str, np.ndarray], lengths: List[int],
           cands: Optional[List[List[int]]] = None) -> KeyedJaggedTensor:
    keys = list(ev)
    values = [torch.as_tensor(ev[k], dtype=torch.long) for k in keys]
    lens = [torch.as_tensor(lengths, dtype=torch.int32)] * len(keys)
    if cands is not None:
        keys.append(CAND_ITEM)
        values.append(torch.as_tensor([i for c in cands for i in c], dtype=torch.long))
        lens.append(torch.as_tensor([len(c) for c in cands], dtype=torch.int32))
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values),
                                               lengths=torch.cat(lens))


def reference(tower: UserTower, ev: Dict[str, np.ndarray], lengths: List[int]) -> torch.Tensor:
    """Per-user loop: sum of table rows per event, [events; Q], no padding, no mask."""
    tables = tower.embeddings.embeddings
    p = tower.config.table_prefix
    enc = tower.encoder
    outs, start = [], 0
    for L in lengths:
        rows, raw = [], []
        for j in range(start, start + L):
            x = (tables[f"{p}_item"].weight[int(ev[SEQ_ITEM][j])]
                 + tables[f"{p}_scenario"].weight[int(ev[SEQ_SCENARIO][j])]
                 + tables[f"{p}_hour"].weight[int(ev[SEQ_HOUR][j])]
                 + tables[f"{p}_pos"].weight[int(ev[SEQ_POS][j])]
                 + tables[f"{p}_gap"].weight[int(ev[SEQ_GAP][j])])
            for bit in range(A):
                if (int(ev[SEQ_ACTIONS][j]) >> bit) & 1:
                    x = x + tables[f"{p}_action"].weight[bit]
            rows.append(enc.input_proj(x))
            raw.append(x)
        start += L
        queries = list(enc.queries)
        if enc.event_mean == "queries" and raw:
            queries = [q + enc.input_proj(torch.stack(raw).mean(0)) for q in queries]
        seq = torch.stack(rows + queries)[None]                       # [1, L + K, H]
        h = enc.lm(inputs_embeds=seq).last_hidden_state[0, L:]
        out = enc.output_proj(h)
        if enc.event_mean == "output" and raw:
            out = out + enc.skip_proj(torch.stack(raw).mean(0))
        outs.append(F.normalize(out, dim=-1))
    return torch.stack(outs)


# --------------------------------------------------------------------------- tests


def test_shapes_norms_and_k_queries(bert):
    tower = _tower(bert, interests_per_scenario=3)
    assert tower.num_interests == 3 * S and tower.dim == 16
    lengths = [3, 0, LAST_N, 1]
    out = tower(to_kjt(random_events(np.random.default_rng(0), lengths), lengths))
    assert out.shape == (4, 3 * S, 16)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4, 3 * S))
    # the K interests of a user differ (distinct queries)
    assert (out[:, :, None] - out[:, None]).norm(dim=-1).sum() > 0.1
    # embedding_dim = 0: the LM hidden size
    wide = _tower(bert, embedding_dim=0)
    assert wide.dim == 32 and wide(to_kjt(random_events(np.random.default_rng(0), lengths),
                                          lengths)).shape == (4, 3 * S, 32)


@settings(max_examples=8, deadline=None)
@given(lengths=st.lists(st.integers(0, LAST_N), min_size=1, max_size=5),
       seed=st.integers(0, 2 ** 16))
def test_batched_matches_per_user_reference(bert, lengths, seed):
    tower = _tower(bert)
    ev = random_events(np.random.default_rng(seed), lengths)
    with torch.no_grad():
        got = tower(to_kjt(ev, lengths))
        want = reference(tower, ev, lengths)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("where", ["output", "queries"])
def test_event_mean(bert, where):
    """event_mean: the batched tower equals the per-user reference (users without events
    get no mean term); the term changes every user with events, and nobody else."""
    lengths = [3, 0, LAST_N, 1, 5]
    ev = random_events(np.random.default_rng(3), lengths)
    tower = _tower(bert, event_mean=where)
    plain = _tower(bert)
    missing = tower.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == (["encoder.skip_proj.weight"] if where == "output" else [])
    with torch.no_grad():
        got = tower(to_kjt(ev, lengths))
        torch.testing.assert_close(got, reference(tower, ev, lengths), atol=2e-5, rtol=0)
        base = plain(to_kjt(ev, lengths))
        assert ((got - base).flatten(1).abs().max(1).values > 1e-3).tolist() == [
            n > 0 for n in lengths]
    with pytest.raises(ValueError, match="event_mean"):
        _cfg(bert, event_mean="max")


def test_event_mean_output_alone_is_the_mean_map(bert):
    """event_mean='output' with the LM's projection zeroed: every interest is the
    normalised skip map of the user's mean event."""
    tower = _tower(bert, event_mean="output")
    with torch.no_grad():
        tower.encoder.output_proj.weight.zero_()
        tower.encoder.output_proj.bias.zero_()
        events = torch.randn(2, 4, tower.dim, generator=torch.Generator().manual_seed(0))
        out = tower.encoder.encode(events, torch.tensor([4, 2]))
        want = F.normalize(tower.encoder.skip_proj(torch.stack(
            [events[0].mean(0), events[1, :2].mean(0)])), dim=-1)
    torch.testing.assert_close(out, want[:, None].expand_as(out), atol=1e-6, rtol=0)


def test_padding_garbage_and_batch_mates_do_not_matter(bert):
    tower = _tower(bert)
    rng = np.random.default_rng(1)
    g = torch.Generator().manual_seed(0)
    # dense level: whatever sits in the padded slots, outputs are identical
    B, T, d = 4, 7, tower.dim
    events = torch.randn(B, T, d, generator=g)
    lengths = torch.tensor([7, 2, 0, 5])
    pad = torch.arange(T)[None, :] >= lengths[:, None]
    garbage = events.clone()
    garbage[pad] = 1e3 * torch.randn(int(pad.sum()), d, generator=g)
    perm = events.clone()
    perm[pad] = events[pad][torch.randperm(int(pad.sum()), generator=g)]
    with torch.no_grad():
        a = tower.encoder.encode(events, lengths)
        b = tower.encoder.encode(garbage, lengths)
        c = tower.encoder.encode(perm, lengths)
        # more padding columns change nothing either
        e = tower.encoder.encode(torch.cat([events, torch.randn(B, 5, d, generator=g)], 1),
                                 lengths)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=0)
    torch.testing.assert_close(a, e, atol=1e-5, rtol=0)
    # the valid slots do matter (this test can fail)
    moved = events.clone()
    moved[0, 0] += 1.0
    with torch.no_grad():
        assert (tower.encoder.encode(moved, lengths)[0] - a[0]).abs().max() > 1e-4
    # KJT level: a user alone equals the same user in a batch with longer users
    lengths_b = [2, LAST_N, 6]
    ev = random_events(rng, lengths_b)
    alone = {k: v[:2] for k, v in ev.items()}
    with torch.no_grad():
        batched = tower(to_kjt(ev, lengths_b))
        single = tower(to_kjt(alone, [2]))
    torch.testing.assert_close(batched[:1], single, atol=1e-5, rtol=0)


def test_event_changes_only_its_user(bert):
    tower = _tower(bert)
    lengths = [4, 3, 5]
    ev = random_events(np.random.default_rng(2), lengths)
    ev2 = {k: v.copy() for k, v in ev.items()}
    ev2[SEQ_ITEM][5] = (ev2[SEQ_ITEM][5] + 1) % NUM_ITEMS           # user 1's 2nd event
    ev3 = {k: v.copy() for k, v in ev.items()}
    ev3[SEQ_ACTIONS][0] ^= 1                                         # user 0's action bit
    with torch.no_grad():
        a, b, c = (tower(to_kjt(e, lengths)) for e in (ev, ev2, ev3))
    assert (a[1] - b[1]).abs().max() > 1e-4
    torch.testing.assert_close(a[[0, 2]], b[[0, 2]], atol=1e-6, rtol=0)
    assert (a[0] - c[0]).abs().max() > 1e-4


def test_lm_positions_none_leaves_order_to_the_position_tables(bert):
    """lm_positions='none': the LM gets no positions of its own, so with PE_seq constant
    (the 1d_time policy) a user's events in another order with the same gap buckets
    give the same interests; with the LM's own positions ('lm') they do not."""
    lengths = [5, 3]
    ev = random_events(np.random.default_rng(3), lengths)
    ev[SEQ_POS][:] = 0
    perm = {k: v.copy() for k, v in ev.items()}
    order = np.array([3, 0, 4, 1, 2, 5, 6, 7])                     # user 0 reordered
    for k in perm:
        perm[k] = perm[k][order]
    outs = {}
    for mode in ("none", "lm"):
        tower = _tower(bert, lm_positions=mode)
        with torch.no_grad():
            # the tiny LM's random position table is small next to the inputs: make it
            # count (in both modes: 'none' must ignore it however large)
            tower.encoder.lm.embeddings.position_embeddings.weight.mul_(50.0)
            outs[mode] = (tower(to_kjt(ev, lengths)), tower(to_kjt(perm, lengths)))
    a, b = outs["none"]
    torch.testing.assert_close(a, b, atol=2e-6, rtol=0)
    a, b = outs["lm"]
    assert (a[0] - b[0]).abs().max() > 1e-4  # (the tiny LM moves little per event)
    torch.testing.assert_close(a[1], b[1], atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match="lm_positions must be one of"):
        _cfg(bert, lm_positions="rope")


def test_lm_positions_none_needs_an_lm_that_takes_position_ids(bert):
    from transformers import AutoModel

    class NoPositions(torch.nn.Module):
        """An LM whose forward has no position_ids argument."""

        def __init__(self, lm):
            super().__init__()
            self.lm, self.config = lm, lm.config

        def forward(self, inputs_embeds, attention_mask=None):
            return self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask)

    lm = NoPositions(AutoModel.from_pretrained(bert))
    with pytest.raises(ValueError, match="NoPositions.forward takes no position_ids"):
        UserTowerEncoder(_cfg(bert, lm_positions="none"), lm)
    UserTowerEncoder(_cfg(bert), lm)  # its own positions: fine


def test_init_modes_pretrained_scratch_frozen(bert):
    from transformers import AutoModel

    ref = AutoModel.from_pretrained(bert).state_dict()
    pre = _tower(bert, init="pretrained").encoder.lm.state_dict()
    scratch = _tower(bert, init="scratch", seed=1).encoder.lm.state_dict()
    layer_keys = [k for k in ref if k.startswith("encoder.layer.") and k.endswith("weight")]
    assert layer_keys
    for k in layer_keys + ["embeddings.position_embeddings.weight"]:
        torch.testing.assert_close(pre[k], ref[k], atol=0, rtol=0)
    assert any(not torch.allclose(scratch[k], ref[k]) for k in layer_keys)
    assert "pooler.dense.weight" not in pre                          # dropped
    # frozen: no LM gradients; tables, queries and projections still train
    tower = _tower(bert, init="frozen")
    lengths = [3, 2]
    tower(to_kjt(random_events(np.random.default_rng(3), lengths), lengths)).sum().backward()
    assert all(not p.requires_grad and p.grad is None for p in tower.encoder.lm.parameters())
    assert tower.encoder.queries.grad is not None
    assert tower.encoder.output_proj.weight.grad is not None
    for name, p in tower.embeddings.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # pretrained: the LM trains (every LM parameter that requires grad gets one)
    tower = _tower(bert)
    tower(to_kjt(random_events(np.random.default_rng(3), lengths), lengths)).sum().backward()
    trainable = [p for p in tower.encoder.lm.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)


def test_table_init_follows_the_lm(bert, tmp_path):
    """table_init="lm": every EC table starts from N(0, initializer_range^2), whatever
    its size; "torchrec" (default): TorchRec's uniform +-1/sqrt(rows), large for small
    tables."""
    def tables(tower: UserTower) -> Dict[str, torch.Tensor]:
        return {k.split(".")[-2]: v for k, v in tower.embeddings.state_dict().items()}

    lm = tables(_tower(bert, item_embedding="id", table_init="lm"))
    assert set(lm) == {"t_redrec_item", "t_redrec_scenario", "t_redrec_hour",
                       "t_redrec_pos", "t_redrec_gap", "t_redrec_action"}
    values = torch.cat([w.flatten() for w in lm.values()])
    assert 0.017 < float(values.std()) < 0.023            # BERT's 0.02, ~1600 values
    assert float(lm["t_redrec_scenario"].abs().max()) < 0.1
    tr = tables(_tower(bert, item_embedding="id"))
    for name, w in tr.items():
        bound = (1.0 / w.shape[0]) ** 0.5
        assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.5 * bound, name
    assert float(tr["t_redrec_scenario"].std()) > 0.3      # 2 rows: +-0.71
    # another LM's initializer_range is followed
    wide = build_tiny_bert(str(tmp_path / "wide"), initializer_range=0.1)
    values = torch.cat([w.flatten() for w in tables(
        _tower(wide, item_embedding="id", table_init="lm")).values()])
    assert 0.085 < float(values.std()) < 0.115
    with pytest.raises(ValueError, match="table_init must be one of"):
        _cfg(bert, table_init="uniform")


def test_default_lm_is_the_item_towers_minilm():
    from transformers import AutoModel

    from torchrec_mm.content.encoder import default_model_path

    tower = UserTower(UserTowerConfig(num_items=5, num_scenarios=1, last_n=8))
    assert tower.dim == 384 and tower.num_interests == 3
    ref = AutoModel.from_pretrained(default_model_path()).state_dict()
    k = "encoder.layer.5.output.dense.weight"
    torch.testing.assert_close(tower.encoder.lm.state_dict()[k], ref[k], atol=0, rtol=0)


def test_candidates_id_and_content_modes(bert):
    lengths = [3, 1]
    ev = random_events(np.random.default_rng(4), lengths)
    cands = [[5, 7], [9]]
    tower = _tower(bert)
    interests, items = tower.forward_with_items(to_kjt(ev, lengths, cands))
    table = tower.embeddings.embeddings["t_redrec_item"].weight
    torch.testing.assert_close(items.values(), F.normalize(table[[5, 7, 9]], dim=-1))
    assert items.lengths().tolist() == [2, 1]
    torch.testing.assert_close(interests, tower(to_kjt(ev, lengths)))  # cands: no effect

    vecs = torch.randn(NUM_ITEMS, 12, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    content = UserTower(_cfg(bert, item_embedding="content"), item_vectors=vecs).eval()
    assert "t_redrec_item" not in dict(content.embeddings.embeddings.named_children())
    assert all(p.data_ptr() != content.encoder.item_vectors.data_ptr()
               for p in content.parameters())
    with torch.no_grad():
        a, items = content.forward_with_items(to_kjt(ev, lengths, cands))
        torch.testing.assert_close(
            items.values(),
            F.normalize(content.encoder.item_proj(vecs[[5, 7, 9]]), dim=-1))
        # history items are read through the frozen vectors
        content.encoder.item_vectors[int(ev[SEQ_ITEM][3])] += 1.0     # user 1's only item
        b = content(to_kjt(ev, lengths))
    assert (a[1] - b[1]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="item_vectors"):
        UserTower(_cfg(bert, item_embedding="content"))


def test_mixed_sequences_feed_the_tower(bert):
    rng = np.random.default_rng(5)
    E = 300
    log = EventLog.from_arrays(rng.integers(0, 12, E), rng.integers(0, NUM_ITEMS, E),
                               rng.integers(0, S, E), rng.integers(0, 2 ** A, E),
                               rng.integers(0, 10 ** 6, E), num_scenarios=S, num_actions=A)
    seq = mix(log, np.arange(12), np.full(12, 10 ** 6), MixConfig(last_n=LAST_N))
    inputs, _ = split_window(seq, w=2)
    assert inputs.mask.any()
    out = _tower(bert)(inputs.to_kjt())
    assert out.shape == (12, 3 * S, 16) and torch.isfinite(out).all()


def test_bad_input_names_the_feature(bert):
    tower = _tower(bert)
    lengths = [2, 2]
    ev = random_events(np.random.default_rng(6), lengths)
    for key, value, msg in ((SEQ_HOUR, 24, "seq_hour"), (SEQ_ITEM, NUM_ITEMS, "seq_item_id"),
                            (SEQ_POS, LAST_N, "seq_pos"), (SEQ_ACTIONS, 2 ** A, "seq_actions"),
                            (SEQ_GAP, -1, "seq_gap_bucket")):
        bad = {k: v.copy() for k, v in ev.items()}
        bad[key][3] = value
        with pytest.raises(ValueError, match=msg):
            tower(to_kjt(bad, lengths))
    ragged = to_kjt(ev, lengths)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=ragged.keys(), values=ragged.values(),
        lengths=torch.cat([ragged.lengths()[:-2], torch.tensor([1, 3], dtype=torch.int32)]))
    with pytest.raises(ValueError, match="lengths differ"):
        tower(kjt)
    with pytest.raises(KeyError, match="seq_hour"):
        tower(KeyedJaggedTensor.from_lengths_sync(
            keys=[SEQ_ITEM], values=torch.tensor([1]), lengths=torch.tensor([1, 0])))
    with pytest.raises(ValueError, match="init"):
        _cfg(bert, init="warm")


def test_sharder_plans_the_tower_tables(bert):
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology

    from torchrec_mm.training.sharding import default_sharders

    model = torch.nn.Module()
    model.tower = _tower(bert)
    sharder = UserTowerSharder()
    tables = set(sharder.shardable_parameters(model.tower))
    assert tables == {f"t_redrec_{t}" for t in ("item", "scenario", "hour", "pos", "gap",
                                                 "action")}
    assert "row_wise" in sharder.sharding_types("cpu")
    assert "data_parallel" not in sharder.sharding_types("cpu")
    plan = EmbeddingShardingPlanner(topology=Topology(world_size=2, compute_device="cpu")
                                    ).plan(model, [sharder] + default_sharders(
                                        torch.device("cpu")))
    assert set(plan.get_plan_for_module("tower")) == tables
