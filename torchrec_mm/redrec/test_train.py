"""Tests of the RED-Rec training loop, CLI and retrieval evaluation (tiny random BERT
user tower, a small synthetic dataset; one intra-op thread so the busy test machine
does not oversubscribe)."""

import argparse
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from torchrec_mm.content.encode_job import MANIFEST_FILE, MANIFEST_FORMAT
from torchrec_mm.data.split import make_split
from torchrec_mm.data.synth import SynthConfig, SynthTruth, generate
from torchrec_mm.redrec import cli as redrec_cli
from torchrec_mm.redrec.losses import (
    ItemBias,
    multi_interest_window_loss,
    nce_loss,
    single_interest_loss,
)
from torchrec_mm.redrec.protocol import make_eval_cases
from torchrec_mm.redrec.sequences import SEQ_ITEM, EventLog, mix, next_targets, split_window
from torchrec_mm.redrec.test_tower import build_tiny_bert
from torchrec_mm.redrec.tower import CAND_ITEM
from torchrec_mm.redrec.train import (
    RedRecConfig,
    _shard,
    build_model,
    eval_target_rows,
    evaluate_redrec,
    evaluate_run,
    load_redrec_config,
    make_batch,
    sample_negatives,
    target_mask,
    train_redrec,
    training_samples,
    training_targets,
)
from torchrec_mm.training.checkpoint import latest_checkpoint, read_checkpoint
from torchrec_mm.training.distributed import init_distributed
from torchrec_mm.utils.io import save_tensors, write_json

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NUM_USERS, NUM_ITEMS, TOPICS = 120, 240, 8


