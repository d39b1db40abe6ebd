"""Tests of RED-Rec retrieval experiments (``task: retrieval``), the SASRec CLI and the
LM truncation step: a 2-variant + SASRec spec on tiny generated data with a tiny BERT
(one intra-op thread, restored afterwards)."""

import json
import os

import numpy as np
import pytest
import torch
import yaml

from torchrec_mm.cli import main
from torchrec_mm.data.split import make_split
from torchrec_mm.data.synth import SynthConfig, generate
from torchrec_mm.experiment import _get_step, load_experiment, run_experiment
from torchrec_mm.redrec import experiment as rx
from torchrec_mm.redrec import sasrec as sasrec_mod
from torchrec_mm.redrec import train as train_mod
from torchrec_mm.redrec.sequences import POLICIES
from torchrec_mm.redrec.test_tower import build_tiny_bert
from torchrec_mm.redrec.tower import INITS, LM_POSITIONS

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ABLATION_SPEC = os.path.join(os.path.dirname(__file__), "..", "..", "plugins",
                             "redrec-ablation.yaml")
KS = [10, 50]
MIXING_SPARSE_SPEC = os.path.join(os.path.dirname(ABLATION_SPEC), "redrec-mixing-sparse.yaml")


def tiny_spec(bert: str) -> dict:
    return {
        "name": "tiny-retrieval",
        "task": "retrieval",
        "description": "two RED-Rec variants and SASRec on tiny data",
        "seeds": [0, 1],
        "prepare": [{"step": "redrec_lm", "name": "lm",
                     "options": {"layers": 1, "model_path": bert}}],
        "train": {"model_path": "{prepare}/lm", "last_n": 16, "window": 4,
                  "embedding_dim": 16, "interests_per_scenario": 1, "num_negatives": 32,
                  "batch_size": 32, "max_steps": 2, "dropout": 0.0, "eval_ks": KS,
                  "eval_max_users": 40, "log_every": 1},
        "variants": {
            "multi": {},
            "single": {"loss": "single_interest"},
            "sasrec": {"model": "sasrec", "dim": 16, "num_layers": 1, "num_heads": 2,
                       "max_len": 12, "epochs": 1, "batch_size": 64, "negatives": 32},
        },
    }


pytestmark = pytest.mark.usefixtures("one_thread")  # redrec/conftest.py


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("redrec_experiment")
    data = str(root / "data")
    generate(SynthConfig(num_users=120, num_items=240, num_interactions=4800, num_topics=8,
                         seed=1), data)
    make_split(data)
    bert = build_tiny_bert(str(root / "bert"))
    return {"root": root, "data": data, "bert": bert}


def write_spec(path, spec: dict) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    return str(path)


class Counter:
    """Wraps a function and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.fixture(scope="module")
def experiment(env):
    """Runs the tiny experiment once, recording the evaluation cases that RED-Rec's
    and SASRec's evaluations build."""
    spec = write_spec(env["root"] / "tiny.yaml", tiny_spec(env["bert"]))
    out = str(env["root"] / "out")
    seen = {"redrec": [], "sasrec": []}

    def recorder(kind, fn):
        def wrapped(*args, **kwargs):
            cases = fn(*args, **kwargs)
            seen[kind].append(cases)
            return cases
        return wrapped

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "make_eval_cases",
                   recorder("redrec", train_mod.make_eval_cases))
        mp.setattr(sasrec_mod, "make_eval_cases",
                   recorder("sasrec", sasrec_mod.make_eval_cases))
        result = run_experiment(spec, env["data"], out)
    with open(os.path.join(out, "metrics.json")) as f:
        saved = json.load(f)
    return {"spec": spec, "out": out, "result": result, "saved": saved, "cases": seen}


