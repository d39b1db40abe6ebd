"""AlignedRepresenter: the reloaded alignment model reproduces ``aligned.safetensors``
for catalogue items from their raw text — fine-tuned encoder layers, and the frozen
encoder over a content store (float16 pooled states) — and refuses what does not fit."""

import json
import os

import numpy as np
import pytest
import torch

from torchrec_mm.qarm.align import AlignConfig, align_items
from torchrec_mm.qarm.represent import AlignedRepresenter, load_align_config
from torchrec_mm.utils.io import load_tensors

os.environ.setdefault("HF_HUB_OFFLINE", "1")
NUM_ITEMS = 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from torchrec_mm.content.testing import build_tiny_llama
    from torchrec_mm.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("qarm_represent")
    data = str(root / "data")
    generate(SynthConfig(num_users=20, num_items=NUM_ITEMS, num_interactions=300), data)
    llama = build_tiny_llama(str(root / "llama"), num_layers=2)
    rng = np.random.default_rng(0)
    pairs = {"a": rng.integers(0, NUM_ITEMS, 96), "b": rng.integers(0, NUM_ITEMS, 96)}
    return data, llama, pairs, root


def _catalogue_texts(data: str):
    from torchrec_mm.content.encode_job import read_items

    items = read_items(data)
    assert items.item_ids.tolist() == list(range(NUM_ITEMS))
    return items.texts


def test_reproduces_finetuned_alignment(setup):
    data, llama, pairs, root = setup
    out = str(root / "aligned_ft")
    cfg = AlignConfig(model_path=llama, trainable_layers=1, dim=8, hidden=16, epochs=1,
                      batch_size=32, max_length=40, lr_encoder=5e-3, recall_ks=(5,))
    align_items(data, out, cfg, pairs=pairs, progress=False)
    rep = AlignedRepresenter.load(out, batch_size=7)  # other batches than align used
    assert rep.dim == 8 and rep.pooled_dtype is None
    assert load_align_config(out).trainable_layers == 1
    texts = _catalogue_texts(data)
    got = rep.represent(texts)
    want = load_tensors(os.path.join(out, "aligned.safetensors"))["reps"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(NUM_ITEMS))
    # the fine-tuned layer matters: the pre-trained encoder with the same head differs
    from torchrec_mm.content.encoder import ContentEncoder, ContentEncoderConfig

    plain = ContentEncoder(ContentEncoderConfig(model_path=llama, max_length=40))
    other = rep.head_of(plain.encode_texts(texts).pooled)
    assert (other - want).abs().max() > 1e-3


def test_reproduces_frozen_alignment_over_content_store(setup):
    """The demo's setting: trainable_layers 0 reads float16 pooled states from a
    content store encoded with another max_length; the representer rebuilds the
    store's encoder and rounds like the store."""
    from torchrec_mm.content.encode_job import encode_items
    from torchrec_mm.content.encoder import ContentEncoderConfig

    data, llama, pairs, root = setup
    content = str(root / "content")
    encode_items(data, content, ContentEncoderConfig(model_path=llama, max_length=56),
                 batch_size=16, group_sample=0, progress=False)
    out = str(root / "aligned_frozen")
    cfg = AlignConfig(model_path=llama, trainable_layers=0, dim=6, hidden=16, epochs=1,
                      batch_size=32, max_length=24, content_store=content, recall_ks=(5,))
    align_items(data, out, cfg, pairs=pairs, progress=False)
    rep = AlignedRepresenter.load(out)
    assert rep.pooled_dtype == torch.float16 and rep.encoder.max_length == 56
    got = rep.represent(_catalogue_texts(data))
    want = load_tensors(os.path.join(out, "aligned.safetensors"))["reps"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_refuses_missing_or_mismatched(setup, tmp_path):
    data, llama, pairs, root = setup
    with pytest.raises(FileNotFoundError, match="qarm align"):
        AlignedRepresenter.load(str(tmp_path))
    # a config that does not match the checkpoint (another head width)
    src = str(root / "aligned_ft")
    if not os.path.exists(os.path.join(src, "align_metrics.json")):
        pytest.skip("needs test_reproduces_finetuned_alignment's output")
    import shutil

    bad = str(tmp_path / "bad")
    shutil.copytree(src, bad)
    path = os.path.join(bad, "align_metrics.json")
    with open(path) as f:
        metrics = json.load(f)
    metrics["config"]["trainable_layers"] = 2  # the checkpoint holds 1 layer
    with open(path, "w") as f:
        json.dump(metrics, f)
    with pytest.raises(ValueError, match="does not fit"):
        AlignedRepresenter.load(bad)
