"""Tests of :func:`torchrec_mm.redrec.readout.forward_at`: the last layer computed at
the read positions only equals the full forward's rows (values and gradients), for the
bundled MiniLM and tiny BERTs; other architectures take the full forward."""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrec_mm.content.testing import build_tiny_llama
from torchrec_mm.redrec.readout import forward_at, layer_stack, supports_fast_readout
from torchrec_mm.redrec.test_tower import build_tiny_bert
from torchrec_mm.redrec.tower import load_lm

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = pytest.mark.usefixtures("one_thread")  # redrec/conftest.py


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return load_lm(build_tiny_bert(str(tmp_path_factory.mktemp("readout") / "bert"), seed=3))


@pytest.fixture(scope="module")
def minilm():
    from torchrec_mm.redrec.tower import UserTowerConfig

    return load_lm(UserTowerConfig(num_items=1).resolved_model_path())


def _inputs(lm, lengths, reads, seed):
    """Random embeddings, a right-padded mask and ``reads`` valid positions per row."""
    g = torch.Generator().manual_seed(seed)
    H = int(lm.config.hidden_size)
    B, T = len(lengths), max(lengths)
    x = torch.randn(B, T, H, generator=g)
    lens = torch.tensor(lengths)
    mask = torch.arange(T)[None, :] < lens[:, None]
    cols = (torch.rand(B, reads, generator=g) * lens[:, None]).long()
    rows = torch.arange(B)[:, None].expand(B, reads)
    return x, mask, rows, cols


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=5),
       reads=st.integers(1, 4), seed=st.integers(0, 2 ** 16),
       absorbed=st.sampled_from([None, False, True]))
def test_fast_path_equals_the_full_forward(bert, lengths, reads, seed, absorbed):
    """Any lengths (padding of any size), any read positions, repeated ones included,
    either attention form."""
    assert supports_fast_readout(bert)
    x, mask, rows, cols = _inputs(bert, lengths, reads, seed)
    with torch.no_grad():
        want = forward_at(bert, x, mask, rows, cols, fast=False)
        got = forward_at(bert, x, mask, rows, cols, absorbed=absorbed)
    assert got.shape == (len(lengths), reads, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_form_choice():
    """The item tower's single read over a few dozen tokens takes the absorbed form, a
    read of every position the projected one."""
    from torchrec_mm.redrec.readout import _absorbed_is_cheaper

    assert _absorbed_is_cheaper(B=512, T=52, P=1, H=384, heads=12)
    assert _absorbed_is_cheaper(B=16, T=131, P=3, H=384, heads=12)
    assert not _absorbed_is_cheaper(B=16, T=131, P=131, H=384, heads=12)


@pytest.mark.parametrize("absorbed", [False, True])
def test_minilm_values_and_gradients(minilm, absorbed):
    """The bundled MiniLM (6 layers, 384-d): outputs and the gradients of every
    parameter (the key bias's, zero in exact arithmetic, included) and of the inputs
    match the full forward, in both attention forms."""
    x, mask, rows, cols = _inputs(minilm, [20, 7, 13], 3, seed=0)
    minilm.eval()  # dropout off: both paths are the same function
    outs, grads = [], []
    for fast in (False, True):
        minilm.zero_grad()
        xi = x.clone().requires_grad_(True)
        y = forward_at(minilm, xi, mask, rows, cols, fast=fast, absorbed=absorbed)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad.clone() if p.grad is not None else None
                                  for p in minilm.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    for a, b in zip(grads[0], grads[1]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)
    # the hook is gone: the model still runs whole afterwards
    assert not layer_stack(minilm)[-1]._forward_pre_hooks


def test_dropout_in_training_mode(tmp_path):
    """With dropout on, the fast path is random like the full forward and is the same
    function in eval mode."""
    lm = load_lm(build_tiny_bert(str(tmp_path / "bert"), dropout=0.5))
    x, mask, rows, cols = _inputs(lm, [9, 4], 2, seed=1)
    for absorbed in (False, True):
        lm.train()
        a = forward_at(lm, x, mask, rows, cols, absorbed=absorbed)
        b = forward_at(lm, x, mask, rows, cols, absorbed=absorbed)
        assert not torch.allclose(a, b)
        lm.eval()
        torch.testing.assert_close(forward_at(lm, x, mask, rows, cols, absorbed=absorbed),
                                   forward_at(lm, x, mask, rows, cols, fast=False))


def test_other_architectures_take_the_full_forward(tmp_path):
    """A decoder-only model (final norm after the stack) is not cut; the result is the
    full forward's rows; forcing the fast path on it is refused."""
    lm = load_lm(build_tiny_llama(str(tmp_path / "llama"), num_layers=2))
    assert not supports_fast_readout(lm)
    x, mask, rows, cols = _inputs(lm, [6, 3], 2, seed=2)
    with torch.no_grad():
        h = lm(inputs_embeds=x, attention_mask=mask.long()).last_hidden_state
        torch.testing.assert_close(forward_at(lm, x, mask, rows, cols), h[rows, cols])
    with pytest.raises(ValueError, match="not a BERT-family layer"):
        forward_at(lm, x, mask, rows, cols, fast=True)
