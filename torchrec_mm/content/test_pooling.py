import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrec_mm.content.pooling import AttentionPooling


def masked_mean_reference(hidden, mask):
    """Per-row loop: mean of the valid token states."""
    out = torch.zeros(hidden.shape[0], hidden.shape[-1], dtype=torch.float64)
    for b in range(hidden.shape[0]):
        rows = [hidden[b, t].double() for t in range(hidden.shape[1]) if mask[b, t]]
        if rows:
            out[b] = torch.stack(rows).mean(0)
    return out


def attention_reference(hidden, mask, query):
    out = torch.zeros(hidden.shape[0], hidden.shape[-1], dtype=torch.float64)
    for b in range(hidden.shape[0]):
        valid = [t for t in range(hidden.shape[1]) if mask[b, t]]
        scores = torch.tensor([float(hidden[b, t].double() @ query.double())
                               / math.sqrt(hidden.shape[-1]) for t in valid], dtype=torch.float64)
        w = torch.softmax(scores, 0)
        out[b] = sum(w[i] * hidden[b, t].double() for i, t in enumerate(valid))
    return out


def _batch(seed, b, t, d):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, d, generator=g) * 3
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return hidden, mask


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), b=st.integers(1, 5), t=st.integers(1, 9),
       d=st.integers(1, 16))
def test_zero_init_is_masked_mean(seed, b, t, d):
    hidden, mask = _batch(seed, b, t, d)
    pool = AttentionPooling(d)
    assert torch.count_nonzero(pool.query) == 0
    torch.testing.assert_close(pool(hidden, mask).double(), masked_mean_reference(hidden, mask),
                               rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), b=st.integers(1, 4), t=st.integers(1, 7))
def test_trained_query_matches_softmax_reference(seed, b, t):
    d = 8
    hidden, mask = _batch(seed, b, t, d)
    pool = AttentionPooling(d)
    with torch.no_grad():
        pool.query.copy_(torch.randn(d, generator=torch.Generator().manual_seed(seed + 1)))
    out = pool(hidden, mask).double()
    torch.testing.assert_close(out, attention_reference(hidden, mask, pool.query.detach()),
                               rtol=1e-5, atol=1e-5)
    if b > 0 and t > 1 and bool((mask.sum(1) > 1).any()):
        # padding never leaks: changing padded positions changes nothing
        noisy = hidden.masked_fill(~mask[..., None], 1e4)
        torch.testing.assert_close(pool(noisy, mask), pool(hidden, mask))


def test_layer_broadcast_and_padding_and_grad():
    hidden, mask = _batch(0, 3, 6, 4)
    per_layer = torch.stack([hidden, 2 * hidden, -hidden], 1)  # [B, L, T, D]
    pool = AttentionPooling(4)
    out = pool(per_layer, mask[:, None])
    assert out.shape == (3, 3, 4)
    for layer in range(3):
        torch.testing.assert_close(out[:, layer], pool(per_layer[:, layer], mask))
    # a row without valid tokens pools to zeros, not NaN
    empty = pool(hidden, torch.zeros_like(mask))
    assert torch.equal(empty, torch.zeros_like(empty))
    # the query is learnable
    pool(hidden, mask).pow(2).sum().backward()
    assert pool.query.grad is not None and pool.query.grad.abs().sum() > 0


def test_bf16_inputs():
    hidden, mask = _batch(1, 2, 5, 8)
    out = AttentionPooling(8)(hidden.bfloat16(), mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), masked_mean_reference(hidden.bfloat16().float(), mask),
                               rtol=2e-2, atol=2e-2)
