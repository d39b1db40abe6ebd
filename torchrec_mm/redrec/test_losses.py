"""Tests of the RED-Rec losses: loop references of eq. 6 and A5–A6, the temperature,
accidental-hit masking, Hungarian matching vs brute force, planted clusters."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrec_mm.redrec.losses import (
    LearnableTemperature,
    assign_window,
    match_clusters_to_interests,
    multi_interest_window_loss,
    nce_loss,
    single_interest_loss,
    spherical_kmeans,
    window_nce_loss,
)

FAST = settings(max_examples=30, deadline=None)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _lse_loss(logits):
    mx = max(logits)
    return mx + math.log(sum(math.exp(v - mx) for v in logits)) - logits[0]


def ref_nce(user, pos, neg, tau, in_batch, pos_ids=None, neg_ids=None, pos_bias=None,
            neg_bias=None):
    """Eq. 6, one row at a time (+ an item's bias on each of its logits)."""
    pb = np.zeros(pos.shape[0]) if pos_bias is None else pos_bias
    nb = np.zeros(0 if neg is None else neg.shape[0]) if neg_bias is None else neg_bias
    out = []
    for b in range(user.shape[0]):
        logits = [_cos(user[b], pos[b]) / tau + pb[b]]
        if in_batch:
            for j in range(user.shape[0]):
                if j != b and (pos_ids is None or pos_ids[j] != pos_ids[b]):
                    logits.append(_cos(user[b], pos[j]) / tau + pb[j])
        if neg is not None:
            for m in range(neg.shape[0]):
                if neg_ids is None or neg_ids[m] != pos_ids[b]:
                    logits.append(_cos(user[b], neg[m]) / tau + nb[m])
        out.append(_lse_loss(logits))
    return np.array(out)


def ref_window(interests, window, mask, item_interest, neg, tau, in_batch,
               window_ids=None, neg_ids=None, window_bias=None, neg_bias=None):
    """Eq. A5–A6, one (user, window item) at a time (+ an item's bias on each of its
    logits); returns per-user losses."""
    bsz, w = mask.shape
    wb = np.zeros((bsz, w)) if window_bias is None else window_bias
    nb = np.zeros(0 if neg is None else neg.shape[0]) if neg_bias is None else neg_bias
    per_user = np.zeros(bsz)
    for b in range(bsz):
        items = [i for i in range(w) if mask[b, i]]
        total = 0.0
        for i in range(len(items)):
            t = items[i]
            r = interests[b, item_interest[b, t]]
            logits = [_cos(window[b, t], r) / tau + wb[b, t]]
            if neg is not None:
                for m in range(neg.shape[0]):
                    if neg_ids is None or neg_ids[m] != window_ids[b, t]:
                        logits.append(_cos(r, neg[m]) / tau + nb[m])
            if in_batch:
                for b2 in range(bsz):
                    for t2 in range(w):
                        if b2 == b or not mask[b2, t2]:
                            continue
                        if window_ids is not None and window_ids[b2, t2] == window_ids[b, t]:
                            continue
                        logits.append(_cos(r, window[b2, t2]) / tau + wb[b2, t2])
            total += _lse_loss(logits)
        per_user[b] = total / len(items) if items else 0.0
    return per_user


# --------------------------------------------------------------------------- nce_loss


@FAST
@given(b=st.integers(1, 6), m=st.integers(0, 5), d=st.integers(2, 6), in_batch=st.booleans(),
       use_ids=st.booleans(), use_bias=st.booleans(), tau=st.floats(0.05, 2.0),
       seed=st.integers(0, 2**31))
def test_nce_loss_matches_loop_reference(b, m, d, in_batch, use_ids, use_bias, tau, seed):
    if not in_batch and m == 0:
        m = 1
    rng = np.random.default_rng(seed)
    user, pos = rng.normal(size=(b, d)), rng.normal(size=(b, d))
    neg = rng.normal(size=(m, d)) if m else None
    pos_ids = rng.integers(0, 4, b) if use_ids else None  # small range: collisions
    neg_ids = rng.integers(0, 4, m) if use_ids and m else None
    pb = rng.normal(size=b) * 3 if use_bias else None
    nb = rng.normal(size=m) * 3 if use_bias and m else None
    t = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
    got = nce_loss(t(user), t(pos), t(neg), tau, in_batch, t(pos_ids), t(neg_ids),
                   reduction="none", pos_bias=t(pb), neg_bias=t(nb))
    want = ref_nce(user, pos, neg, tau, in_batch, pos_ids, neg_ids, pb, nb)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-9)
    mean = nce_loss(t(user), t(pos), t(neg), tau, in_batch, t(pos_ids), t(neg_ids),
                    pos_bias=t(pb), neg_bias=t(nb))
    assert math.isclose(float(mean), want.mean(), rel_tol=1e-9, abs_tol=1e-9)
    if use_bias:  # one shift of every item's bias changes no softmax
        shifted = nce_loss(t(user), t(pos), t(neg), tau, in_batch, t(pos_ids), t(neg_ids),
                           reduction="none", pos_bias=t(pb + 5.0),
                           neg_bias=None if nb is None else t(nb + 5.0))
        np.testing.assert_allclose(shifted.numpy(), want, rtol=1e-9, atol=1e-9)


