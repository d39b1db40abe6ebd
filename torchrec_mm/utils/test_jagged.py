import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrec_mm.utils import jagged


def _reference(table, index, lengths, mode, weights):
    """Per-segment loop over the gathered rows."""
    out, start = [], 0
    for n in lengths.tolist():
        rows = table[index[start:start + n]]
        if weights is not None:
            rows = rows * weights[start:start + n, None]
        start += n
        if n == 0:
            out.append(table.sum(0) * 0.0)  # zero, in the graph
        else:
            out.append(rows.mean(0) if mode == "mean" else rows.sum(0))
    return torch.stack(out)


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 7), min_size=1, max_size=8),
       rows=st.integers(1, 12), dim=st.sampled_from([1, 3, 8]),
       mode=st.sampled_from(["mean", "sum", "weighted"]), seed=st.integers(0, 999))
def test_gather_pool_matches_loop_reference(lengths, rows, dim, mode, seed):
    """Values and the table's gradient (the transposed-bag backward) equal a per-segment
    loop, incl. empty segments, repeated rows and per-value weights."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    n = int(lengths.sum())
    index = torch.randint(0, rows, (n,), generator=g)
    weights = torch.rand(n, generator=g) if mode == "weighted" else None
    pool_mode = "sum" if mode == "weighted" else mode
    table = torch.randn(rows, dim, generator=g, dtype=torch.float64, requires_grad=True)
    w = None if weights is None else weights.double()
    got = jagged.gather_pool(table, index, lengths, pool_mode, w)
    ref = _reference(table, index, lengths, pool_mode, w)
    torch.testing.assert_close(got, ref)
    up = torch.randn(got.shape, generator=g, dtype=torch.float64)
    (g_got,) = torch.autograd.grad((got * up).sum(), table, allow_unused=True)
    (g_ref,) = torch.autograd.grad((ref * up).sum(), table, allow_unused=True)
    g_got = torch.zeros_like(table) if g_got is None else g_got
    g_ref = torch.zeros_like(table) if g_ref is None else g_ref
    torch.testing.assert_close(g_got, g_ref)


def test_gather_pool_grad_weights_take_the_plain_path():
    """Weights that require grad still get their gradient (plain embedding_bag)."""
    table = torch.randn(4, 2, dtype=torch.float64)
    weights = torch.rand(5, dtype=torch.float64, requires_grad=True)
    index, lengths = torch.tensor([0, 1, 1, 3, 2]), torch.tensor([2, 0, 3])
    out = jagged.gather_pool(table, index, lengths, "sum", weights)
    (gw,) = torch.autograd.grad(out.sum(), weights)
    torch.testing.assert_close(gw, table[index].sum(1))
