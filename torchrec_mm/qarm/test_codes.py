"""Tests of the QARM VQ/RQ codes: parity with brute-force references, recall of the
approximate indexes, planted-cluster recovery, statistics, artefact round trip, CLI and
bad input."""

import argparse
import json
import math
import os
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchrec_mm.data.schema import DataError
from torchrec_mm.qarm.codes import (
    QARMCodes,
    RQCodebook,
    RQConfig,
    VQConfig,
    build_codes,
    build_rq,
    build_vq,
    code_stats,
    faiss_threads,
    format_stats,
    load_codes,
    load_representations,
    save_codes,
)
from torchrec_mm.utils.io import save_tensors

HYP = settings(max_examples=25, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def one_faiss_thread():
    # tiny problems: OpenMP barriers on a shared 2-core machine cost more than the work
    with faiss_threads(1):
        yield


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n: int, d: int, clusters: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    x = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, d))
    return x.astype(np.float32)


def brute_topk(queries: np.ndarray, codebook: np.ndarray, k: int, metric: str) -> tuple:
    """(scores [n, n_cb] higher = nearer, top-k rows [n, k]) in float64."""
    if metric == "cosine":
        s = _unit(queries) @ _unit(codebook).T
    else:
        q, c = queries.astype(np.float64), codebook.astype(np.float64)
        s = -((q * q).sum(1)[:, None] - 2 * q @ c.T + (c * c).sum(1)[None, :])
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(s, part, axis=1), axis=1, kind="stable")
    return s, np.take_along_axis(part, order, axis=1)


# ------------------------------------------------------------------------------- VQ


@HYP
@given(n=st.integers(8, 70), d=st.integers(2, 10), k=st.integers(1, 8),
       metric=st.sampled_from(["cosine", "l2"]), seed=st.integers(0, 10_000))