def test_accidental_hits_are_removed_from_the_softmax():
    torch.manual_seed(0)
    d = 5
    user, pos = torch.randn(4, d, dtype=torch.float64), torch.randn(4, d, dtype=torch.float64)
    neg = torch.randn(3, d, dtype=torch.float64)
    pos_ids, neg_ids = torch.tensor([7, 7, 3, 5]), torch.tensor([3, 9, 7])
    got = nce_loss(user, pos, neg, 0.2, True, pos_ids, neg_ids, reduction="none")
    # row 0 (id 7): row 1's positive and neg 2 are the same item -> not negatives
    row0 = nce_loss(user[:1], pos[:1], torch.cat([pos[2:4], neg[:2]]), 0.2, in_batch=False)
    # row 2 (id 3): neg 0 is the same item
    row2 = nce_loss(user[2:3], pos[2:3], torch.cat([pos[:2], pos[3:], neg[1:]]), 0.2,
                    in_batch=False)
    assert torch.allclose(got[0], row0) and torch.allclose(got[2], row2)
    unmasked = nce_loss(user, pos, neg, 0.2, True, reduction="none")
    assert not torch.allclose(unmasked[0], got[0]) and not torch.allclose(unmasked[2], got[2])
    # row 3 (id 5) has no accidental hit: same as unmasked
    assert torch.allclose(unmasked[3], got[3])


