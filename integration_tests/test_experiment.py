"""`torchrec-mm experiment`: prepare steps, variants x seeds, summary and report."""

import json
import os

import pytest

from torchrec_mm.cli import main
from torchrec_mm.data.split import make_split
from torchrec_mm.data.synth import SynthConfig, generate

SPEC = """
name: content-vs-base
seeds: [0, 1]
train: {epochs: 1, batch_size: 128, ranker: {kind: dlrm, embedding_dim: 8}}
prepare:
  - {step: encode, name: content}
variants:
  base: {}
  content:
    plugins:
      - name: content_feature
        options: {store: "{prepare}/content"}
"""


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    data = str(root / "data")
    generate(SynthConfig(num_users=300, num_items=300, num_interactions=30_000, seed=3), data)
    make_split(data)
    spec = root / "spec.yaml"
    spec.write_text(SPEC)
    out = str(root / "out")
    assert main(["experiment", "--config", str(spec), "--data", data, "--out", out]) == 0
    with open(os.path.join(out, "metrics.json")) as f:
        return out, json.load(f)["metrics"]


def test_every_variant_and_seed_is_summarised(result):
    out, m = result
    assert set(m["variants"]) == {"base", "content"}
    for v in m["variants"].values():
        assert len(v["per_seed"]) == 2
        s = v["summary"]["test"]["auc"]
        assert len(s["values"]) == 2 and s["std"] >= 0
        assert s["values"][0] != s["values"][1]  # seeds differ
        # the AUC's split into same-user and cross-user pairs is summarised as well
        cold = v["summary"]["cold"]
        assert {"auc_within_users", "auc_between_users"} <= set(cold)
        share = v["per_seed"][0]["cold"]["within_user_pair_share"]
        split = (share * cold["auc_within_users"]["values"][0]
                 + (1 - share) * cold["auc_between_users"]["values"][0])
        assert abs(split - cold["auc"]["values"][0]) < 1e-9
    assert os.path.exists(os.path.join(out, "report.html"))


def test_content_lifts_cold_items(result):
    _, m = result
    cold = {v: m["variants"][v]["summary"]["cold"]["auc"]["mean"] for v in m["variants"]}
    assert cold["content"] > cold["base"] + 0.02


def test_bad_spec_is_rejected(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: x\nvariant: {}\n")
    assert main(["experiment", "--config", str(spec), "--data", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 2


def test_rerun_with_variants_and_relative_paths(result, monkeypatch):
    """A re-run trains nothing that finished (also when started from another directory
    with relative paths); --variants runs only those and reports every other variant
    whose runs have all finished."""
    import torchrec_mm.training.trainer as trainer

    out, first = result
    calls = []
    monkeypatch.setattr(trainer, "train", lambda cfg: calls.append(cfg.out))
    root = os.path.dirname(out)
    monkeypatch.chdir(root)
    args = ["experiment", "--config", "spec.yaml", "--data", "data", "--out", "out"]
    assert main(args + ["--variants", "content"]) == 0
    assert calls == []
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)["metrics"]
    assert set(m["variants"]) == {"base", "content"}
    assert m["variants"]["base"]["per_seed"] == first["variants"]["base"]["per_seed"]
    os.rename(os.path.join(out, "runs", "base", "seed1", "train_metrics.json"),
              os.path.join(root, "base_seed1.json"))
    try:
        assert main(args + ["--variants", "content"]) == 0
        assert calls == []  # base is left alone, and left out
        with open(os.path.join(out, "metrics.json")) as f:
            assert set(json.load(f)["metrics"]["variants"]) == {"content"}
    finally:
        os.rename(os.path.join(root, "base_seed1.json"),
                  os.path.join(out, "runs", "base", "seed1", "train_metrics.json"))
    assert main(args + ["--variants", "nope"]) == 2