def test_metrics_report_and_seeds(experiment):
    m = experiment["saved"]["metrics"]
    assert m["task"] == "retrieval" and m["seeds"] == [0, 1]
    assert set(m["variants"]) == {"multi", "single", "sasrec"}  # (JSON keys sorted)
    names = ["HR@10", "NDCG@10", "HR@50", "NDCG@50", "MRR@10", "MRR@50", "MRR"]
    for name, v in m["variants"].items():
        assert v["model"] == ("sasrec" if name == "sasrec" else "redrec")
        assert len(v["per_seed"]) == 2
        for r in v["per_seed"]:
            assert set(r) == set(names)
            assert 0 <= r["HR@10"] <= r["HR@50"] <= 1 and 0 <= r["MRR"] <= 1
        for metric in names:
            vals = [r[metric] for r in v["per_seed"]]
            s = v["summary"][metric]
            assert s["values"] == pytest.approx(vals)
            assert s["mean"] == pytest.approx(np.mean(vals))
            assert s["std"] == pytest.approx(np.std(vals, ddof=1))
        # the seed changes the model (init, samples, negatives), not the cases
        assert v["per_seed"][0] != v["per_seed"][1], name
    out = experiment["out"]
    for seed in (0, 1):
        runs = os.path.join(out, "runs")
        with open(os.path.join(runs, "multi", f"seed{seed}", "train_metrics.json")) as f:
            assert json.load(f)["config"]["seed"] == seed
        with open(os.path.join(runs, "sasrec", f"seed{seed}", "eval_metrics.json")) as f:
            assert json.load(f)["config"]["model"]["seed"] == seed
    # the prepare step wrote a 1-layer LM that the variants read
    with open(os.path.join(out, "prepare", "lm", "config.json")) as f:
        assert json.load(f)["num_hidden_layers"] == 1
    with open(os.path.join(out, "runs", "single", "seed0", "train_metrics.json")) as f:
        assert json.load(f)["config"]["model_path"] == os.path.join(
            os.path.abspath(out), "prepare", "lm")

    html = open(os.path.join(out, "report.html")).read()
    assert html.count("data:image/png;base64,") >= 2  # metric panels + loss curves
    sections = experiment["saved"]["sections"]
    table = sections[0]["tables"][0]
    assert sections[0]["title"] == "Ablation"
    assert table["columns"] == ["variant", "HR@10", "HR@50", "NDCG@10", "NDCG@50", "MRR"]
    assert [row[0] for row in table["rows"]] == ["multi", "single", "sasrec"]
    assert table["rows"][2][1] == pytest.approx(
        [r["HR@10"] for r in m["variants"]["sasrec"]["per_seed"]])
    assert set(experiment["saved"]["curves"]) == {"multi", "single"}


def test_every_run_is_scored_on_the_same_cases(experiment):
    """RED-Rec's evaluation and SASRec's build identical cases (users, cutoffs, targets,
    pool) for every variant and seed, and the recorded digest describes them."""
    seen = experiment["cases"]
    assert len(seen["redrec"]) == 4 and len(seen["sasrec"]) == 2
    ref = seen["redrec"][0]
    assert 0 < len(ref) <= 40
    for cases in seen["redrec"] + seen["sasrec"]:
        for field in ("users", "cutoff_time", "targets", "pool"):
            assert torch.equal(getattr(cases, field), getattr(ref, field)), field
        assert cases.config == ref.config
    protocol = experiment["saved"]["metrics"]["protocol"]
    assert protocol["num_cases"] == len(ref) and protocol["pool_size"] == ref.pool.numel()
    assert protocol["ks"] == KS and protocol["max_users"] == 40
    for v in experiment["saved"]["metrics"]["variants"].values():
        assert {r["num_users"] for r in v["runs"]} == {len(ref)}