def test_nce_gradcheck_including_temperature():
    torch.manual_seed(1)
    args = [torch.randn(3, 4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    neg = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, p, n, t: nce_loss(u, p, n, t), (*args, neg, tau))


def test_learnable_temperature_gradient_and_clamp():
    temp = LearnableTemperature(init=0.1, min_tau=0.01, max_tau=1.0).double()
    assert math.isclose(float(temp()), 0.1, rel_tol=1e-6)
    assert [n for n, _ in temp.named_parameters()] == ["log_tau"]
    # positives aligned with users, negatives orthogonal: a colder softmax lowers the loss,
    # so dL/dlog(tau) > 0, and the autograd value equals a central difference
    user = torch.eye(4, dtype=torch.float64)
    neg = -torch.eye(4, dtype=torch.float64)[:2] + 0.1
    loss = nce_loss(user, user.clone(), neg, temp())
    loss.backward()
    g = float(temp.log_tau.grad)
    assert g > 0
    eps = 1e-5
    lp = nce_loss(user, user, neg, math.exp(math.log(0.1) + eps))
    lm = nce_loss(user, user, neg, math.exp(math.log(0.1) - eps))
    assert math.isclose(g, float(lp - lm) / (2 * eps), rel_tol=1e-5)
    # one SGD step on log tau lowers the loss
    with torch.no_grad():
        temp.log_tau -= 0.5 * temp.log_tau.grad
    assert float(nce_loss(user, user, neg, temp())) < float(loss)
    # clamping
    with torch.no_grad():
        temp.log_tau.fill_(math.log(5.0))
    assert math.isclose(float(temp()), 1.0, rel_tol=1e-9)
    temp.clamp_()
    assert math.isclose(float(temp.log_tau), 0.0, abs_tol=1e-12)
    temp.reset_parameters()
    assert math.isclose(float(temp()), 0.1, rel_tol=1e-6)
    fixed = LearnableTemperature(0.5, learnable=False)
    assert list(fixed.parameters()) == [] and math.isclose(float(fixed()), 0.5, rel_tol=1e-6)
    with pytest.raises(ValueError, match="min_tau <= init"):
        LearnableTemperature(init=0.001)


def test_nce_input_errors():
    u, p, n = torch.randn(3, 4), torch.randn(3, 4), torch.randn(2, 4)
    bad = u.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"user: 1 vector\(s\) with NaN/Inf; first at index 2"):
        nce_loss(bad, p, n, 0.1)
    with pytest.raises(ValueError, match="pos: expected shape"):
        nce_loss(u, p[:2], n, 0.1)
    with pytest.raises(ValueError, match="neg: expected shape"):
        nce_loss(u, p, torch.randn(2, 5), 0.1)
    with pytest.raises(ValueError, match="needs pos_ids"):
        nce_loss(u, p, n, 0.1, neg_ids=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="no negatives"):
        nce_loss(u, p, None, 0.1, in_batch=False)
    with pytest.raises(ValueError, match="tau"):
        nce_loss(u, p, n, 0.0)
    with pytest.raises(ValueError, match="integer item ids"):
        nce_loss(u, p, n, 0.1, pos_ids=torch.zeros(3))
    with pytest.raises(ValueError, match="reduction"):
        nce_loss(u, p, n, 0.1, reduction="avg")
    with pytest.raises(ValueError, match="got only the positives'"):
        nce_loss(u, p, n, 0.1, pos_bias=torch.zeros(3))
    with pytest.raises(ValueError, match="got only the negatives'"):
        nce_loss(u, p, n, 0.1, neg_bias=torch.zeros(2))
    with pytest.raises(ValueError, match="pos_bias: expected 3 per-item offsets"):
        nce_loss(u, p, n, 0.1, pos_bias=torch.zeros(4), neg_bias=torch.zeros(2))
    with pytest.raises(ValueError, match="neg_bias: 1 vector"):
        nce_loss(u, p, n, 0.1, pos_bias=torch.zeros(3), neg_bias=torch.tensor([0.0, math.inf]))
    # in-batch negatives only: the positives' bias is every negative's
    assert torch.isfinite(nce_loss(u, p, None, 0.1, pos_bias=torch.zeros(3)))


# --------------------------------------------------------------------------- clustering


