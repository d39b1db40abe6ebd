"""Tests of the jointly trained RED-Rec item tower (stored states of the bottom layers,
top layers trained): parity with the full content encoder (BERT-style MiniLM and a
decoder-only tiny Llama), batch independence, gradients, bad input, atomic output."""

import json
import os

import numpy as np
import pytest
import torch

from torchrec_mm.content.encoder import ContentEncoder, ContentEncoderConfig
from torchrec_mm.content.testing import build_tiny_llama, item_texts, write_items
from torchrec_mm.redrec import item_tower as it
from torchrec_mm.redrec.item_tower import ItemTower, build_item_states

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = pytest.mark.usefixtures("one_thread")  # redrec/conftest.py

N = 24


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Items 0..N-1 with texts, except item 5 (no row: no content); catalogue N."""
    root = tmp_path_factory.mktemp("item_tower")
    texts = item_texts(N, seed=1)
    ids = [i for i in range(N) if i != 5]
    write_items(str(root / "data"), [texts[i] for i in ids], item_ids=ids)
    return {"root": root, "data": str(root / "data"), "texts": texts}


@pytest.fixture(scope="module")
def llama(data):
    return build_tiny_llama(str(data["root"] / "llama"), num_layers=4)


@pytest.fixture(scope="module")
def minilm_states(data):
    out = str(data["root"] / "minilm_k2")
    build_item_states(data["data"], out, layers=2, num_items=N, progress=False,
                      encoder_config=ContentEncoderConfig(max_length=48))
    return out


def _full_emb(config: ContentEncoderConfig, texts):
    enc = ContentEncoder(config).eval()
    with torch.no_grad():
        return enc(**enc.tokenize(texts)).emb_token.float()


def test_minilm_top_layers_reproduce_the_full_encoder(data, minilm_states):
    """BERT path (embedding layer replaced by a pass-through): every item, including
    the one without content (the prompt of an empty text), equals the full encoder's
    [EMB] state up to the fp16 storage of the states."""
    manifest = json.load(open(os.path.join(minilm_states, it.MANIFEST_FILE)))
    assert manifest["layers"] == 2 and manifest["total_layers"] == 6
    assert manifest["num_items"] == N and manifest["parity_max_abs_err"] < it.PARITY_TOL
    tower = ItemTower(minilm_states).eval()
    assert type(tower.lm.embeddings).__name__ == "_PassThroughEmbeddings"
    with torch.no_grad():
        got = tower(torch.arange(N))
    texts = list(data["texts"])
    texts[5] = ""
    want = _full_emb(ContentEncoderConfig(max_length=48), texts)
    cos = torch.nn.functional.cosine_similarity(got, want, dim=1)
    assert float(cos.min()) > 0.9999, cos
    assert float((got - want).abs().max()) < it.PARITY_TOL
    # the stored states are the hidden states that enter layer 5 of 6, not the input
    assert not torch.allclose(got, tower.inputs(torch.arange(N))[0][:, 0], atol=1e-2)


def test_decoder_model_and_batch_independence(data, llama):
    out = str(data["root"] / "llama_k1")
    cfg = ContentEncoderConfig(model_path=llama, max_length=32)
    build_item_states(data["data"], out, layers=1, encoder_config=cfg, num_items=N,
                      progress=False)
    tower = ItemTower(out).eval()
    with torch.no_grad():
        every = tower(torch.arange(N))
        some = tower(torch.tensor([7, 3, 3, 20]))    # other padding, a repeated id
    np.testing.assert_allclose(some.numpy(), every[[7, 3, 3, 20]].numpy(), atol=1e-5)
    texts = list(data["texts"])
    texts[5] = ""
    np.testing.assert_allclose(every.numpy(), _full_emb(cfg, texts).numpy(), atol=it.PARITY_TOL)


def test_gradients_reach_the_top_layers_only(data, llama):
    out = str(data["root"] / "llama_k1g")
    build_item_states(data["data"], out, layers=1, num_items=N, progress=False,
                      encoder_config=ContentEncoderConfig(model_path=llama, max_length=32))
    tower = ItemTower(out)
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert trainable and all(".layers.0." in n or "norm" in n for n in trainable), trainable
    tower(torch.tensor([1, 2, 3])).pow(2).sum().backward()
    grads = [p.grad for n, p in tower.named_parameters() if n in trainable]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    frozen = ItemTower(out, init="frozen")
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not any("states" in k for k in tower.state_dict())  # memory map, not a buffer


def test_reuse_and_rebuild(data, llama):
    out = str(data["root"] / "llama_reuse")
    cfg = ContentEncoderConfig(model_path=llama, max_length=32)
    build_item_states(data["data"], out, layers=1, encoder_config=cfg, num_items=N,
                      progress=False)
    states = os.path.join(out, it.STATES_FILE)
    stamp = os.stat(states).st_mtime_ns
    build_item_states(data["data"], out, layers=1, encoder_config=cfg, num_items=N,
                      progress=False)
    assert os.stat(states).st_mtime_ns == stamp                      # same settings: reused
    m = build_item_states(data["data"], out, layers=2, encoder_config=cfg, num_items=N,
                          progress=False)
    assert m["layers"] == 2 and ItemTower(out).lm.config.num_hidden_layers == 2


def test_bad_input(data, llama, tmp_path):
    cfg = ContentEncoderConfig(model_path=llama, max_length=32)
    with pytest.raises(ValueError, match=r"layers must be in \[1, 4\]"):
        build_item_states(data["data"], str(tmp_path / "x"), layers=5, encoder_config=cfg,
                          num_items=N, progress=False)
    with pytest.raises(ValueError, match="item_id 23 is not below the catalogue size 10"):
        build_item_states(data["data"], str(tmp_path / "x"), layers=1, encoder_config=cfg,
                          num_items=10, progress=False)
    with pytest.raises(FileNotFoundError, match="redrec item-states"):
        ItemTower(str(tmp_path / "missing"))
    out = str(tmp_path / "ok")
    build_item_states(data["data"], out, layers=1, encoder_config=cfg, num_items=N,
                      progress=False)
    with pytest.raises(ValueError, match=r"item id 24 is not in \[0, 24\)"):
        ItemTower(out)(torch.tensor([1, 24]))
    with pytest.raises(ValueError, match="init must be"):
        ItemTower(out, init="random")


def test_refused_split_leaves_nothing_behind(data, llama, tmp_path, monkeypatch):
    """An architecture whose top layers do not reproduce its output is refused, and no
    output (nor a temporary directory) is left."""
    monkeypatch.setattr(it, "PARITY_TOL", -1.0)
    out = tmp_path / "refused"
    with pytest.raises(ValueError, match="cannot be split there"):
        build_item_states(data["data"], str(out), layers=1, num_items=N, progress=False,
                          encoder_config=ContentEncoderConfig(model_path=llama,
                                                              max_length=32))
    assert os.listdir(tmp_path) == []


def test_cli_and_experiment_step(data, llama, tmp_path, capsys):
    import argparse

    from torchrec_mm.experiment import _get_step
    from torchrec_mm.redrec import cli as redrec_cli

    p = argparse.ArgumentParser()
    redrec_cli.register(p.add_subparsers(dest="command"))
    from torchrec_mm.data.synth import SynthConfig, generate

    data_dir = str(tmp_path / "data")
    generate(SynthConfig(num_users=10, num_items=8, num_topics=4, num_interactions=40,
                         seed=0), data_dir)
    args = p.parse_args(["redrec", "item-states", "--data", data_dir, "--out",
                         str(tmp_path / "cli"), "--layers", "2", "--model", llama,
                         "--max-length", "32", "--no-progress"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["num_items"] == 8 and printed["layers"] == 2
    assert ItemTower(str(tmp_path / "cli")).num_items == 8
    step = _get_step("redrec_item_states")
    got = step(data_dir, str(tmp_path / "step"), {"layers": 1, "model_path": llama,
                                                  "max_length": 32}, {})
    assert ItemTower(got["item_states"]).lm.config.num_hidden_layers == 1
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['layer'\]"):
        step(data_dir, str(tmp_path / "step2"), {"layer": 1}, {})


def test_vision_language_item_lm_reads_images(tmp_path):
    """A LLaVA-style item LM: the stored states hold each item's image tokens, so the
    top layer run from them equals the full encoder's [EMB] state *with* the image
    (parity), items with an image differ from their text alone, items without one do
    not (item 3 has no row: the empty text); changing an image file rebuilds;
    use_images=False stores the text only."""
    from PIL import Image

    from torchrec_mm.content.testing import build_tiny_llava

    llava = build_tiny_llava(str(tmp_path / "llava"))
    data = str(tmp_path / "data")
    os.makedirs(os.path.join(data, "img"))
    for i in range(2):
        pixels = np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(data, "img", f"{i}.png"))
    n = 7
    texts = item_texts(n, seed=2)
    texts[3] = ""
    rel = ["img/0.png", None, "img/1.png", None, None, "img/0.png", None]
    ids = [i for i in range(n) if i != 3]
    write_items(data, [texts[i] for i in ids], item_ids=ids, image_paths=[rel[i] for i in ids])
    cfg = ContentEncoderConfig(model_path=llava, max_length=48)
    out = str(tmp_path / "states")
    manifest = build_item_states(data, out, layers=1, encoder_config=cfg, num_items=n,
                                 progress=False)
    assert manifest["use_images"] and manifest["parity_max_abs_err"] < it.PARITY_TOL
    images = [None if p is None else os.path.join(data, p) for p in rel]
    enc = ContentEncoder(cfg).eval()
    with torch.no_grad():
        got = ItemTower(out).eval()(torch.arange(n))
        want = enc(**enc.tokenize(texts, images)).emb_token.float()
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=it.PARITY_TOL)

    text_only = str(tmp_path / "text_only")
    assert not build_item_states(data, text_only, layers=1, encoder_config=cfg, num_items=n,
                                 progress=False, use_images=False)["use_images"]
    with torch.no_grad():
        plain = ItemTower(text_only).eval()(torch.arange(n))
    diff = (got - plain).abs().amax(1)
    has = torch.tensor([p is not None for p in rel])
    assert bool((diff[has] > 1e-2).all()) and bool((diff[~has] < 1e-5).all()), diff

    before = json.load(open(os.path.join(out, it.MANIFEST_FILE)))["items_fingerprint"]
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(os.path.join(data, "img", "1.png"))
    after = build_item_states(data, out, layers=1, encoder_config=cfg, num_items=n,
                              progress=False)
    assert after["items_fingerprint"] != before
    from torchrec_mm.data.schema import DataError

    write_items(data, [texts[i] for i in ids], item_ids=ids,
                image_paths=[("img/missing.png" if i == 5 else rel[i]) for i in ids])
    with pytest.raises(DataError, match="image_path.*missing.png"):
        build_item_states(data, str(tmp_path / "bad"), layers=1, encoder_config=cfg,
                          num_items=n, progress=False)
    assert not os.path.exists(str(tmp_path / "bad"))