def test_rerun_skips_finished_runs(experiment, env, monkeypatch, capsys):
    red = Counter(rx.train_redrec)
    sas = Counter(rx.train_sasrec)
    monkeypatch.setattr(rx, "train_redrec", red)
    monkeypatch.setattr(rx, "train_sasrec", sas)
    out, first = experiment["out"], experiment["result"]
    again = run_experiment(experiment["spec"], env["data"], out)
    assert (red.calls, sas.calls) == (0, 0)
    assert again["variants"] == first["variants"]
    assert list(again["variants"]) == ["multi", "single", "sasrec"]  # spec order
    printed = capsys.readouterr().out
    assert all(f"{v}: HR@10" in printed for v in ("multi", "single", "sasrec"))
    # bars on or off is not another run: a spec that turns them off reuses every run
    with open(experiment["spec"]) as f:
        quiet = yaml.safe_load(f)
    quiet["train"]["progress"] = False
    quiet_spec = write_spec(env["root"] / "tiny_quiet.yaml", quiet)
    assert run_experiment(quiet_spec, env["data"], out)["variants"] == first["variants"]
    assert (red.calls, sas.calls) == (0, 0)
    # a run without its final metrics is run again (RED-Rec resumes from its checkpoint
    # and only re-evaluates); --variants restricts the runs; the report also shows the
    # other variants whose runs have all finished, and leaves out the others untrained
    os.remove(os.path.join(out, "runs", "single", "seed1", "train_metrics.json"))
    assert main(["experiment", "--config", experiment["spec"], "--data", env["data"],
                 "--out", out, "--variants", "single,sasrec"]) == 0
    assert (red.calls, sas.calls) == (1, 0)
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)["metrics"]
    assert set(m["variants"]) == {"multi", "single", "sasrec"}  # (JSON keys sorted)
    for a, b in zip(m["variants"]["single"]["per_seed"],
                    first["variants"]["single"]["per_seed"]):
        assert a == pytest.approx(b)
    os.remove(os.path.join(out, "runs", "multi", "seed1", "train_metrics.json"))
    assert main(["experiment", "--config", experiment["spec"], "--data", env["data"],
                 "--out", out, "--variants", "sasrec"]) == 0
    assert (red.calls, sas.calls) == (1, 0)  # multi is not trained again
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)["metrics"]
    assert set(m["variants"]) == {"single", "sasrec"}


def test_shorter_training_is_not_served_from_a_longer_run(experiment, env, tmp_path):
    """epochs / max_steps may grow on a re-run (training resumes), but a finished run
    longer than the new setting is refused instead of being reported under it."""
    spec = tiny_spec(env["bert"])
    spec["train"]["max_steps"] = 1
    path = write_spec(tmp_path / "shorter.yaml", spec)
    with pytest.raises(ValueError, match=r"trained for 2 steps, more than the 1 of"):
        run_experiment(path, env["data"], experiment["out"], only=["multi"])


@pytest.mark.parametrize("variants, match", [
    ({"v": {"lerning_rate": 0.1}}, r"bad\.yaml: variant 'v': unknown RED-Rec option\(s\) "
                                   r"\['lerning_rate'\]"),
    ({"v": {"model": "sasrec", "policy": "2d"}},
     r"bad\.yaml: variant 'v': unknown SASRec option\(s\) \['policy'\]"),
    ({"v": {"model": "hstu"}}, r"bad\.yaml: variant 'v': model must be one of"),
    ({"v": {"eval_max_users": 5}}, r"bad\.yaml: variant 'v': \['eval_max_users'\] define "
                                   r"the evaluation cases"),
    ({"v": {"policy": "random"}}, r"bad\.yaml: variant 'v': .*policy"),
    ({"ok": {}, "v": {"model": "sasrec", "dim": 15, "num_heads": 2}},
     r"bad\.yaml: variant 'v': SASRecConfig: dim=15 is not divisible"),
    ({"a/b": {}}, r"bad\.yaml: variant 'a/b': a variant name"),
])
def test_spec_errors_name_file_variant_and_key(env, tmp_path, variants, match):
    spec = {"task": "retrieval", "train": {"model_path": env["bert"]}, "variants": variants}
    path = write_spec(tmp_path / "bad.yaml", spec)
    with pytest.raises(ValueError, match=match):
        run_experiment(path, env["data"], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "runs")  # checked before any work


def test_spec_errors_in_train_task_and_selection(env, tmp_path, capsys):
    path = write_spec(tmp_path / "bad.yaml", {"task": "retrieval",
                                             "train": {"windw": 3}, "variants": {"a": {}}})
    with pytest.raises(ValueError, match=r"bad\.yaml: train: unknown RED-Rec option\(s\) "
                                         r"\['windw'\]"):
        run_experiment(path, env["data"], str(tmp_path / "out"))
    path = write_spec(tmp_path / "bad.yaml", {"task": "retrieval", "train": {"seed": 3},
                                             "variants": {"a": {}}})
    with pytest.raises(ValueError, match=r"\['seed'\] \(set by the experiment\)"):
        run_experiment(path, env["data"], str(tmp_path / "out"))
    path = write_spec(tmp_path / "bad.yaml", {"task": "recall", "variants": {"a": {}}})
    assert main(["experiment", "--config", path, "--data", env["data"],
                 "--out", str(tmp_path / "out")]) == 2
    assert "task must be one of ['ranking', 'retrieval']" in capsys.readouterr().err
    path = write_spec(tmp_path / "ok.yaml", {"task": "retrieval", "variants": {"a": {}}})
    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['b'\]"):
        run_experiment(path, env["data"], str(tmp_path / "out"), only=["b"])