@FAST
@given(k=st.integers(1, 4), b=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_hungarian_matching_equals_brute_force(k, b, seed):
    rng = np.random.default_rng(seed)
    cent = torch.from_numpy(rng.normal(size=(b, k, 3)))
    inter = torch.from_numpy(rng.normal(size=(b, k, 3)))
    valid = torch.from_numpy(rng.random((b, k)) < 0.75)
    ci = match_clusters_to_interests(cent, valid, inter).numpy()
    sim = F.normalize(cent, dim=-1) @ F.normalize(inter, dim=-1).transpose(1, 2)
    for r in range(b):
        rows = np.flatnonzero(valid[r].numpy())
        assert (ci[r, ~valid[r].numpy()] == -1).all()
        got = ci[r, rows]
        assert len(set(got.tolist())) == len(rows) and ((got >= 0) & (got < k)).all()
        total = float(sum(sim[r, c, j] for c, j in zip(rows, got)))
        best = max((float(sum(sim[r, c, j] for c, j in zip(rows, perm)))
                    for perm in itertools.permutations(range(k), len(rows))), default=0.0)
        assert math.isclose(total, best, rel_tol=1e-12, abs_tol=1e-12)


def ref_kmeans(x, mask, k, iters):
    """The documented spherical k-means (farthest-point start, Lloyd), one row at a time."""
    bsz, w, d = x.shape
    assign = np.full((bsz, w), -1)
    cents = np.zeros((bsz, k, d))
    sizes = np.zeros((bsz, k), dtype=np.int64)
    for b in range(bsz):
        idx = [i for i in range(w) if mask[b, i]]
        pts = {i: x[b, i] / np.linalg.norm(x[b, i]) for i in idx}
        cen, chosen = [], []
        for j in range(min(k, len(idx))):
            if j == 0:
                pick = idx[0]
            else:
                rest = [i for i in idx if i not in chosen]
                pick = min(rest, key=lambda i: (max(pts[i] @ c for c in cen), i))
            chosen.append(pick)
            cen.append(pts[pick])

        def assign_all(cen):
            return {i: int(np.argmax([pts[i] @ c for c in cen])) for i in idx}

        def means(a, cen):
            out = []
            for j in range(len(cen)):
                mem = [pts[i] for i in idx if a[i] == j]
                out.append(np.sum(mem, 0) / np.linalg.norm(np.sum(mem, 0)) if mem else None)
            return out

        a = assign_all(cen)
        for _ in range(iters):
            cen = [m if m is not None else c for m, c in zip(means(a, cen), cen)]
            new = assign_all(cen)
            if new == a:
                break
            a = new
        for i in idx:
            assign[b, i] = a[i]
        for j, m in enumerate(means(a, cen)):
            if m is not None:
                cents[b, j] = m
                sizes[b, j] = sum(1 for i in idx if a[i] == j)
    return assign, cents, sizes


@FAST
@given(b=st.integers(1, 3), w=st.integers(1, 12), k=st.integers(1, 4), iters=st.integers(0, 5),
       seed=st.integers(0, 2**31))
def test_spherical_kmeans_matches_loop_reference(b, w, k, iters, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, w, 3))
    mask = rng.random((b, w)) < 0.8
    got = spherical_kmeans(torch.from_numpy(x), torch.from_numpy(mask), k, iters)
    want = ref_kmeans(x, mask, k, iters)
    np.testing.assert_array_equal(got[0].numpy(), want[0])
    np.testing.assert_allclose(got[1].numpy(), want[1], atol=1e-12)
    np.testing.assert_array_equal(got[2].numpy(), want[2])


def test_spherical_kmeans_lloyd_steps_matter():
    """Random points where the farthest-point start is not a fixed point: the Lloyd steps
    change the partition, and both agree with the reference."""
    rng = np.random.default_rng(0)
    x, mask = rng.normal(size=(16, 10, 3)), np.ones((16, 10), dtype=bool)
    a0 = spherical_kmeans(torch.from_numpy(x), torch.from_numpy(mask), 3, 0)[0].numpy()
    a10 = spherical_kmeans(torch.from_numpy(x), torch.from_numpy(mask), 3, 10)[0].numpy()
    assert (a0 != a10).any(1).sum() >= 4
    np.testing.assert_array_equal(a0, ref_kmeans(x, mask, 3, 0)[0])
    np.testing.assert_array_equal(a10, ref_kmeans(x, mask, 3, 10)[0])


