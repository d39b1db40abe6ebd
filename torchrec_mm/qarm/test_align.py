"""QARM item alignment: planted pairs are learned, resuming equals running through,
the artefact feeds `qarm codes`, bad input."""

import argparse
import json
import os

import numpy as np
import pytest
import torch

from torchrec_mm.qarm.align import AlignConfig, align_items, pair_loss, pair_recall

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from torchrec_mm.data.split import make_split
    from torchrec_mm.data.synth import SynthConfig, generate

    d = str(tmp_path_factory.mktemp("qarm_align") / "data")
    generate(SynthConfig(num_users=200, num_items=300, num_interactions=20000), d)
    make_split(d)
    return d


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from torchrec_mm.content.testing import build_tiny_llama

    return build_tiny_llama(str(tmp_path_factory.mktemp("tiny") / "llama"), num_layers=2)


def planted_pairs(data: str, per_item: int = 4) -> dict:
    """A business relation the pre-trained content does not hold: items of topic t
    pair with items of topic t xor 1 (topics 0-1, 2-3, ... are bought together), so
    the partner's text is about another topic than the item's."""
    from torchrec_mm.data.synth import SynthTruth

    topic = SynthTruth.load(data).item_topic
    rng = np.random.default_rng(0)
    a, b = [], []
    for i in range(len(topic)):
        same = np.nonzero(topic == (topic[i] ^ 1))[0]
        for j in rng.choice(same, min(per_item, len(same)), replace=False):
            a.append(i)
            b.append(j)
    return {"a": np.array(a), "b": np.array(b), "stats": {"planted": len(a)}}


def test_pair_loss_and_recall_reference():
    g = torch.Generator().manual_seed(0)
    ha = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=1)
    hb = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=1)
    logits = ha @ hb.T / 0.5
    ref = 0.5 * (sum(-torch.log_softmax(logits[i], 0)[i] for i in range(6))
                 + sum(-torch.log_softmax(logits[:, i], 0)[i] for i in range(6))) / 6
    torch.testing.assert_close(pair_loss(ha, hb, 0.5), ref)
    # recall: brute force with the query itself excluded
    reps = torch.randn(30, 5, generator=g)
    a, b = np.arange(10), np.arange(10, 20)
    cand = np.arange(30)
    x = torch.nn.functional.normalize(reps, dim=1)
    sims = x[a] @ x.T
    sims[np.arange(10), a] = -9
    top = sims.topk(5, dim=1).indices.numpy()
    want = float((top == b[:, None]).any(1).mean())
    assert pair_recall(reps, a, b, cand, [5])["recall@5"] == pytest.approx(want)


def test_planted_pairs_are_learned_and_feed_codes(data, tmp_path):
    """MiniLM (frozen) + head: the pre-trained space misses the planted cross-topic
    relation (recall near chance); aligned, held-out partners are found."""
    out = str(tmp_path / "aligned")
    cfg = AlignConfig(trainable_layers=0, dim=16, hidden=64, epochs=4, batch_size=32,
                      lr_head=3e-3, holdout_frac=0.2, max_length=48, recall_ks=(10,))
    m = align_items(data, out, cfg, pairs=planted_pairs(data), progress=False)
    before, after = m["before"]["recall@10"], m["after"]["recall@10"]
    chance = m["after"]["chance@10"]
    assert before < 2 * chance
    assert after >= before + 0.1 and after >= 4 * chance, m["epochs"]
    with open(os.path.join(out, "align_metrics.json")) as f:
        assert json.load(f)["after"]["recall@10"] == after
    from torchrec_mm.qarm.codes import load_codes, load_representations

    reps, has = load_representations(os.path.join(out, "aligned.safetensors"))
    assert reps.shape == (300, 16) and has.all()
    np.testing.assert_allclose(np.linalg.norm(reps, axis=1), 1.0, atol=1e-5)
    # the artefact is what `qarm codes` reads
    from torchrec_mm.qarm.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    codes_dir = str(tmp_path / "codes")
    args = parser.parse_args(["qarm", "codes", "--reps", os.path.join(out, "aligned.safetensors"),
                              "--out", codes_dir, "--k", "5", "--levels", "3",
                              "--codebook-size", "8", "--codebook-items", "train", "--data",
                              data, "--no-progress"])
    assert args.func(args) == 0
    codes = load_codes(codes_dir)
    assert codes.rq.shape == (300, 3) and codes.vq.shape == (300, 5)


def test_resume_equals_uninterrupted(data, tiny_llama, tmp_path):
    pairs = planted_pairs(data, per_item=2)
    kw = dict(model_path=tiny_llama, trainable_layers=1, dim=8, hidden=32, batch_size=32,
              max_length=24, max_pairs=128, recall_ks=(10,))
    full = align_items(data, str(tmp_path / "full"), AlignConfig(epochs=2, **kw), pairs=pairs,
                       progress=False)
    part = str(tmp_path / "part")
    align_items(data, part, AlignConfig(epochs=1, **kw), pairs=pairs, progress=False)
    resumed = align_items(data, part, AlignConfig(epochs=2, **kw), pairs=pairs, progress=False)
    assert resumed["after"] == pytest.approx(full["after"])
    assert full["epochs"][2]["loss"] == pytest.approx(resumed["epochs"][2]["loss"])
    with pytest.raises(FileExistsError, match="other settings"):
        align_items(data, part, AlignConfig(epochs=2, **{**kw, "dim": 4}), pairs=pairs,
                    progress=False)


def test_too_few_pairs(data, tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="only 2 pairs"):
        align_items(data, str(tmp_path / "x"), AlignConfig(model_path=tiny_llama),
                    pairs={"a": np.array([1, 2]), "b": np.array([3, 4])}, progress=False)