def test_ablation_spec_covers_the_paper_and_builds(tmp_path):
    """plugins/redrec-ablation.yaml: every variant builds a valid config, and together
    they cover Table 3 / Table A3: multi vs single interest, last_n 128/64/32, the five
    mixing policies, pretrained / scratch / frozen, and SASRec."""
    spec = load_experiment(ABLATION_SPEC)
    assert spec["task"] == "retrieval"
    assert "min" in spec["description"]  # the documented wall time
    configs = rx.variant_configs(spec, ABLATION_SPEC, "DATA", str(tmp_path))
    models = {v: (o or {}).get("model", "redrec") for v, o in spec["variants"].items()}
    baselines = sorted(v for v, m in models.items() if m != "redrec")
    assert set(models.values()) == {"redrec", "sasrec", "popularity", "content_mean"}
    red = [c for v, runs in configs.items() if models[v] == "redrec" for c in runs]
    assert all(isinstance(c, train_mod.RedRecConfig) for c in red)
    assert len(red) == (len(configs) - len(baselines)) * len(spec["seeds"])
    # the content_mean baselines read the spec's frozen content vectors, no trained side
    for v in (v for v, m in models.items() if m == "content_mean"):
        assert all(c.content_store and not c.item_states for c in configs[v]), v
    assert {c.policy for c in red} == set(POLICIES)
    assert {c.last_n for c in red} >= {128, 64, 32}
    assert {c.init for c in red} == set(INITS)
    # the mixing ablation with the LM's own positions off as well (lm_positions none)
    assert {c.lm_positions for c in red} == set(LM_POSITIONS)
    assert {c.policy for c in red if c.lm_positions == "none"} >= {"2d", "1d_time",
                                                                    "global_time"}
    assert {c.loss for c in red} == {"multi_interest", "single_interest"}
    assert len({c.seed for c in red}) == len(spec["seeds"]) >= 2
    # one protocol for all
    assert len({tuple(getattr(c, f) if f != "eval_ks" else tuple(c.eval_ks)
                      for f in rx.PROTOCOL_FIELDS) for c in red}) == 1
    for step in spec.get("prepare") or []:
        _get_step(step["step"])  # every prepare step exists
    # each variant differs from the base run in what its name says and nothing else
    base = configs["base"][0].to_dict()
    for name, runs in configs.items():
        if name in baselines:
            continue
        diff = {k for k, v in runs[0].to_dict().items() if base[k] != v and k != "out"}
        assert diff == set(spec["variants"][name] or {}), name


def test_mixing_sparse_spec_builds(tmp_path):
    """plugins/redrec-mixing-sparse.yaml: the five mixing policies with positives from
    search and ads only (histories from every scenario), every variant — the baselines
    too — on that one protocol, and each policy variant differs from the others in its
    policy alone."""
    spec = load_experiment(MIXING_SPARSE_SPEC)
    configs = rx.variant_configs(spec, MIXING_SPARSE_SPEC, "DATA", str(tmp_path))
    red = {v: runs for v, runs in configs.items()
           if isinstance(runs[0], train_mod.RedRecConfig)}
    assert {runs[0].policy for v, runs in red.items() if v.startswith("mix_")} == \
        set(POLICIES)
    for runs in red.values():
        for c in runs:
            assert c.target_scenarios == ("search", "ads")
            assert c.target_actions == ("is_click",)
    assert configs["popularity"][0][1]["target_scenarios"] == ("search", "ads")
    base = red["mix_2d"][0].to_dict()
    for name, runs in red.items():
        if name.startswith("mix_"):
            diff = {k for k, v in runs[0].to_dict().items() if base[k] != v and k != "out"}
            assert diff <= {"policy"}, name
    # the README's table: Table 3 / A3 in the current setting (seen negatives, centred
    # items), each seen_* variant seen_cen_2d plus the change its name says, and SASRec
    seen = {v: runs[0] for v, runs in red.items() if "seen" in v}
    assert {c.policy for c in seen.values()} == set(POLICIES)
    assert {c.last_n for c in seen.values()} == {32, 64, 128}
    assert {c.init for c in seen.values()} == set(INITS)
    assert {c.loss for c in seen.values()} == {"multi_interest", "single_interest"}
    ref = seen["seen_cen_2d"].to_dict()
    assert ref["negatives"] == "seen" and ref["center_items"]
    for name, c in seen.items():
        diff = {k for k, v in c.to_dict().items() if ref[k] != v and k != "out"}
        said = {k for k, v in spec["variants"][name].items()
                if spec["variants"]["seen_cen_2d"].get(k) != v}
        assert diff == said, name
    # SASRec reads the events the user tower reads: last_n - window
    assert configs["sasrec"][0][0]["max_len"] == ref["last_n"] - ref["window"]


