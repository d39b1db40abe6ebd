import base64
import json
import math
import os
import re

import pytest
import torch

from torchrec_mm.report import (
    Section,
    Table,
    load_metrics,
    mean_std,
    plot_learning_curves,
    plot_slice_bars,
    slice_values,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _strict_json(path):
    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name} in {path}")

    with open(path) as f:
        return json.load(f, parse_constant=no_constants)


def _slices(offset: float):
    return {"all": {"auc": 0.70 + offset, "gauc": 0.65 + offset, "num_samples": 100},
            "cold": {"auc": 0.60 + offset, "gauc": float("nan"), "num_samples": 10}}


def test_write_report_embeds_plots_numbers_and_json(tmp_path):
    out = str(tmp_path / "run")
    metrics = {
        "auc": 0.712345,
        "undefined": float("nan"),
        "steps": torch.tensor(42),
        "slices": _slices(0.0),
        "retrieval": {"HR@10": 0.25, "NDCG@10": 0.125},
    }
    curves = {
        "base": [{"step": 0, "train_loss": 0.9}, {"step": 10, "train_loss": 0.5},
                 {"step": 10, "eval_auc": 0.61}],
        "qarm": [{"step": 0, "train_loss": 0.8}, {"step": 10, "eval_auc": 0.66}],
    }
    slice_metrics = {"base": [_slices(0.0), _slices(0.02), _slices(0.01)],
                     "+VQ&RQ": [_slices(0.05)]}
    extra = Section("Ablation <table>", text="Variants of Table 1.",
                    tables=[Table.from_nested("AUC", {"v1": {"auc": [0.61, 0.63]},
                                                      "v5": {"auc": [0.66, 0.68]}})])
    path = write_report(out, metrics, curves, title="Demo & <test>",
                        sections=[extra], config={"lr": 1e-4, "model": {"dim": 64}},
                        slice_metrics=slice_metrics)
    assert path == os.path.join(out, "report.html")
    assert sorted(os.listdir(out)) == ["metrics.json", "report.html"]  # no temp files left

    doc = open(path).read()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', doc)
    assert len(images) == 3  # learning curves + AUC and GAUC by slice
    for img in images:
        assert base64.b64decode(img).startswith(PNG_MAGIC)
    assert "Demo &amp; &lt;test&gt;" in doc and "<test>" not in doc  # escaped
    assert "Ablation &lt;table&gt;" in doc
    assert "0.7123" in doc and "0.2500" in doc and ">42<" in doc
    assert "0.0001" in doc and "model/dim" in doc  # run config in the header
    # per-seed values shown as mean ± std (base AUC on "all": 0.70, 0.72, 0.71)
    assert "0.7100 ± 0.0100 (n=3)" in doc
    assert "0.6200 ± 0.0141 (n=2)" in doc
    assert "http" not in doc.replace("http-equiv", "")  # self-contained

    data = _strict_json(os.path.join(out, "metrics.json"))
    assert data == load_metrics(out)
    assert data["title"] == "Demo & <test>"
    assert data["metrics"]["auc"] == 0.712345
    assert data["metrics"]["undefined"] is None  # NaN -> null
    assert data["metrics"]["steps"] == 42
    assert data["metrics"]["slices"]["cold"]["gauc"] is None
    assert data["config"]["model"]["dim"] == 64
    assert data["curves"]["qarm"][1]["eval_auc"] == 0.66
    assert data["slice_metrics"]["base"][1]["all"]["auc"] == pytest.approx(0.72)
    assert data["sections"][0]["tables"][0]["rows"][0] == ["v1", [0.61, 0.63]]


def test_report_without_curves_or_slices(tmp_path):
    write_report(str(tmp_path), {"auc": 0.5})
    doc = open(tmp_path / "report.html").read()
    assert "data:image/png" not in doc and "0.5000" in doc
    assert _strict_json(tmp_path / "metrics.json")["metrics"] == {"auc": 0.5}


def test_plots_and_helpers():
    png = plot_learning_curves({"a": [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]})
    assert png.startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="no numeric metric"):
        plot_learning_curves({"a": [{"step": 1}]})
    vals = slice_values({"base": [_slices(0.0), _slices(0.02)], "x": _slices(0.1)}, "gauc")
    assert vals["base"]["all"] == pytest.approx([0.65, 0.67])
    assert len(vals["base"]["cold"]) == 2 and all(math.isnan(v) for v in vals["base"]["cold"])
    assert vals["x"]["all"] == pytest.approx([0.75])
    assert plot_slice_bars(vals, "GAUC").startswith(PNG_MAGIC)
    m, sd, n = mean_std([1.0, 3.0, float("nan")])
    assert (m, n) == (2.0, 2) and sd == pytest.approx(math.sqrt(2))
    assert mean_std(5) == (5.0, 0.0, 1)
    runs = {"base": [{"HR@10": 0.1, "MRR@10": 0.05}, {"HR@10": 0.3, "MRR@10": 0.07}],
            "redrec": {"HR@10": 0.4}}
    t = Table.from_runs("Retrieval", runs)
    assert t.columns == ["variant", "HR@10", "MRR@10"]
    assert t.rows == [["base", [0.1, 0.3], [0.05, 0.07]], ["redrec", 0.4, None]]
    assert "0.2000 ± 0.1414 (n=2)" in t.to_html() and "—" in t.to_html()
    assert math.isnan(mean_std([float("nan")])[0])


def test_load_metrics_reports_bad_json(tmp_path):
    (tmp_path / "metrics.json").write_text("{\n  bad")
    with pytest.raises(ValueError, match="metrics.json: record line 2: invalid JSON"):
        load_metrics(str(tmp_path))