def test_vq_exact_matches_bruteforce(n, d, k, metric, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    has = rng.random(n) < 0.9
    cb_mask = rng.random(n) < 0.7
    cb_ids = np.flatnonzero(has & cb_mask)
    if cb_ids.size < k:
        with pytest.raises(ValueError, match=f"k={k} codebook items.*got {cb_ids.size}"):
            build_vq(x, has, VQConfig(k=k, metric=metric), codebook_mask=cb_mask)
        return
    x[~has] = np.nan  # never read
    cb = build_vq(x, has, VQConfig(k=k, metric=metric), codebook_mask=cb_mask)
    assert cb.index_type == "flat" and cb.recall is None
    assert cb.item_ids.tolist() == cb_ids.tolist()
    rows = np.flatnonzero(has)
    got = cb.assign(x[rows], query_ids=rows)
    scores, ref = brute_topk(x[rows], x[cb_ids], k, metric)
    pos = np.searchsorted(cb_ids, got)
    assert (cb_ids[pos] == got).all()  # every code is a codebook item
    got_scores = np.take_along_axis(scores, pos, axis=1)
    ref_scores = np.take_along_axis(scores, ref, axis=1)
    np.testing.assert_allclose(got_scores, ref_scores, atol=1e-5)  # nearest first
    assert (np.diff(got_scores, axis=1) <= 1e-5).all()
    assert all(len(set(r)) == k for r in got.tolist())
    # rows without near-ties in the top k + 1 must match id for id
    srt = -np.sort(-scores, axis=1)[:, :k + 1]
    clear = (np.abs(np.diff(srt, axis=1)) > 1e-4).all(axis=1)
    np.testing.assert_array_equal(got[clear], cb_ids[ref[clear]])
    in_cb = np.isin(rows, cb_ids)
    assert (got[in_cb, 0] == rows[in_cb]).all()  # a codebook item is its own first code


def test_vq_duplicates_and_self_first_for_approximate_index():
    x = clustered(3000, 8, 30, 0.3, seed=1)
    x[1] = x[0] * 2.0  # same direction: cosine twins
    cb = build_vq(x, None, VQConfig(k=5, index="hnsw", hnsw_m=4, ef_search=5))
    ids = np.arange(3000)
    got = cb.assign(x, query_ids=ids)
    assert (got[:, 0] == ids).all()  # always the query itself, also when HNSW missed it
    assert got[0, 1] == 1 and got[1, 1] == 0
    assert all(len(set(r)) == 5 for r in got.tolist())
    plain = cb.assign(x)  # without query ids: the index's own order
    moved = (plain[:, 0] != ids)
    assert moved.sum() >= 10  # this tiny HNSW graph does miss some queries themselves
    # the other codes keep their relative order
    for i in np.flatnonzero(moved)[:50]:
        rest = [c for c in plain[i] if c != i]
        assert got[i, 1:].tolist() == rest[:4]


@pytest.fixture(scope="module")
def hard_clusters():
    # 20k x 32, overlapping clusters: approximate search misses some neighbours
    return clustered(20_000, 32, 200, 0.9, seed=3)


@pytest.mark.parametrize("cfg", [
    VQConfig(k=25, index="ivf", nprobe=4, seed=1),
    VQConfig(k=25, index="hnsw", hnsw_m=8, ef_search=40, seed=1),
], ids=["ivf", "hnsw"])
def test_vq_approximate_recall(hard_clusters, cfg):
    x = hard_clusters
    cb = build_vq(x, None, cfg)
    assert cb.index_type == cfg.index and cb.recall_queries == 1000
    rng = np.random.default_rng(99)  # an independent sample
    q = np.sort(rng.choice(x.shape[0], 1000, replace=False))
    got = cb.assign(x[q])
    _, exact = brute_topk(x[q], x, cfg.k, "cosine")
    recall = np.mean([len(set(a) & set(b)) / cfg.k for a, b in zip(got.tolist(),
                                                                    exact.tolist())])
    assert abs(cb.recall - recall) <= 0.02, (cb.recall, recall)
    assert cb.recall >= 0.9 and recall >= 0.9


def test_vq_auto_index_choice():
    x = clustered(400, 8, 10, 0.5, seed=0)
    assert build_vq(x, None, VQConfig(k=3, exact_max_items=400)).index_type == "flat"
    cb = build_vq(x, None, VQConfig(k=3, exact_max_items=399, recall_sample=50))
    assert cb.index_type == "ivf" and 0.0 <= cb.recall <= 1.0 and cb.recall_queries == 50
    assert VQConfig().resolve_nlist(1_000_000) == 4000
    assert VQConfig().resolve_nlist(100) == 2  # at least 39 training points per list


# ------------------------------------------------------------------------------- RQ


def reference_rq(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Greedy eq. 5 in float64 with brute-force argmin per level."""
    res = _unit(x)
    codes = np.empty((x.shape[0], centroids.shape[0]), dtype=np.int64)
    for level, cent in enumerate(centroids.astype(np.float64)):
        dist = ((res[:, None, :] - cent[None]) ** 2).sum(-1)
        codes[:, level] = dist.argmin(1)
        res = res - cent[codes[:, level]]
    return codes


def test_rq_assign_matches_bruteforce_and_training_codes():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1500, 8)).astype(np.float32)
    has = rng.random(1500) < 0.95
    codes = build_codes(x, has, VQConfig(k=3), RQConfig(levels=4, codebook_size=16, seed=2),
                        progress=False)
    rq = codes.rq_codebook()
    rows = np.flatnonzero(has)
    got = rq.assign(x[rows])
    # the training loop's codes are eq. 5 applied to the trained codebooks
    np.testing.assert_array_equal(codes.rq[torch.from_numpy(rows)].numpy(), got)
    ref = reference_rq(x[rows], codes.rq_centroids.numpy())
    differ = np.flatnonzero((got != ref).any(1))
    assert differ.size <= 0.01 * rows.size  # float32 vs float64: only near-ties may differ
    cent = codes.rq_centroids.numpy().astype(np.float64)
    for i in differ:  # at the first differing level both centroids are (nearly) equidistant
        level = int(np.flatnonzero(got[i] != ref[i])[0])
        res = _unit(x[rows[i:i + 1]])[0] - sum(cent[lv][ref[i, lv]] for lv in range(level))
        d_got, d_ref = (((res - cent[level][c]) ** 2).sum() for c in (got[i, level],
                                                                       ref[i, level]))
        assert abs(d_got - d_ref) < 1e-4
    assert (codes.rq[torch.from_numpy(~has)] == 16).all()


def test_rq_error_decreases_with_each_level():
    x = clustered(3000, 16, 40, 0.6, seed=5)
    cfg = RQConfig(levels=5, codebook_size=32, niter=10)
    rq = build_rq(x, None, cfg)
    assert tuple(rq.centroids.shape) == (5, 32, 16) and rq.levels == 5
    codes = rq.assign(x)
    target = torch.from_numpy(_unit(x)).float()
    errors = [float((target ** 2).sum(1).mean())]
    for level in range(1, 6):
        errors.append(float(((target - rq.reconstruct(codes[:, :level])) ** 2).sum(1).mean()))
    assert all(b < a * 0.97 for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rq_recovers_planted_clusters(seed):
    rng = np.random.default_rng(seed)
    c, d, n = 12, 16, 2400
    centres = _unit(rng.standard_normal((c, d)))
    labels = rng.integers(0, c, n)
    x = (centres[labels] * rng.uniform(0.5, 3.0, (n, 1))  # cosine: the norm is irrelevant
         + 0.03 * rng.standard_normal((n, d))).astype(np.float32)
    rq = build_rq(x, None, RQConfig(levels=2, codebook_size=c, seed=seed))
    level1 = rq.assign(x)[:, 0]
    table = np.zeros((c, c), dtype=np.int64)
    np.add.at(table, (labels, level1), 1)
    assert ((table > 0).sum(1) == 1).all()  # each cluster maps to one code
    assert ((table > 0).sum(0) == 1).all()  # and no two clusters share one


def test_rq_reconstruct_rejects_bad_codes():
    rq = RQCodebook(torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match="level 2: code 4 outside"):
        rq.reconstruct(np.array([[0, 4]]))
    with pytest.raises(ValueError, match="l <= 2"):
        rq.reconstruct(np.zeros((1, 3), dtype=np.int64))


# --------------------------------------------------------------------------- stats


def reference_stats(rq: np.ndarray, has: np.ndarray) -> list:
    rows = [tuple(r) for r, h in zip(rq.tolist(), has.tolist()) if h]
    out = []
    for level in range(rq.shape[1]):
        codes = Counter(r[level] for r in rows)
        prefixes = Counter(r[:level + 1] for r in rows)
        n = len(rows)
        entropy = -sum(v / n * math.log2(v / n) for v in codes.values()) if n else 0.0
        out.append({
            "distinct_codes": len(codes), "entropy_bits": entropy,
            "distinct_prefixes": len(prefixes),
            "mean_items_per_prefix": n / len(prefixes) if n else 0.0,
            "max_items_per_prefix": max(prefixes.values(), default=0),
            "unique_prefix_frac": (sum(1 for r in rows if prefixes[r[:level + 1]] == 1) / n
                                   if n else 0.0)})
    return out


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 60), levels=st.integers(1, 4), c=st.integers(1, 6),
       seed=st.integers(0, 10_000))
def test_code_stats_matches_reference(n, levels, c, seed):
    rng = np.random.default_rng(seed)
    rq = rng.integers(0, c, (n, levels))
    has = rng.random(n) < 0.8
    stats = code_stats(rq, has)
    assert stats["num_items"] == int(has.sum())
    for got, want in zip(stats["levels"], reference_stats(rq, has)):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-9), key
        if stats["num_items"]:
            assert got["perplexity"] == pytest.approx(2 ** want["entropy_bits"])


# ------------------------------------------------------------------------ artefact


@pytest.fixture(scope="module")
def small_codes():
    rng = np.random.default_rng(7)
    x = clustered(600, 12, 20, 0.5, seed=7)
    has = rng.random(600) < 0.9
    x[~has] = 0.0  # zero rows are fine without a representation
    cb_mask = rng.random(600) < 0.8
    with faiss_threads(1):
        codes = build_codes(x, has, VQConfig(k=6), RQConfig(levels=3, codebook_size=16),
                            codebook_mask=cb_mask, progress=False)
    return x, has, cb_mask, codes


def test_codes_layout(small_codes):
    x, has, cb_mask, codes = small_codes
    assert codes.vq.shape == (600, 6) and codes.rq.shape == (600, 3)
    assert codes.vq_vocab == 601 and codes.rq_vocab == 17
    assert codes.vq_none == 600 and codes.rq_none == 16
    none = torch.from_numpy(~has)
    assert (codes.vq[none] == 600).all() and (codes.rq[none] == 16).all()
    assert torch.equal(codes.has_code, torch.from_numpy(has))
    cb = torch.from_numpy(np.flatnonzero(has & cb_mask))
    assert torch.equal(codes.vq_item_ids, cb)
    used = codes.vq[codes.has_code].unique()
    assert bool(torch.isin(used, cb).all())  # only codebook items are codes
    assert (codes.rq[codes.has_code] < 16).all()
    assert codes.meta["num_codebook_items"] == cb.numel()
    assert codes.meta["rq_stats"]["num_items"] == int(has.sum())
    mse = codes.meta["rq_residual_mse"]
    assert len(mse) == 3 and mse[0] > mse[1] > mse[2]
    text = format_stats(codes.meta)
    assert "perplexity" in text and "exact search" in text


def test_save_load_round_trip(small_codes, tmp_path):
    x, has, _, codes = small_codes
    out = str(tmp_path / "codes")
    save_codes(codes, out)
    loaded = load_codes(out)
    for name in ("vq", "rq", "has_code", "rq_centroids", "vq_item_ids", "vq_reps"):
        assert torch.equal(getattr(loaded, name), getattr(codes, name)), name
    assert json.loads(json.dumps(codes.meta, default=float))["k"] == loaded.meta["k"]
    assert loaded.meta["rq_stats"] == json.loads(json.dumps(codes.meta["rq_stats"]))
    # the stored codebooks reproduce the codes (codebook items: their own first code)
    rows = np.flatnonzero(has)
    vq, rq = loaded.assign_new(x[rows])
    assert torch.equal(rq, loaded.rq[torch.from_numpy(rows)])
    in_cb = torch.isin(torch.from_numpy(rows), loaded.vq_item_ids)
    assert torch.equal(vq[in_cb], loaded.vq[torch.from_numpy(rows)][in_cb])
    assert not any(f.endswith(".tmp") for f in os.listdir(out))


def test_load_incomplete_or_mismatched(small_codes, tmp_path):
    _, _, _, codes = small_codes
    with pytest.raises(FileNotFoundError, match="codes.json not found"):
        load_codes(str(tmp_path / "nothing"))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    save_codes(codes, a)
    save_codes(codes, b)
    os.unlink(os.path.join(a, "codes.json"))  # as after a crash before the JSON
    with pytest.raises(FileNotFoundError, match="did not finish"):
        load_codes(a)
    os.replace(os.path.join(b, "codes.json"), os.path.join(a, "codes.json"))
    with pytest.raises(ValueError, match="token mismatch"):
        load_codes(a)  # a JSON of another write next to these tensors
    save_codes(codes, b)  # re-saving over a directory works
    assert load_codes(b).num_items == 600
    bad = QARMCodes(**{**{f: getattr(codes, f) for f in ("vq", "rq", "has_code",
                                                         "rq_centroids", "vq_item_ids",
                                                         "vq_reps")},
                       "rq": codes.rq.clone().fill_(3)})
    with pytest.raises(ValueError, match="tensor 'rq'"):
        save_codes(bad, str(tmp_path / "bad"))  # items without a rep must hold rq_none
    assert not os.path.exists(str(tmp_path / "bad" / "codes.json"))


# ----------------------------------------------------------------------- bad input


def test_nan_and_zero_representations_name_the_item():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 6)).astype(np.float32)
    has = np.ones(300, dtype=bool)
    x[17, 2] = np.nan
    x[40, 1] = np.inf
    vq, rq = VQConfig(k=4), RQConfig(levels=2, codebook_size=8)
    with pytest.raises(ValueError, match=r"item 17: .*NaN/Inf.*2 of 300"):
        build_codes(x, has, vq, rq, progress=False)
    with pytest.raises(ValueError, match="item 17"):
        build_vq(x, has, vq)
    with pytest.raises(ValueError, match="item 17"):
        build_rq(x, has, rq)
    has[[17, 40]] = False  # without a representation: ignored
    x[5] = 0.0
    with pytest.raises(ValueError, match=r"item 5: .*zero vector"):
        build_codes(x, has, vq, rq, progress=False)
    build_vq(x, has, VQConfig(k=4, metric="l2"))  # fine for l2
    has[5] = False
    codes = build_codes(x, has, vq, rq, progress=False)
    assert codes.vq[5].tolist() == [300] * 4 and codes.rq[17].tolist() == [8, 8]
    new = rng.standard_normal((3, 6)).astype(np.float32)
    new[2, 0] = np.nan
    with pytest.raises(ValueError, match="row 2: .*NaN/Inf"):
        codes.assign_new(new)
    new[2] = 0.0
    with pytest.raises(ValueError, match="row 2: .*zero vector"):
        codes.assign_new(new)
    with pytest.raises(ValueError, match="dimension 5"):
        codes.assign_new(new[:, :5])


def test_too_few_items_error_names_both_numbers():
    x = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=r"codebook_size=32 .*got 20"):
        build_rq(x, None, RQConfig(codebook_size=32))
    mask = np.zeros(20, dtype=bool)
    mask[:3] = True
    with pytest.raises(ValueError, match=r"k=5 codebook items.*codebook_mask.*got 3"):
        build_vq(x, None, VQConfig(k=5), codebook_mask=mask)
    with pytest.raises(ValueError, match=r"k=25 .*got 20"):
        build_codes(x, None, VQConfig(), RQConfig(codebook_size=4), progress=False)
    with pytest.raises(ValueError, match="has_rep: expected shape"):
        build_vq(x, np.ones(19, bool), VQConfig(k=2))
    with pytest.raises(ValueError, match="index must be one of"):
        VQConfig(index="annoy")


def test_load_representations_from_file(tmp_path):
    rng = np.random.default_rng(1)
    reps = torch.from_numpy(rng.standard_normal((50, 8)).astype(np.float32))
    has = torch.ones(50, dtype=torch.bool)
    has[3] = False
    reps[3] = float("nan")  # ignored: no representation
    path = str(tmp_path / "aligned.safetensors")
    save_tensors(path, {"reps": reps.half(), "has_rep": has})
    x, h = load_representations(path)
    assert x.dtype == np.float32 and x.shape == (50, 8) and h.tolist() == has.tolist()
    assert (x[3] == 0).all()
    np.testing.assert_allclose(x[h], reps.half().float().numpy()[h])
    reps[9, 4] = float("inf")
    save_tensors(path, {"reps": reps, "has_rep": has})
    with pytest.raises(DataError, match=r"aligned.safetensors: record item 9, field 'reps'"):
        load_representations(path)
    save_tensors(path, {"embeddings": reps})
    with pytest.raises(DataError, match="missing tensor 'reps'"):
        load_representations(path)
    save_tensors(path, {"reps": reps, "has_rep": torch.ones(49, dtype=torch.bool)})
    with pytest.raises(DataError, match="has_rep"):
        load_representations(path)
    with pytest.raises(FileNotFoundError):
        load_representations(str(tmp_path / "missing.safetensors"))


def write_content_store(path: str, pooled: torch.Tensor, ids: list, num_items: int) -> None:
    """A minimal content store (manifest + one chunk) as the encode job lays it out."""
    from torchrec_mm.content.encode_job import MANIFEST_FILE, MANIFEST_FORMAT

    os.makedirs(path)
    save_tensors(os.path.join(path, "chunk-0.safetensors"),
                 {"item_id": torch.tensor(ids), "pooled": pooled})
    manifest = {"format": MANIFEST_FORMAT, "num_items": num_items, "num_encoded": len(ids),
                "dim": pooled.shape[1], "fields": {"pooled": {"shape": [pooled.shape[1]],
                                                              "dtype": "float32"}},
                "chunks": [{"file": "chunk-0.safetensors", "num_items": len(ids)}]}
    with open(os.path.join(path, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f)


def test_load_representations_from_content_store(tmp_path):
    pooled = torch.randn(4, 5)
    store = str(tmp_path / "content")
    write_content_store(store, pooled, [0, 2, 3, 5], num_items=6)
    x, h = load_representations(store)
    assert h.tolist() == [True, False, True, True, False, True]
    np.testing.assert_array_equal(x[h], pooled.numpy())
    bad = str(tmp_path / "bad")
    pooled[2, 1] = float("nan")
    write_content_store(bad, pooled, [0, 2, 3, 5], num_items=6)
    with pytest.raises(DataError, match="record item 3"):
        load_representations(bad)


# ----------------------------------------------------------------------------- CLI


def _run_cli(argv: list) -> int:
    from torchrec_mm.qarm.codes_cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_codes_with_train_codebook(tmp_path, capsys):
    from torchrec_mm.data.io import load_interaction_columns
    from torchrec_mm.data.split import load_split, make_split
    from torchrec_mm.data.synth import SynthConfig, generate

    data = str(tmp_path / "synth")
    generate(SynthConfig(num_users=60, num_items=300, num_interactions=3000, seed=1), data)
    make_split(data, cold_item_frac=0.2)
    reps = torch.from_numpy(clustered(300, 8, 10, 0.5, seed=2))
    has = torch.ones(300, dtype=torch.bool)
    has[:5] = False
    path = str(tmp_path / "reps.safetensors")
    save_tensors(path, {"reps": reps, "has_rep": has})
    out = str(tmp_path / "codes")
    assert _run_cli(["codes", "--reps", path, "--out", out, "--k", "4", "--levels", "2",
                     "--codebook-size", "8", "--codebook-items", "train", "--data", data,
                     "--threads", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and '"vq_recall": null' in printed
    codes = load_codes(out)
    cols = load_interaction_columns(data, ["item_id", "timestamp"])
    part = load_split(data).assign(cols["item_id"], cols["timestamp"])
    train = np.zeros(300, dtype=bool)
    train[np.unique(cols["item_id"][part == 0])] = True
    train[:5] = False
    assert codes.vq_item_ids.tolist() == np.flatnonzero(train).tolist()
    cold = torch.from_numpy(load_split(data).cold_items)
    assert not bool(torch.isin(codes.vq[codes.has_code], cold).any())  # new items → trained
    assert codes.meta["source"]["codebook_items"] == "train"
    with pytest.raises(SystemExit, match="needs --data"):
        _run_cli(["codes", "--reps", path, "--out", out, "--codebook-items", "train"])