def test_truncate_lm_keeps_the_chosen_layers(env, tmp_path):
    from transformers import AutoModel

    full = AutoModel.from_pretrained(env["bert"], local_files_only=True)
    top = rx.truncate_lm(str(tmp_path / "top"), 1, env["bert"])
    bottom = rx.truncate_lm(str(tmp_path / "bottom"), 1, env["bert"], keep="bottom")
    for path, src in ((top, 1), (bottom, 0)):
        lm = AutoModel.from_pretrained(path, local_files_only=True)
        assert lm.config.num_hidden_layers == 1 and len(lm.encoder.layer) == 1
        for (k, a), (k2, b) in zip(lm.encoder.layer[0].state_dict().items(),
                                   full.encoder.layer[src].state_dict().items()):
            assert k == k2 and torch.equal(a, b), k
        torch.testing.assert_close(lm.embeddings.word_embeddings.weight,
                                   full.embeddings.word_embeddings.weight)
    stamp = os.path.getmtime(os.path.join(top, "config.json"))
    assert rx.truncate_lm(top, 1, env["bert"]) == top  # same request: reused
    assert os.path.getmtime(os.path.join(top, "config.json")) == stamp
    with pytest.raises(ValueError, match=r"layers must be in \[1, 2\]"):
        rx.truncate_lm(str(tmp_path / "x"), 3, env["bert"])
    assert not os.path.exists(tmp_path / "x")


def test_sasrec_cli_trains_evaluates_and_reuses(env, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "sasrec")
    argv = ["redrec", "sasrec", "--data", env["data"], "--out", out, "--dim", "16",
            "--num-layers", "1", "--max-len", "12", "--epochs", "2", "--negatives", "32",
            "--max-users", "40", "--ks", "10,50", "--no-progress"]
    sas = Counter(rx.train_sasrec)
    monkeypatch.setattr(rx, "train_sasrec", sas)
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["epochs"] == 2 and set(printed["eval"]) >= {"HR@10", "NDCG@50", "MRR"}
    with open(os.path.join(out, "eval_metrics.json")) as f:
        saved = json.load(f)
    assert saved["config"]["model"]["dim"] == 16 and saved["config"]["eval_split"] == "test"
    assert saved["config"]["protocol"]["max_users"] == 40
    # the default protocol flags are redrec train's: the same cases as a RED-Rec run
    red = train_mod.RedRecConfig(data=env["data"], out="x", eval_max_users=40,
                                 eval_ks=(10, 50))
    assert saved["config"]["protocol"] == json.loads(json.dumps(
        __import__("dataclasses").asdict(rx.protocol_config(red))))
    for name in ("model.safetensors", "config.json", "metrics.json"):
        assert os.path.exists(os.path.join(out, name))
    assert main(argv) == 0 and sas.calls == 1  # same settings: reused
    assert json.loads(capsys.readouterr().out) == printed
    assert main(argv + ["--no-resume"]) == 0 and sas.calls == 2
    capsys.readouterr()
    assert main(argv + ["--seed", "1"]) == 0 and sas.calls == 3  # other settings: trained
    assert json.loads(capsys.readouterr().out)["eval"] != printed["eval"]
    cfg = tmp_path / "s.yaml"
    cfg.write_text("dim: 16\nwindow: 4\n")
    assert main(argv + ["--config", str(cfg)]) == 2
    assert "s.yaml: unknown SASRec option(s) ['window']" in capsys.readouterr().err
