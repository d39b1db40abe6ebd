"""End to end through the command line on generated data: `torchrec-mm train` on 1
and 2 ranks gives the same loss curve, a crashed run resumes to the same result, the
trained ranker learns the planted signal, and `torchrec-mm evaluate` reproduces it."""

import json
import os

import numpy as np
import pytest

from torchrec_mm.cli import main
from torchrec_mm.data.split import make_split
from torchrec_mm.data.synth import SynthConfig, generate


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("cli") / "synth")
    generate(SynthConfig(num_users=400, num_items=600, num_interactions=40_000, seed=7), d)
    make_split(d, cold_item_frac=0.1, test_time_frac=0.1, seed=0)
    return d


def _train(data_dir, out, *extra):
    args = ["train", "--data", data_dir, "--out", out, "--ranker", "dlrm",
            "--embedding-dim", "8", "--epochs", "1", "--seed", "1", *extra]
    assert main(args) == 0
    with open(os.path.join(out, "train_metrics.json")) as f:
        return json.load(f)


def _losses(result):
    return {c["step"]: c["loss"] for c in result["curve"]}


@pytest.fixture(scope="module")
def one_rank(data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("r1"))
    return out, _train(data_dir, out, "--world-size", "1", "--batch-size", "256")


@pytest.fixture(scope="module")
def two_ranks(data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("r2"))
    return out, _train(data_dir, out, "--world-size", "2", "--batch-size", "128",
                       "--sharding-type", "table_wise")


def test_two_ranks_match_one_rank_loss_curve(one_rank, two_ranks):
    """Same global batch (2 x 128 vs 256), same seed and data: every gradient is the
    global-batch mean on both, so the curves agree up to float summation order."""
    _, r1 = one_rank
    _, r2 = two_ranks
    assert r2["world_size"] == 2 and r2["steps"] == r1["steps"]
    l1, l2 = _losses(r1), _losses(r2)
    assert l1.keys() == l2.keys()
    diffs = np.array([abs(l1[k] - l2[k]) for k in l1])
    assert diffs.max() < 5e-3, diffs
    assert abs(r1["eval"]["test"]["auc"] - r2["eval"]["test"]["auc"]) < 5e-3


def test_learns_planted_signal(one_rank):
    _, r1 = one_rank
    curve = [c["loss"] for c in r1["curve"]]
    assert np.mean(curve[-3:]) < np.mean(curve[:2])
    assert r1["eval"]["warm"]["auc"] > 0.6
    assert r1["eval"]["test"]["gauc"] > 0.55


def test_crashed_run_resumes_to_the_same_result(data_dir, one_rank, tmp_path):
    _, full = one_rank
    out = str(tmp_path)
    half = full["steps"] // 2
    _train(data_dir, out, "--world-size", "1", "--batch-size", "256",
           "--max-steps", str(half), "--checkpoint-every", "5", "--no-eval")
    resumed = _train(data_dir, out, "--world-size", "1", "--batch-size", "256")
    assert resumed["steps"] == full["steps"]
    lf, lr = _losses(full), _losses(resumed)
    # log windows that straddle the interruption mix fewer steps; later ones are exact
    later = [k for k in lf if k > half + 10]
    assert later and all(abs(lf[k] - lr[k]) < 1e-6 for k in later)
    assert resumed["eval"]["test"]["auc"] == pytest.approx(full["eval"]["test"]["auc"],
                                                           abs=1e-6)


def test_two_rank_run_resumes_from_a_sharded_checkpoint(data_dir, two_ranks, tmp_path):
    """Every rank holds the fused optimizer state of its own tables only: the checkpoint
    gathers the union and each rank restores its shards."""
    _, full = two_ranks
    out = str(tmp_path)
    half = full["steps"] // 2
    args = ["--world-size", "2", "--batch-size", "128", "--sharding-type", "table_wise"]
    _train(data_dir, out, *args, "--max-steps", str(half), "--checkpoint-every", "5",
           "--no-eval")
    resumed = _train(data_dir, out, *args)
    lf, lr = _losses(full), _losses(resumed)
    later = [k for k in lf if k > half + 10]
    assert later and all(abs(lf[k] - lr[k]) < 1e-5 for k in later)


def test_evaluate_attention_probe(data_dir, one_rank, tmp_path, capsys):
    """`evaluate` of a target-attention run reports its learned weights' entropy and,
    with --attention uniform, scores the run with mean pooling instead (another file:
    the run's own metrics stay); a DLRM run has no attention to replace."""
    out = str(tmp_path / "ta")
    r = _train(data_dir, out, "--ranker", "target_attention", "--world-size", "1",
               "--batch-size", "256")
    assert main(["evaluate", "--run", out]) == 0
    assert "normalised entropy" in capsys.readouterr().out
    with open(os.path.join(out, "eval_metrics.json")) as f:
        learned = json.load(f)
    assert learned["slices"]["cold"]["auc"] == pytest.approx(r["eval"]["cold"]["auc"],
                                                             abs=1e-6)
    att = learned["attention"]
    assert att["weights"] == "learned" and att["samples"] > 1000
    assert 0 < att["effective_fraction"] <= 1 and 0 < att["normalized_entropy"] <= 1
    assert main(["evaluate", "--run", out, "--attention", "uniform"]) == 0
    with open(os.path.join(out, "eval_metrics_uniform_attention.json")) as f:
        uniform = json.load(f)
    with open(os.path.join(out, "eval_metrics.json")) as f:
        assert json.load(f) == learned
    # the same learned weights are measured; the scores use the mean instead
    assert uniform["attention"]["normalized_entropy"] == pytest.approx(
        att["normalized_entropy"], abs=1e-9)
    assert uniform["slices"]["test"]["auc"] != learned["slices"]["test"]["auc"]
    assert main(["evaluate", "--run", one_rank[0], "--attention", "uniform"]) == 2
    assert "needs a ranker with target attention" in capsys.readouterr().err


def test_evaluate_reproduces_training_metrics(one_rank):
    out, r1 = one_rank
    assert main(["evaluate", "--run", out]) == 0
    with open(os.path.join(out, "eval_metrics.json")) as f:
        ev = json.load(f)
    for split in ("test", "warm", "cold"):
        assert ev["slices"][split]["auc"] == pytest.approx(r1["eval"][split]["auc"], abs=1e-6)
    assert {f"L{i}" for i in range(1, 7)} <= set(ev["slices"])


def test_bad_flags_fail_clearly(data_dir, tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--data", data_dir, "--out", str(tmp_path), "--ranker", "xgboost"])


def test_train_pipeline_sparse_dist_gives_the_same_run(data_dir, two_ranks, tmp_path):
    """--pipeline overlaps the input dist of the next batch with the step; the math is
    the same, and evaluation afterwards calls the (detached) model directly."""
    _, plain = two_ranks
    piped = _train(data_dir, str(tmp_path), "--world-size", "2", "--batch-size", "128",
                   "--sharding-type", "table_wise", "--pipeline")
    lp, lq = _losses(plain), _losses(piped)
    assert lp.keys() == lq.keys()
    assert max(abs(lp[k] - lq[k]) for k in lp) < 1e-6
    assert piped["eval"]["test"]["auc"] == pytest.approx(plain["eval"]["test"]["auc"], abs=1e-6)


def test_resuming_with_other_settings_is_refused(data_dir, one_rank, capsys):
    out, _ = one_rank
    assert main(["train", "--data", data_dir, "--out", out, "--ranker", "dlrm",
                 "--embedding-dim", "8", "--epochs", "1", "--seed", "2"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "seed: 1 -> 2" in err