def _planted(b=4, k=3, w=9, d=8, noise=0.05, seed=0):
    """Window items around k orthonormal directions (labels a shuffled balanced split),
    interests = the directions in a shuffled order per user."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    dirs = q[:, :k].t()  # [k, d]
    labels = torch.stack([torch.randperm(w, generator=g) % k for _ in range(b)])  # [b, w]
    window = dirs[labels] + noise * torch.randn(b, w, d, generator=g, dtype=torch.float64)
    perms = torch.stack([torch.randperm(k, generator=g) for _ in range(b)])  # slot -> dir
    interests = dirs[perms] + 0.01 * torch.randn(b, k, d, generator=g, dtype=torch.float64)
    inv = torch.argsort(perms, 1)  # dir -> slot
    expected = inv.gather(1, labels)  # interest slot of each item
    return interests, window, labels, expected, dirs


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a[:, None] == a[None, :]) == (b[:, None] == b[None, :])).all())


def test_spherical_kmeans_recovers_planted_clusters_and_is_deterministic():
    _, window, labels, _, _ = _planted(b=5, k=3, w=12)
    # shuffle away the ordering of first points, add padding with garbage
    mask = torch.ones(5, 14, dtype=torch.bool)
    mask[:, 12:] = False
    x = torch.cat([window, torch.full((5, 2, window.shape[2]), float("nan"),
                                      dtype=window.dtype)], 1)
    assign, cent, sizes = spherical_kmeans(x, mask, 3)
    assert (assign[:, 12:] == -1).all()
    for r in range(5):
        assert _same_partition(assign[r, :12], labels[r])
    assert torch.isfinite(cent).all() and (sizes.sum(1) == 12).all()
    assert torch.allclose(cent.norm(dim=-1), torch.ones(5, 3, dtype=cent.dtype))
    again = spherical_kmeans(x, mask, 3)
    assert torch.equal(assign, again[0]) and torch.equal(cent, again[1])
    # fewer valid points than clusters: each point its own cluster, the rest empty
    m2 = torch.zeros(1, 14, dtype=torch.bool)
    m2[0, [3, 7]] = True
    a2, c2, s2 = spherical_kmeans(x[:1], m2, 3)
    assert sorted(a2[0, [3, 7]].tolist()) == [0, 1] and s2.tolist() == [[1, 1, 0]]
    assert (c2[0, 2] == 0).all()


# --------------------------------------------------------------------------- window loss


@FAST
@given(b=st.integers(1, 4), k=st.integers(1, 3), w=st.integers(1, 4), m=st.integers(0, 4),
       in_batch=st.booleans(), use_ids=st.booleans(), use_bias=st.booleans(),
       seed=st.integers(0, 2**31))
def test_window_nce_matches_loop_reference(b, k, w, m, in_batch, use_ids, use_bias, seed):
    if not in_batch and m == 0:
        m = 2
    rng = np.random.default_rng(seed)
    d = 4
    interests, window = rng.normal(size=(b, k, d)), rng.normal(size=(b, w, d))
    mask = rng.random((b, w)) < 0.8
    ii = np.where(mask, rng.integers(0, k, (b, w)), -1)
    neg = rng.normal(size=(m, d)) if m else None
    wid = rng.integers(0, 5, (b, w)) if use_ids else None
    nid = rng.integers(0, 5, m) if use_ids and m else None
    wb = rng.normal(size=(b, w)) * 3 if use_bias else None
    nb = rng.normal(size=m) * 3 if use_bias and m else None
    if use_bias:  # padding's bias is ignored, even NaN
        wb = np.where(mask, wb, np.nan)
    t = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
    got = window_nce_loss(t(interests), t(window), t(mask), t(ii), t(neg), 0.3, in_batch,
                          t(wid), t(nid), reduction="none", window_bias=t(wb),
                          neg_bias=t(nb))
    want = ref_window(interests, window, mask, ii, neg, 0.3, in_batch, wid, nid,
                      None if wb is None else np.nan_to_num(wb), nb)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-9)
    mean = window_nce_loss(t(interests), t(window), t(mask), t(ii), t(neg), 0.3, in_batch,
                           t(wid), t(nid), window_bias=t(wb), neg_bias=t(nb))
    has = mask.any(1)
    assert math.isclose(float(mean), want[has].mean() if has.any() else 0.0,
                        rel_tol=1e-9, abs_tol=1e-9)


def test_planted_interests_are_matched_and_beat_every_other_assignment():
    interests, window, _, expected, dirs = _planted(b=4, k=3, w=9)
    mask = torch.ones(4, 9, dtype=torch.bool)
    neg = torch.randn(16, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    loss, a = multi_interest_window_loss(interests, window, mask, neg, 0.1)
    assert torch.equal(a.item_interest, expected)
    assert a.interest_usage().sum() == 36
    direct = window_nce_loss(interests, window, mask, expected, neg, 0.1)
    assert torch.allclose(loss, direct)
    for perm in itertools.permutations(range(3)):
        if perm == (0, 1, 2):
            continue
        wrong = torch.tensor(perm)[expected]
        assert float(window_nce_loss(interests, window, mask, wrong, neg, 0.1)) > float(loss) + 1
    # the single-interest baseline cannot fit three directions with one vector
    assert float(single_interest_loss(interests, window, neg, 0.1, target_mask=mask,
                                      in_batch=False)) > float(loss) + 0.5


def test_window_loss_gradients_and_padding():
    interests, window, _, _, _ = _planted(b=3, k=3, w=6, seed=5)
    interests = interests.clone().requires_grad_(True)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[:, 6:] = False
    mask[2, 3:] = False
    pad = torch.full((3, 2, 8), float("nan"), dtype=torch.float64)
    win = torch.cat([window, pad], 1)
    win[2, 3:6] = 1e6  # garbage on padding
    win.requires_grad_(True)
    neg = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    loss, a = multi_interest_window_loss(interests, win, mask, neg, 0.2, in_batch=True)
    loss.backward()
    for t in (interests.grad, win.grad, neg.grad):
        assert t is not None and torch.isfinite(t).all()
    assert interests.grad.abs().sum() > 0 and neg.grad.abs().sum() > 0
    assert (win.grad[~mask] == 0).all() and win.grad[mask].abs().sum() > 0
    assert not a.item_interest.requires_grad and not a.centroids.requires_grad
    # the same loss with the padding cut away
    ref = window_nce_loss(interests.detach(), window[:, :6], mask[:, :6],
                          a.item_interest[:, :6], neg.detach(), 0.2, in_batch=True)
    assert torch.allclose(loss.detach(), ref)


def test_single_interest_loss_variants():
    torch.manual_seed(2)
    inter, nxt, neg = torch.randn(4, 3, 6), torch.randn(4, 6), torch.randn(5, 6)
    ids = torch.tensor([1, 2, 1, 4])
    got = single_interest_loss(inter, nxt, neg, 0.1, target_ids=ids, neg_ids=torch.arange(5))
    assert torch.allclose(got, nce_loss(inter.mean(1), nxt, neg, 0.1, True, ids,
                                        torch.arange(5)))
    first = single_interest_loss(inter, nxt, neg, 0.1, pool="first", in_batch=False)
    assert torch.allclose(first, nce_loss(inter[:, 0], nxt, neg, 0.1, in_batch=False))
    win, mask = torch.randn(4, 5, 6), torch.rand(4, 5) > 0.3
    got_w = single_interest_loss(inter[:, 1], win, neg, 0.1, target_mask=mask, in_batch=False)
    loss_k1, a = multi_interest_window_loss(inter[:, 1:2], win, mask, neg, 0.1)
    assert torch.allclose(got_w, loss_k1)
    assert (a.item_interest[mask] == 0).all()


def test_window_input_errors():
    inter, win = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    mask = torch.ones(2, 5, dtype=torch.bool)
    neg = torch.randn(3, 4)
    bad = win.clone()
    bad[1, 2, 0] = float("inf")
    with pytest.raises(ValueError, match=r"window: .* first at index \(1, 2\)"):
        multi_interest_window_loss(inter, bad, mask, neg, 0.1)
    with pytest.raises(ValueError, match="window_mask: expected bool"):
        multi_interest_window_loss(inter, win, mask.float(), neg, 0.1)
    with pytest.raises(ValueError, match="window: expected shape"):
        multi_interest_window_loss(inter, torch.randn(2, 5, 3), mask, neg, 0.1)
    with pytest.raises(ValueError, match=r"item_interest: .* user 0, window position 1"):
        window_nce_loss(inter, win, mask, torch.tensor([[0, 3, 0, 0, 0], [0] * 5]), neg, 0.1)
    with pytest.raises(ValueError, match="needs window_ids"):
        window_nce_loss(inter, win, mask, torch.zeros(2, 5, dtype=torch.long), neg, 0.1,
                        neg_ids=torch.arange(3))
    # all padding: a zero loss that still back-propagates
    x = inter.clone().requires_grad_(True)
    loss, _ = multi_interest_window_loss(x, win, torch.zeros(2, 5, dtype=torch.bool), neg, 0.1)
    loss.backward()
    assert float(loss) == 0.0 and (x.grad == 0).all()
    a = assign_window(inter, win, torch.zeros(2, 5, dtype=torch.bool))
    assert (a.cluster_interest == -1).all() and (a.item_interest == -1).all()