pytestmark = pytest.mark.usefixtures("one_thread")  # redrec/conftest.py


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A focused-topic synthetic dataset (uniform popularity: only the user's topic
    predicts the next items), its split, a tiny BERT and a content store of noisy
    topic vectors."""
    root = tmp_path_factory.mktemp("redrec_train")
    data = str(root / "data")
    generate(SynthConfig(num_users=NUM_USERS, num_items=NUM_ITEMS, num_interactions=4800,
                         num_topics=TOPICS, zipf_exponent=0.0, pop_share=(0.0, 0.0, 0.0),
                         interest_concentration=0.05, intent_share_sparse=0.0,
                         intent_share_homefeed=0.0, seed=0), data)
    make_split(data)
    bert = build_tiny_bert(str(root / "bert"))
    truth = SynthTruth.load(data)
    rng = np.random.default_rng(0)
    vecs = np.concatenate([truth.item_topic_mix, 0.3 * rng.standard_normal((NUM_ITEMS, 8))],
                          1).astype(np.float32)
    store = write_vector_store(str(root / "store"), vecs)
    return {"root": root, "data": data, "bert": bert, "store": store}


def write_vector_store(path: str, vecs: np.ndarray) -> str:
    """A minimal content store holding ``vecs`` as the ``emb_token`` field."""
    os.makedirs(path, exist_ok=True)
    n, d = vecs.shape
    save_tensors(os.path.join(path, "chunk-0.safetensors"),
                 {"item_id": torch.arange(n), "emb_token": torch.from_numpy(vecs)})
    write_json(os.path.join(path, MANIFEST_FILE), {
        "format": MANIFEST_FORMAT, "num_items": n, "num_encoded": n, "dim": d,
        "num_groups": 1, "layer_groups": [[0]],
        "fields": {"emb_token": {"shape": [d], "dtype": "float32"}},
        "chunks": [{"file": "chunk-0.safetensors", "num_items": n}]})
    return path


def _cfg(env, out: str, **kw) -> RedRecConfig:
    base = dict(data=env["data"], out=str(env["root"] / out), model_path=env["bert"],
                last_n=16, window=4, embedding_dim=16, interests_per_scenario=1,
                num_negatives=32, batch_size=16, epochs=1, dropout=0.0, eval_ks=(10, 50),
                eval_max_users=60, progress=False, log_every=1)
    base.update(kw)
    return RedRecConfig(**base)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    redrec_cli.register(p.add_subparsers(dest="command"))
    return p


def _untrained_metrics(cfg: RedRecConfig):
    ctx = init_distributed(0, 1)
    try:
        return evaluate_redrec(_shard(build_model(cfg), cfg, ctx), cfg, ctx)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- samples


def test_training_samples_and_batch_layout(env):
    cfg = _cfg(env, "unused", cutoffs_per_user=2, min_history=2)
    log = EventLog.from_dataset(env["data"], split_filter="train")
    users, t_now = training_samples(log, cfg, epoch=0)
    n = np.diff(log.user_offsets)
    assert users.size == 2 * int((n >= 3).sum())
    # straightforward check of every sample: >= min_history + 1 events before t_now,
    # and t_now - 1 is the time of one of the user's events
    for u, t in zip(users.tolist(), t_now.tolist()):
        ts = log.timestamp[log.user_offsets[u]:log.user_offsets[u + 1]]
        assert (ts < t).sum() >= 3 and (t - 1) in set(ts.tolist())
    again, t_again = training_samples(log, cfg, epoch=0)
    assert np.array_equal(t_now, t_again) and np.array_equal(users, again)
    assert not np.array_equal(t_now, training_samples(log, cfg, epoch=1)[1])

    neg = sample_negatives(NUM_ITEMS, cfg, None, 0, 0)
    batch = make_batch(log, users[:5], t_now[:5], cfg, neg)
    _, targets = split_window(mix(log, users[:5], t_now[:5], cfg.mix_config()), cfg.window,
                              min_input=cfg.min_history)
    assert torch.equal(batch.window_ids, torch.from_numpy(targets))
    assert (batch.window_ids[:, 0] >= 0).all()  # every sample has its next item
    cand = batch.features[CAND_ITEM]
    valid = targets >= 0
    assert cand.lengths().tolist()[:-1] == valid.sum(1).tolist()[:-1]
    assert int(cand.lengths()[-1]) == valid.sum(1)[-1] + neg.size
    assert cand.values().tolist() == targets[valid].tolist() + neg.tolist()


def test_target_actions_in_training_and_evaluation(env):
    """target_actions=['is_click']: a batch's window targets are the window's clicked
    events (every window event still leaves the input); evaluation targets are clicks."""
    cfg = _cfg(env, "clicks", target_actions=["is_click"], min_history=2)
    log = EventLog.from_dataset(env["data"], split_filter="train")
    users, t_now = training_samples(log, cfg, epoch=0)
    neg = sample_negatives(NUM_ITEMS, cfg, None, 0, 0)
    batch = make_batch(log, users[:16], t_now[:16], cfg, neg)
    seq = mix(log, users[:16], t_now[:16], cfg.mix_config())
    inputs, every = split_window(seq, cfg.window, min_input=2)
    _, clicked = split_window(seq, cfg.window, 2, eligible=(seq.actions & 1) != 0)
    assert torch.equal(batch.window_ids, torch.from_numpy(clicked))
    assert 0 < (clicked >= 0).sum() < (every >= 0).sum()
    assert batch.features[SEQ_ITEM].lengths().tolist() == inputs.length.tolist()
    assert batch.features[CAND_ITEM].values().tolist() == clicked[clicked >= 0].tolist() + \
        neg.tolist()

    full = EventLog.from_dataset(env["data"])
    rows = eval_target_rows(full, env["data"], "test", ["is_click"])
    assert rows.any() and not (rows & ((full.actions & 1) == 0)).any()
    assert rows.sum() < eval_target_rows(full, env["data"], "test").sum()
    with pytest.raises(ValueError, match=r"\(target_actions\): unknown action\(s\) \['click'\]"):
        eval_target_rows(full, env["data"], "test", ["click"])
    cases = make_eval_cases(full.user_offsets, full.item, full.timestamp, NUM_ITEMS,
                            cfg.protocol(), target_rows=rows)
    assert ((full.actions[cases.cutoff_index.numpy()] & 1) == 1).all()
    assert _untrained_metrics(cfg)["num_users"] == len(cases)
    with pytest.raises(ValueError, match="target_actions"):
        _cfg(env, "bad", target_actions=[])


def test_target_scenarios_in_training_and_evaluation(env):
    """target_scenarios=['search']: a batch's window targets are the window's search
    events (every window event still leaves the input), evaluation cutoffs and targets
    are search events (the histories keep every scenario), evaluate_redrec scores exactly
    those cases; unknown or empty scenario lists are refused by name."""
    cfg = _cfg(env, "search", target_scenarios="search", min_history=2)
    assert cfg.target_scenarios == ("search",)
    log = EventLog.from_dataset(env["data"], split_filter="train")
    users, t_now = training_samples(log, cfg, epoch=0)
    neg = sample_negatives(NUM_ITEMS, cfg, None, 0, 0)
    batch = make_batch(log, users[:16], t_now[:16], cfg, neg)
    seq = mix(log, users[:16], t_now[:16], cfg.mix_config())
    search = log.scenario_names.index("search")
    _, every = split_window(seq, cfg.window, min_input=2)
    _, wanted = split_window(seq, cfg.window, 2, eligible=seq.scenario == search)
    assert torch.equal(batch.window_ids, torch.from_numpy(wanted))
    assert 0 < (wanted >= 0).sum() < (every >= 0).sum()
    both = _cfg(env, "both", target_scenarios=["search"], target_actions=["is_click"],
                min_history=2)
    _, clicked_search = split_window(seq, cfg.window, 2, eligible=(seq.scenario == search) & (
        (seq.actions & 1) != 0))
    assert torch.equal(make_batch(log, users[:16], t_now[:16], both, neg).window_ids,
                       torch.from_numpy(clicked_search))

    full = EventLog.from_dataset(env["data"])
    every = eval_target_rows(full, env["data"], "test")
    rows = eval_target_rows(full, env["data"], "test", scenarios=["search"])
    assert rows.any() and rows.sum() < every.sum()
    np.testing.assert_array_equal(rows, every & (full.scenario == search))
    both = eval_target_rows(full, env["data"], "test", ["is_click"], scenarios=["search"])
    np.testing.assert_array_equal(
        both, eval_target_rows(full, env["data"], "test", ["is_click"]) & rows)
    cases = make_eval_cases(full.user_offsets, full.item, full.timestamp, NUM_ITEMS,
                            cfg.protocol(), target_rows=rows)
    assert len(cases) and (full.scenario[cases.cutoff_index.numpy()] == search).all()
    # every target is the item of a search event of the same user from the cutoff on
    for u, c, tg in zip(cases.users.numpy(), cases.cutoff_index.numpy(),
                        cases.targets.numpy()):
        hi = full.user_offsets[u + 1]
        later = {int(full.item[i]) for i in range(c, hi) if full.scenario[i] == search}
        assert {int(t) for t in tg if t >= 0} <= later
    assert _untrained_metrics(cfg)["num_users"] == len(cases)
    with pytest.raises(ValueError, match=r"\(target_scenarios\): unknown scenario\(s\) "
                                         r"\['feed'\]"):
        eval_target_rows(full, env["data"], "test", scenarios=["feed"])
    with pytest.raises(ValueError, match="target_scenarios: a non-empty list of scenario"):
        _cfg(env, "bad", target_scenarios=[])


def test_cutoffs_at_targets(env):
    """cutoffs='targets': every sample's cutoff is the time of one of its user's
    eligible events (clicked search events) with >= min_history events before it; its
    input is the mix of last_n - W events before that time and its window the next W
    eligible events from it on — every sample has a target, where cutoffs anywhere
    leave most windows without one; training and evaluation run."""
    kw = dict(target_scenarios=["search"], target_actions=["is_click"], min_history=2,
              cutoffs_per_user=3)
    cfg = _cfg(env, "tc", cutoffs="targets", **kw)
    log = EventLog.from_dataset(env["data"], split_filter="train")
    eligible = target_mask(log, cfg)
    search = log.scenario_names.index("search")
    np.testing.assert_array_equal(eligible, (log.scenario == search) & ((log.actions & 1) != 0))
    rows = training_targets(log, cfg)
    np.testing.assert_array_equal(rows, np.flatnonzero(eligible))
    users, t_now = training_samples(log, cfg, epoch=0)
    with_cutoff = set()
    for u in range(log.num_users):
        lo, hi = log.user_offsets[u], log.user_offsets[u + 1]
        if any(eligible[r] and (log.timestamp[lo:hi] < log.timestamp[r]).sum() >= 2
               for r in range(lo, hi)):
            with_cutoff.add(u)
    assert sorted(set(users.tolist())) == sorted(with_cutoff)
    assert users.size == 3 * len(with_cutoff)
    for u, t in zip(users.tolist(), t_now.tolist()):
        lo, hi = log.user_offsets[u], log.user_offsets[u + 1]
        at = [r for r in range(lo, hi) if log.timestamp[r] == t and eligible[r]]
        assert at and (log.timestamp[lo:hi] < t).sum() >= 2

    neg = sample_negatives(NUM_ITEMS, cfg, None, 0, 0)
    batch = make_batch(log, users[:16], t_now[:16], cfg, neg, rows)
    want = next_targets(log, users[:16], t_now[:16], cfg.window, rows)
    assert torch.equal(batch.window_ids, torch.from_numpy(want))
    assert (batch.window_ids[:, 0] >= 0).all()
    assert torch.equal(make_batch(log, users[:16], t_now[:16], cfg, neg).window_ids,
                       batch.window_ids)  # target rows computed when not given
    inputs = mix(log, users[:16], t_now[:16], cfg.mix_config(cfg.last_n - cfg.window))
    assert batch.features[SEQ_ITEM].lengths().tolist() == inputs.length.tolist()
    assert max(inputs.length) <= cfg.last_n - cfg.window
    assert batch.features[SEQ_ITEM].values().tolist() == \
        inputs.item[np.arange(cfg.last_n - cfg.window)[None, :] < inputs.length[:, None]].tolist()
    # the same samples with cutoffs anywhere leave most windows empty on this log
    ev_users, ev_t = training_samples(log, _cfg(env, "ev", **kw), epoch=0)
    ev = make_batch(log, ev_users[:64], ev_t[:64], _cfg(env, "ev", **kw), neg)
    assert (ev.window_ids[:, 0] < 0).float().mean() > 0.5

    trained = train_redrec(_cfg(env, "tc_run", cutoffs="targets", evaluate=True, **kw))
    assert trained["steps"] == (3 * len(with_cutoff)) // cfg.batch_size
    assert np.isfinite(trained["curve"][-1]["loss"]) and trained["eval"]["num_users"] > 0
    with pytest.raises(ValueError, match=r"cutoffs: 'anywhere' is not one of"):
        _cfg(env, "x", cutoffs="anywhere")
    assert _parser().parse_args(["redrec", "train", "--cutoffs", "targets"]).cutoffs == "targets"
    with pytest.raises(SystemExit):
        _parser().parse_args(["redrec", "train", "--cutoffs", "anywhere"])


@pytest.mark.parametrize("biased", [False, True])
@pytest.mark.parametrize("loss_kind", ["multi_interest", "single_interest"])
def test_loss_matches_direct_computation(env, loss_kind, biased):
    """The model's loss (candidates packed into one jagged feature) equals the losses
    computed from the tower's interests and the item table looked up by hand; with an
    item bias, from the bias of every window item and negative looked up by hand."""
    single = loss_kind == "single_interest"
    cfg = _cfg(env, "unused", nce_weight=0.5, interests_per_scenario=2, loss=loss_kind,
               in_batch=single, single_pool="first", policy="global_time" if single else "2d",
               item_bias="zero" if biased else "none")
    log = EventLog.from_dataset(env["data"], split_filter="train")
    users, t_now = training_samples(log, cfg, epoch=0)
    neg = sample_negatives(NUM_ITEMS, cfg, None, 0, 3)
    batch = make_batch(log, users[:6], t_now[:6], cfg, neg)
    model = build_model(cfg).eval()
    with torch.no_grad():
        wb = nb = None
        if biased:
            model.item_bias.weight.normal_(0.0, 2.0)
            wb, nb = model.item_bias.weight[batch.window_ids.clamp(min=0)], \
                model.item_bias.weight[torch.from_numpy(neg)]
        loss, interests, _ = model(batch)
        ref_interests = model.tower(batch.features)
        table = model.tower.embeddings.embeddings["t_redrec_item"].weight
        wid = batch.window_ids
        nid = torch.from_numpy(neg)
        mask = wid >= 0
        window = F.normalize(table[wid.clamp(min=0)], dim=-1) * mask[..., None]
        negv = F.normalize(table[nid], dim=-1)
        tau = model.tau()
        if single:
            ref = single_interest_loss(ref_interests, window, negv, tau, mask, "first", True,
                                       wid, nid, target_bias=wb, neg_bias=nb)
            user = ref_interests[:, 0]
        else:
            ref, assign = multi_interest_window_loss(ref_interests, window, mask, negv, tau,
                                                     False, wid, nid, window_bias=wb,
                                                     neg_bias=nb)
            user = ref_interests[torch.arange(6), assign.item_interest[:, 0]]
        ref = ref + 0.5 * nce_loss(user, window[:, 0], negv, tau, single, wid[:, 0], nid,
                                   pos_bias=None if wb is None else wb[:, 0], neg_bias=nb)
        if biased:  # the bias is in the loss: it differs from the unbiased one
            model.item_bias = None
            assert not torch.allclose(model(batch)[0], ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(interests, ref_interests)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert interests.shape == (6, 2 * 3, 16)


# --------------------------------------------------------------------------- end to end


def test_cli_train_then_evaluate_writes_json(env):
    out = str(env["root"] / "cli_run")
    args = _parser().parse_args([
        "redrec", "train", "--data", env["data"], "--out", out, "--model-path", env["bert"],
        "--last-n", "16", "--window", "4", "--embedding-dim", "16",
        "--interests-per-scenario", "1", "--num-negatives", "32", "--batch-size", "16",
        "--epochs", "1", "--ks", "10,50", "--max-users", "60", "--no-progress",
        "--checkpoint-every", "3", "--negatives", "popularity"])
    assert args.func(args) == 0
    with open(os.path.join(out, "train_metrics.json")) as f:
        tm = json.load(f)
    assert tm["steps"] == tm["steps_per_epoch"] >= 3
    assert all(np.isfinite(c["loss"]) for c in tm["curve"])
    assert tm["epochs"][0]["epoch"] == 0 and tm["config"]["negatives"] == "popularity"
    step_dir = latest_checkpoint(os.path.join(out, "checkpoints"))
    assert step_dir.endswith(f"step-{tm['steps']:09d}")
    assert os.path.exists(os.path.join(step_dir, "tensors.safetensors"))
    with open(os.path.join(out, "eval_metrics.json")) as f:
        em = json.load(f)
    m = em["metrics"]
    assert set(m) >= {"HR@10", "HR@50", "NDCG@10", "NDCG@50", "MRR@10", "MRR", "num_users"}
    assert 0 < m["num_users"] <= 60 and m["pool_size"] == NUM_ITEMS
    assert m["HR@10"] <= m["HR@50"] and em["step"] == tm["steps"]

    # `redrec evaluate` reloads the checkpoint: the exact index reproduces the metrics,
    # a faiss flat index gives the same @K metrics
    args = _parser().parse_args(["redrec", "evaluate", "--run", out, "--no-progress"])
    assert args.func(args) == 0
    with open(os.path.join(out, "eval_metrics.json")) as f:
        again = json.load(f)["metrics"]
    for k in ("HR@10", "HR@50", "NDCG@50", "MRR"):
        assert again[k] == pytest.approx(m[k], abs=1e-9)
    flat = evaluate_run(out, eval_index="Flat", progress=False)["metrics"]
    assert flat["index"] == "Flat"
    for k in ("HR@10", "HR@50", "NDCG@10", "NDCG@50", "MRR@50"):
        assert flat[k] == pytest.approx(m[k], abs=1e-6)
    with pytest.raises(ValueError, match="only eval_"):
        evaluate_run(out, window=3)
    # a run trained on every scenario's positives, re-scored on search targets only
    every = evaluate_run(out, eval_max_users=10**6, progress=False)["metrics"]
    args = _parser().parse_args(["redrec", "evaluate", "--run", out, "--no-progress",
                                 "--target-scenarios", "search", "--max-users", "1000000"])
    assert args.func(args) == 0
    with open(os.path.join(out, "eval_metrics.json")) as f:
        em_search = json.load(f)
    assert em_search["config"]["target_scenarios"] == ["search"]
    assert 0 < em_search["metrics"]["num_users"] < every["num_users"]


def test_resume_equals_uninterrupted(env):
    kw = dict(epochs=2, evaluate=False, nce_weight=0.5, interests_per_scenario=2)
    full = train_redrec(_cfg(env, "full", **kw))
    stopped = train_redrec(_cfg(env, "resumed", max_steps=3, **kw))
    assert stopped["steps"] == 3 < full["steps_per_epoch"]  # stopped mid-epoch
    resumed = train_redrec(_cfg(env, "resumed", **kw))
    assert resumed["steps"] == full["steps"] == 2 * full["steps_per_epoch"]
    assert (full["start_step"], stopped["start_step"], resumed["start_step"]) == (0, 0, 3)
    assert [c["loss"] for c in resumed["curve"]] == pytest.approx(
        [c["loss"] for c in full["curve"]], rel=1e-5)
    assert [e["loss"] for e in resumed["epochs"]] == pytest.approx(
        [e["loss"] for e in full["epochs"]], rel=1e-5)
    _, _, a = read_checkpoint(latest_checkpoint(str(env["root"] / "full" / "checkpoints")))
    _, _, b = read_checkpoint(latest_checkpoint(str(env["root"] / "resumed" / "checkpoints")))
    assert a.keys() == b.keys()
    moved = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    # the run really trained: the item table moved away from its initial values
    init = build_model(_cfg(env, "x", **kw)).state_dict()
    for k, v in init.items():
        hits = [t for name, t in a.items() if name.endswith(k) and name.startswith("/model")]
        if hits and hits[0].shape == v.shape and not torch.allclose(hits[0], v):
            moved += 1
    assert moved > 0
    # a different setting cannot resume that directory
    with pytest.raises(ValueError, match="other settings"):
        train_redrec(_cfg(env, "resumed", **{**kw, "window": 3}))
    # nor can a shorter run (it would report the longer one as its own)
    with pytest.raises(ValueError, match="more than the"):
        train_redrec(_cfg(env, "resumed", **{**kw, "epochs": 1}))
    # a config.json written before an option existed still resumes (defaults added)
    path = env["root"] / "resumed" / "config.json"
    stored = json.loads(path.read_text())
    del stored["eval_seed"]
    path.write_text(json.dumps(stored))
    assert train_redrec(_cfg(env, "resumed", **kw))["steps"] == full["steps"]


@pytest.fixture(scope="module")
def item_states(env):
    """Item-tower states of the dataset's items: a tiny Llama's top layer trains."""
    from torchrec_mm.content.encoder import ContentEncoderConfig
    from torchrec_mm.content.testing import build_tiny_llama
    from torchrec_mm.redrec.item_tower import build_item_states

    llama = build_tiny_llama(str(env["root"] / "llama"), num_layers=2)
    out = str(env["root"] / "item_states")
    build_item_states(env["data"], out, layers=1, progress=False,
                      encoder_config=ContentEncoderConfig(model_path=llama, max_length=24))
    return out


def test_joint_item_tower_trains_and_resumes(env, item_states):
    """item_states: the item tower's top layer is trained with the user tower (its
    weights are in the checkpoint and move; the stored states are not), and an
    interrupted run resumes to the uninterrupted one."""
    kw = dict(item_embedding="content", item_states=item_states, epochs=1, dense_lr=3e-3,
              num_negatives=16, evaluate=False)
    full = train_redrec(_cfg(env, "joint_full", **kw))
    train_redrec(_cfg(env, "joint_resumed", max_steps=2, **kw))
    resumed = train_redrec(_cfg(env, "joint_resumed", **kw))
    assert resumed["start_step"] == 2 and resumed["steps"] == full["steps"] > 2
    assert [c["loss"] for c in resumed["curve"]] == pytest.approx(
        [c["loss"] for c in full["curve"]], rel=1e-5)
    _, _, a = read_checkpoint(latest_checkpoint(str(env["root"] / "joint_full" / "checkpoints")))
    init = build_model(_cfg(env, "x", **kw)).state_dict()
    item = {k: v for k, v in init.items() if k.startswith("tower.encoder.item_tower.")}
    assert item and not any("states" in k for k in a)
    moved = [k for k, v in item.items() if not torch.allclose(a["/model/" + k], v)]
    assert len(moved) > len(item) // 2, moved
    # item_lr: the item tower's own learning rate (0-like lr: its layers barely move)
    slow = train_redrec(_cfg(env, "joint_slow", **kw, item_lr=1e-9, max_steps=2))
    assert slow["steps"] == 2
    _, _, c = read_checkpoint(latest_checkpoint(str(env["root"] / "joint_slow" / "checkpoints")))
    for k, v in item.items():
        torch.testing.assert_close(c["/model/" + k], v, rtol=0, atol=1e-6, msg=k)
    assert any(not torch.allclose(c["/model/" + k], v) for k, v in init.items()
               if k.startswith("tower.encoder.") and k not in item and "/model/" + k in c)
    # item_dropout: the item tower's own dropout (default 0: train-mode passes agree)
    ids = torch.arange(12)
    with torch.no_grad():
        plain = build_model(_cfg(env, "x", **kw)).tower.encoder.item_tower.train()
        torch.testing.assert_close(plain(ids), plain(ids))
        noisy = build_model(_cfg(env, "x", **kw, item_dropout=0.3)).tower.encoder.item_tower
        assert not torch.allclose(noisy.train()(ids), noisy(ids))
        torch.testing.assert_close(noisy.eval()(ids), plain.eval()(ids))
    with pytest.raises(ValueError, match="item_dropout"):
        _cfg(env, "x", **kw, item_dropout=1.0)
    # item_init scratch: the trained item layers start random (seeded), the stored
    # states below them are the same
    scratch = build_model(_cfg(env, "x", **kw, item_init="scratch")).state_dict()
    again = build_model(_cfg(env, "x", **kw, item_init="scratch")).state_dict()
    weights = [k for k in item if k.endswith(".weight") and init[k].dim() == 2
               and "layer" in k]
    assert weights, sorted(item)
    for k in weights:
        assert not torch.allclose(scratch[k], init[k]), k
        torch.testing.assert_close(scratch[k], again[k], rtol=0, atol=0, msg=k)
    with torch.no_grad():
        fresh = build_model(_cfg(env, "x", **kw, item_init="scratch")).tower.encoder.item_tower
        torch.testing.assert_close(fresh.inputs(ids)[0], plain.inputs(ids)[0])
        assert not torch.allclose(fresh.eval()(ids), plain.eval()(ids))
    with pytest.raises(ValueError, match="item_init"):
        _cfg(env, "x", **kw, item_init="random")
    with pytest.raises(ValueError, match="only with item_states"):
        _cfg(env, "x", item_init="scratch")
    with pytest.raises(ValueError, match="only with item_states"):
        _cfg(env, "x", item_lr=1e-4)
    with pytest.raises(ValueError, match="not both"):
        _cfg(env, "x", **kw, content_store=env["store"])
    with pytest.raises(ValueError, match="item_embedding='id'"):
        _cfg(env, "x", item_states=item_states)


def test_planted_topic_signal_beats_random_tower(env):
    """Next items follow the user's topic; content vectors carry the topic: the trained
    tower clearly beats the same tower untrained on HR@50 (full-catalogue pool)."""
    cfg = _cfg(env, "planted", item_embedding="content", content_store=env["store"],
               epochs=12, dense_lr=3e-3, cutoffs_per_user=2, num_negatives=64,
               eval_max_users=100, log_every=5)
    random_tower = _untrained_metrics(cfg)
    trained = train_redrec(cfg)
    curve = [c["loss"] for c in trained["curve"]]
    assert curve[-1] < curve[0] - 0.5
    hr_random, hr = random_tower["HR@50"], trained["eval"]["HR@50"]
    assert hr > hr_random + 0.3, (hr, hr_random)
    assert trained["eval"]["MRR"] > 2 * random_tower["MRR"]


# --------------------------------------------------------------------------- errors


def test_center_items_subtracts_the_catalogue_mean(env):
    """center_items: the tower's frozen item vectors are the store's minus their mean
    (history events and candidates alike read them); only with a content store."""
    kw = dict(item_embedding="content", content_store=env["store"])
    plain = build_model(_cfg(env, "c0", **kw)).tower.encoder.item_vectors
    centred = build_model(_cfg(env, "c1", center_items=True, **kw)).tower.encoder.item_vectors
    torch.testing.assert_close(centred, plain - plain.mean(0, keepdim=True))
    assert centred.mean(0).abs().max() < 1e-5 < plain.mean(0).abs().max()
    assert _parser().parse_args(["redrec", "train", "--center-items"]).center_items is True
    with pytest.raises(ValueError, match="center_items: only with frozen item vectors"):
        _cfg(env, "x", center_items=True)


def test_event_mean_and_lm_lr(env):
    """event_mean reaches the tower's skip projection (config and CLI); lm_lr is the user
    LM's own learning rate (a 0-like lr: its layers barely move while the queries,
    projections and skip train at dense_lr)."""
    assert build_model(_cfg(env, "s1", event_mean="output")).tower.encoder.skip_proj is not None
    assert build_model(_cfg(env, "s0")).tower.encoder.skip_proj is None
    args = _parser().parse_args(["redrec", "train", "--event-mean", "output", "--lm-lr", "1e-5"])
    assert args.event_mean == "output" and args.lm_lr == 1e-5
    kw = dict(event_mean="output", dense_lr=3e-3, max_steps=2, evaluate=False)
    init = build_model(_cfg(env, "x", **kw)).state_dict()
    train_redrec(_cfg(env, "lm_slow", lm_lr=1e-9, **kw))
    _, _, c = read_checkpoint(latest_checkpoint(str(env["root"] / "lm_slow" / "checkpoints")))
    lm = [k for k in init if k.startswith("tower.encoder.lm.") and "/model/" + k in c]
    assert lm
    for k in lm:
        torch.testing.assert_close(c["/model/" + k], init[k], rtol=0, atol=1e-6, msg=k)
    for k in ("tower.encoder.queries", "tower.encoder.skip_proj.weight",
              "tower.encoder.output_proj.weight"):
        assert not torch.allclose(c["/model/" + k], init[k]), k
    train_redrec(_cfg(env, "lm_fast", **kw))
    _, _, f = read_checkpoint(latest_checkpoint(str(env["root"] / "lm_fast" / "checkpoints")))
    assert any(not torch.allclose(f["/model/" + k], init[k]) for k in lm)
    with pytest.raises(ValueError, match="event_mean"):
        _cfg(env, "x", event_mean="max")
    with pytest.raises(ValueError, match="lm_lr"):
        _cfg(env, "x", lm_lr=0.0)
    with pytest.raises(ValueError, match="lm_lr"):
        _cfg(env, "x", lm_lr=1e-5, init="frozen")


def test_lm_anchor_pulls_the_lm_back_to_its_start(env):
    """lm_anchor α (L2-SP): with SGD and α = 1/lr every step first returns the LM's
    weights to θ_0 (θ - lr·α(θ - θ_0) = θ_0) and then applies the step's task gradient,
    so after several steps they sit one step away from θ_0, while without the anchor
    they drift by the sum of the steps. The logged loss is the task loss alone."""
    lr = 0.5
    kw = dict(dense_optimizer="sgd", dense_lr=lr, max_steps=6, evaluate=False)
    init = build_model(_cfg(env, "x", **kw)).state_dict()
    lm = [k for k in init if k.startswith("tower.encoder.lm.") and init[k].is_floating_point()]

    def drift(name: str, **extra) -> float:
        out = train_redrec(_cfg(env, name, **kw, **extra))
        _, _, c = read_checkpoint(latest_checkpoint(str(env["root"] / name / "checkpoints")))
        assert all(np.isfinite(p["loss"]) for p in out["curve"])
        return float(sum((c["/model/" + k] - init[k]).pow(2).sum() for k in lm)) ** 0.5

    free, anchored = drift("anchor_0"), drift("anchor_1", lm_anchor=1.0 / lr)
    assert 0 < anchored < 0.6 * free
    assert _parser().parse_args(["redrec", "train", "--lm-anchor", "0.1"]).lm_anchor == 0.1
    with pytest.raises(ValueError, match="lm_anchor"):
        _cfg(env, "x", lm_anchor=-1.0)
    with pytest.raises(ValueError, match="lm_anchor"):
        _cfg(env, "x", lm_anchor=1.0, init="frozen")


def test_bad_configs(env, tmp_path):
    with pytest.raises(ValueError, match="loss"):
        _cfg(env, "x", loss="triplet")
    with pytest.raises(ValueError, match="content_store"):
        _cfg(env, "x", item_embedding="content")
    with pytest.raises(ValueError, match="must exceed window"):
        _cfg(env, "x", last_n=4, window=4)
    with pytest.raises(ValueError, match="no negatives"):
        _cfg(env, "x", num_negatives=0)
    with pytest.raises(ValueError, match="policy"):
        _cfg(env, "x", policy="random")
    with pytest.raises(ValueError, match="quotas"):
        _cfg(env, "x", quotas={"homefeed": 20})
    with pytest.raises(ValueError, match="eval_split"):
        _cfg(env, "x", eval_split="valid")
    yaml_path = tmp_path / "cfg.yaml"
    yaml_path.write_text("data: d\nout: o\nlerning_rate: 0.1\n")
    with pytest.raises(ValueError,
                       match=r"cfg.yaml: unknown RED-Rec option\(s\) \['lerning_rate'\]"):
        load_redrec_config(str(yaml_path))
    with pytest.raises(ValueError, match="missing required"):
        load_redrec_config(None, data="d")
    bad_store = write_vector_store(str(tmp_path / "small_store"),
                                   np.zeros((NUM_ITEMS - 1, 4), np.float32))
    with pytest.raises(ValueError, match="made for 239 items"):
        build_model(_cfg(env, "x", item_embedding="content", content_store=bad_store))
    with pytest.raises(FileNotFoundError, match="not a RED-Rec run"):
        evaluate_run(str(tmp_path))
    with pytest.raises(ValueError, match="fewer than one step"):
        train_redrec(_cfg(env, "big_batch", batch_size=10_000, evaluate=False))
    with pytest.raises(SystemExit):
        _parser().parse_args(["redrec", "train", "--ks", "ten"])


def test_experiment_step_trains_once(env):
    from torchrec_mm.experiment import _get_step

    step = _get_step("redrec_train")
    out = str(env["root"] / "step_run")
    opts = dict(model_path=env["bert"], last_n=16, window=4, embedding_dim=16,
                interests_per_scenario=1, num_negatives=16, batch_size=32, max_steps=2,
                eval_ks=[10], eval_max_users=20)
    first = step(env["data"], out, opts, {})
    assert first["steps"] == 2 and "HR@10" in first["eval"]
    stamp = os.path.getmtime(os.path.join(out, "train_metrics.json"))
    assert step(env["data"], out, opts, {}) == first
    assert os.path.getmtime(os.path.join(out, "train_metrics.json")) == stamp
    with pytest.raises(ValueError, match="set by the experiment"):
        step(env["data"], out, {**opts, "out": "elsewhere"}, {})


@pytest.mark.parametrize("side", ["id", "joint"])
def test_embed_items_caches_the_item_side_for_serving(env, item_states, side):
    """`redrec embed-items` writes exactly the vectors the trained tower gives its
    candidates, loads them into a faiss index, reuses a finished output and refuses a
    run whose config changed since."""
    from torchrec_mm.redrec.item_cache import embed_items, load_item_index
    from torchrec_mm.redrec.sequences import SEQ_FEATURES
    from torchrec_mm.redrec.train import _with_candidates
    from torchrec_mm.redrec.user_features import load_tower

    kw = {} if side == "id" else dict(item_embedding="content", item_states=item_states)
    run = str(env["root"] / f"serve_{side}")
    train_redrec(_cfg(env, f"serve_{side}", max_steps=2, evaluate=False, **kw))
    out = str(env["root"] / f"serve_{side}_items")
    args = _parser().parse_args(["redrec", "embed-items", "--run", run, "--out", out,
                                 "--batch-size", "100", "--no-progress"])
    assert args.func(args) == 0
    index, manifest = load_item_index(out)
    assert manifest["item_side"] == ("id" if side == "id" else "item_states")
    vecs = torch.from_numpy(index.index.reconstruct_n(0, NUM_ITEMS))
    tower, cfg, _ = load_tower(run)
    seq = mix(EventLog.from_dataset(env["data"]), np.array([0]), np.array([10 ** 12]),
              cfg.mix_config())
    kjt = _with_candidates(seq.to_kjt(SEQ_FEATURES), np.arange(NUM_ITEMS),
                           np.array([NUM_ITEMS]))
    with torch.no_grad():
        interests, cands = tower.forward_with_items(kjt)
    torch.testing.assert_close(vecs, cands.values(), rtol=0, atol=1e-5)
    scores, ids = index.retrieve(interests, n=5)     # max over interests, exact
    want = (interests[0] @ cands.values().T).max(0).values.topk(5)
    np.testing.assert_array_equal(ids[0], want.indices.numpy())
    stamp = os.stat(os.path.join(out, "items.safetensors")).st_mtime_ns
    embed_items(run, out, progress=False)
    assert os.stat(os.path.join(out, "items.safetensors")).st_mtime_ns == stamp
    path = os.path.join(run, "config.json")
    raw = json.loads(open(path).read())
    raw["eval_seed"] = 7
    with open(path, "w") as f:
        json.dump(raw, f)
    with pytest.raises(ValueError, match="run embed-items again"):
        load_item_index(out)
    with pytest.raises(ValueError, match="faiss cannot build"):
        embed_items(run, str(env["root"] / "bad_index"), index="NoSuchIndex", progress=False)
    assert not os.path.exists(str(env["root"] / "bad_index"))


def test_item_bias_learns_popularity_and_scores_with_it(env, tmp_path):
    """item_bias: ``"log_count"`` starts at the centred log counts of the train-split
    positives; on a log whose events follow a Zipf popularity a zero-start bias learns
    it (rank correlation with the train counts), the evaluation scores with it (exact
    and faiss Flat agree; a dominant bias lifts an untrained tower to popularity), and
    the served index of `embed-items` scores as the evaluation does."""
    from scipy.stats import spearmanr

    from torchrec_mm.redrec.item_cache import catalogue_vectors, embed_items, load_item_index
    from torchrec_mm.redrec.user_features import load_model

    kw = dict(target_actions=("is_click",))
    model = build_model(_cfg(env, "b0", item_bias="log_count", **kw))
    log = EventLog.from_dataset(env["data"], split_filter="train")
    counts = np.bincount(log.item[log.action_mask(["is_click"], "test")], minlength=NUM_ITEMS)
    want = np.log1p(counts) - np.log1p(counts).mean()
    np.testing.assert_allclose(model.item_bias.weight.detach().numpy(), want, atol=1e-5)
    # a model whose weights a checkpoint will overwrite does not count the log
    loaded = build_model(_cfg(env, "b0", item_bias="log_count", **kw), from_checkpoint=True)
    assert float(loaded.item_bias.weight.abs().max()) == 0.0
    assert float(build_model(_cfg(env, "b1", item_bias="zero")).item_bias.weight.abs().max()) == 0
    assert build_model(_cfg(env, "b2")).item_bias is None
    assert _parser().parse_args(["redrec", "train", "--item-bias", "log_count"]
                                ).item_bias == "log_count"
    with pytest.raises(ValueError, match="item_bias: 'yes' is not one of"):
        _cfg(env, "x", item_bias="yes")
    with pytest.raises(ValueError, match="item_bias_lr: must be finite and > 0"):
        _cfg(env, "x", item_bias_lr=0.0)

    data = str(tmp_path / "zipf")
    generate(SynthConfig(num_users=NUM_USERS, num_items=NUM_ITEMS, num_interactions=4800,
                         num_topics=TOPICS, zipf_exponent=1.2, pop_share=(0.9, 0.9, 0.9),
                         seed=1), data)
    make_split(data)
    cfg = _cfg(env, "zipf_run", data=data, item_bias="zero", item_bias_lr=0.05, epochs=4,
               cutoffs_per_user=2, eval_max_users=100)
    trained = train_redrec(cfg)
    _, _, tensors = read_checkpoint(latest_checkpoint(os.path.join(cfg.out, "checkpoints")))
    learned = next(v for k, v in tensors.items() if k.endswith("item_bias.weight"))
    train_counts = np.bincount(EventLog.from_dataset(data, split_filter="train").item,
                               minlength=NUM_ITEMS)
    seen = train_counts > 0
    rho = spearmanr(learned.numpy()[seen], train_counts[seen]).correlation
    assert rho > 0.6, rho
    # negatives from the train split only: a held-out item's bias is never touched
    assert (~seen).any() and float(learned[torch.from_numpy(~seen)].abs().max()) == 0.0
    flat = evaluate_run(cfg.out, eval_index="Flat", progress=False)["metrics"]
    for k in ("HR@10", "HR@50", "NDCG@10", "MRR@50"):
        assert flat[k] == pytest.approx(trained["eval"][k], abs=1e-6), k
    # both evaluation paths score with the bias: a dominant popularity bias lifts an
    # untrained tower's head from chance to the popularity ranking's
    ctx = init_distributed(0, 1)
    try:
        model = _shard(build_model(cfg), cfg, ctx)
        chance = evaluate_redrec(model, cfg, ctx)
        bias = next(m for m in model.modules() if isinstance(m, ItemBias))
        with torch.no_grad():
            bias.weight.copy_(50.0 * torch.from_numpy(np.log1p(train_counts)))
        for index in ("exact", "Flat"):
            popular = evaluate_redrec(model, dataclasses.replace(cfg, eval_index=index), ctx)
            assert popular["HR@10"] > chance["HR@10"] + 0.2, (index, popular, chance)
    finally:
        dist.destroy_process_group()
    # serving: the item cache holds the bias and 1/τ; the index retrieves by
    # scale * max_k cos + bias, the evaluation's score
    out = str(tmp_path / "items")
    manifest = embed_items(cfg.out, out, progress=False)
    index, _ = load_item_index(out)
    model, _, _ = load_model(cfg.out)
    assert manifest["item_bias"] and manifest["query_scale"] == pytest.approx(
        1.0 / float(model.tau()))
    interests = torch.randn(5, 3, 16)
    vecs = catalogue_vectors(model.tower)
    want = (F.normalize(interests, dim=-1) @ vecs.T).amax(1) * manifest["query_scale"] \
        + model.item_bias.weight.detach()
    scores, ids = index.retrieve(interests, n=8)
    np.testing.assert_array_equal(ids, want.topk(8).indices.numpy())
    np.testing.assert_allclose(scores, want.topk(8).values.numpy(), rtol=1e-4, atol=1e-4)


def test_negative_distributions(env):
    """Sampled negatives: ``uniform`` draws any catalogue id (held-out cold items too),
    ``seen`` only items of the train split, uniformly, ``popularity`` ∝ count^alpha of
    the train split."""
    from torchrec_mm.redrec.train import negative_distribution

    log = EventLog.from_dataset(env["data"], split_filter="train")
    counts = np.bincount(log.item, minlength=NUM_ITEMS)
    unseen = counts == 0
    assert 0 < unseen.sum() < NUM_ITEMS  # the split holds out cold items
    draws = {}
    for kind in ("uniform", "seen", "popularity"):
        cfg = _cfg(env, "neg", negatives=kind, num_negatives=4000)
        probs = negative_distribution(log, NUM_ITEMS, cfg)
        draws[kind] = sample_negatives(NUM_ITEMS, cfg, probs, 0, 0)
        if kind == "seen":
            np.testing.assert_allclose(probs, np.where(unseen, 0.0, 1.0 / (~unseen).sum()))
        if kind == "popularity":
            np.testing.assert_allclose(probs, counts ** 0.75 / (counts ** 0.75).sum())
    assert unseen[draws["uniform"]].any()
    assert not unseen[draws["seen"]].any() and not unseen[draws["popularity"]].any()
    assert len(np.unique(draws["seen"])) > 0.9 * (~unseen).sum()  # spread over all of them
    assert _parser().parse_args(["redrec", "train", "--negatives", "seen"]).negatives == "seen"
