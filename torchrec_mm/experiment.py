"""``torchrec-mm experiment``: ablations — variants × seeds on one data set.

An experiment spec (YAML, e.g. ``plugins/idproxy-ablation.yaml``)::

    name: my-ablation
    seeds: [0, 1, 2]
    train:                         # TrainConfig fields shared by every variant
      epochs: 2
      batch_size: 256
      ranker: {kind: target_attention}
    prepare:                       # steps run once, in order, before the variants
      - step: encode               # content store -> OUT/prepare/content
        name: content
      - step: train                # a ranker run other steps read (e.g. IDProxy targets)
        name: base_run
        options: {ranker: {kind: target_attention}}
    variants:
      base: {}
      content:                     # any TrainConfig overrides + a plugin list
        plugins:
          - name: content_feature
            options: {store: "{prepare}/content"}

``{prepare}`` in a plugin option is replaced by ``OUT/prepare``; ``{data}`` by the
data directory. Steps are registered with :func:`register_step` (``encode`` and
``train`` here; the method packages add theirs, e.g. ``idproxy_fit``), so a spec
stays declarative. Every run directory is resumable: re-running the command skips
finished runs and steps.

Output: ``OUT/metrics.json`` — per variant and seed the sliced metrics, plus mean and
std over seeds — and ``OUT/report.html`` with the ablation table and AUC/GAUC by slice.

``task: retrieval`` (default ``ranking``) hands the spec to
:func:`torchrec_mm.redrec.experiment.run_retrieval_experiment`: RED-Rec variants
(RedRecConfig overrides) and the SASRec baseline on the RED-Rec protocol (e.g.
``plugins/redrec-ablation.yaml``).
"""

import argparse
import copy
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import yaml

_STEPS: Dict[str, Callable[..., Dict[str, Any]]] = {}
SLICE_ORDER = ["test", "warm", "cold", "L1", "L2", "L3", "L4", "L5", "L6"]
#: ``task:`` of a spec; ``retrieval`` runs torchrec_mm.redrec.experiment (RED-Rec, SASRec)
TASKS = ("ranking", "retrieval")


def register_step(name: str) -> Callable[[Callable[..., Dict[str, Any]]],
                                         Callable[..., Dict[str, Any]]]:
    """Registers ``fn(data_dir, out_dir, options, train_defaults) -> dict`` as a
    prepare step; ``out_dir`` is ``OUT/prepare/<step name>``."""

    def deco(fn: Callable[..., Dict[str, Any]]) -> Callable[..., Dict[str, Any]]:
        _STEPS[name] = fn
        return fn

    return deco


def spec_values(data: str, out: str) -> Dict[str, str]:
    """What ``{prepare}``, ``{runs}`` and ``{data}`` in a spec stand for (absolute
    paths; ``{runs}/<variant>/seed<s>`` is a variant's run, e.g. an earlier variant's
    trained model that a later one reads)."""
    return {"prepare": os.path.abspath(os.path.join(out, "prepare")),
            "runs": os.path.abspath(os.path.join(out, "runs")),
            "data": os.path.abspath(data)}


def run_prepare_steps(spec: Dict[str, Any], data: str, out: str
                      ) -> Tuple[Dict[str, Any], Dict[str, float]]:
    """Runs a spec's ``prepare`` steps in order (each writes ``OUT/prepare/<name>``
    and reuses what it finished before): ``({name: step result}, {"prepare/<name>":
    seconds})``."""
    values = spec_values(data, out)
    prepared: Dict[str, Any] = {}
    timings: Dict[str, float] = {}
    for step in spec.get("prepare") or []:
        t = time.time()
        options = _substitute(step.get("options") or {}, values)
        prepared[step["name"]] = _get_step(step["step"])(
            data, os.path.join(values["prepare"], step["name"]), options,
            spec.get("train") or {})
        timings[f"prepare/{step['name']}"] = time.time() - t
    return prepared, timings


def _get_step(name: str) -> Callable[..., Dict[str, Any]]:
    if name not in _STEPS:
        import importlib

        # method packages register their steps in <package>.steps
        module = f"torchrec_mm.{name.split('_')[0]}.steps"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is None or not module.startswith(e.name):
                raise
    if name not in _STEPS:
        raise KeyError(f"unknown experiment step '{name}'; known: {sorted(_STEPS)}")
    return _STEPS[name]


def _train_config(data: str, out: str, base: Dict[str, Any], overrides: Dict[str, Any],
                  seed: int, plugins: Optional[str]):
    from torchrec_mm.models.rankers import RankerConfig
    from torchrec_mm.training.trainer import TrainConfig

    raw = copy.deepcopy(base)
    ranker = {**(raw.pop("ranker", {}) or {}), **(overrides.get("ranker", {}) or {})}
    raw.update({k: v for k, v in overrides.items() if k not in ("ranker", "plugins")})
    raw.update({"data": data, "out": out, "seed": seed, "plugins": plugins})
    raw.setdefault("progress", True)  # a run's step bar under the experiment's run bar
    return TrainConfig(ranker=RankerConfig.from_dict(ranker), **raw)


@register_step("encode")
def _encode_step(data: str, out: str, options: Dict[str, Any],
                 train_defaults: Dict[str, Any]) -> Dict[str, Any]:
    from torchrec_mm.content.encode_job import encode_items
    from torchrec_mm.content.encoder import ContentEncoderConfig

    opts = dict(options)
    batch_size = int(opts.pop("batch_size", 64))
    cfg = ContentEncoderConfig(**opts) if opts else None
    encode_items(data, out, cfg, batch_size=batch_size, progress=False)
    return {"store": out}


@register_step("train")
def _train_step(data: str, out: str, options: Dict[str, Any],
                train_defaults: Dict[str, Any]) -> Dict[str, Any]:
    from torchrec_mm.training.trainer import train

    opts = dict(options)
    seed = int(opts.pop("seed", 0))
    result = _run_once(_train_config(data, out, train_defaults, opts, seed, None), train)
    return {"run": out, "eval": result.get("eval")}


def _run_once(cfg: Any, train: Callable[[Any], Dict[str, Any]],
              only_finished: bool = False) -> Optional[Dict[str, Any]]:
    """Trains unless ``cfg.out`` already holds a finished run of ``cfg``;
    ``only_finished``: the finished run or None, never training."""
    done = os.path.join(cfg.out, "train_metrics.json")
    if os.path.exists(done):
        with open(done) as f:
            result = json.load(f)
        from torchrec_mm.training.trainer import same_run

        if same_run(result.get("config") or {}, cfg):
            return result
    return None if only_finished else train(cfg)


def _substitute(obj: Any, values: Dict[str, str]) -> Any:
    if isinstance(obj, str):
        for k, v in values.items():
            obj = obj.replace("{" + k + "}", v)
        return obj
    if isinstance(obj, dict):
        return {k: _substitute(v, values) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_substitute(v, values) for v in obj]
    return obj


def load_experiment(path: str) -> Dict[str, Any]:
    with open(path) as f:
        try:
            spec = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML: {e}") from e
    unknown = set(spec) - {"name", "description", "task", "seeds", "train", "prepare",
                           "variants"}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}")
    spec.setdefault("task", "ranking")
    if spec["task"] not in TASKS:
        raise ValueError(f"{path}: task must be one of {list(TASKS)}, got {spec['task']!r}")
    if not spec.get("variants"):
        raise ValueError(f"{path}: 'variants' is required (a mapping name -> overrides)")
    for i, step in enumerate(spec.get("prepare") or []):
        if not isinstance(step, dict) or "step" not in step or "name" not in step:
            raise ValueError(f"{path}: prepare[{i}] needs 'step' and 'name'")
    spec.setdefault("seeds", [0])
    spec.setdefault("train", {})
    return spec


def summarise(per_seed: List[Dict[str, Dict[str, float]]]) -> Dict[str, Dict[str, Any]]:
    """{slice: {metric: {"mean", "std", "values"}}} over seeds."""
    out: Dict[str, Dict[str, Any]] = {}
    for sl in per_seed[0]:
        out[sl] = {}
        for metric in ("auc", "gauc", "uauc", "auc_within_users", "auc_between_users",
                       "logloss"):
            vals = [r[sl][metric] for r in per_seed if metric in r.get(sl, {})]
            vals = [v for v in vals if v is not None and np.isfinite(v)]
            if vals:
                out[sl][metric] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)),
                                   "values": vals}
    return out


def run_experiment(spec_path: str, data: str, out: str,
                   only: Optional[List[str]] = None) -> Dict[str, Any]:
    """Runs the prepare steps, then every variant for every seed; writes the report."""
    from torchrec_mm.report import Section, Table, write_report
    from torchrec_mm.training.trainer import train

    spec = load_experiment(spec_path)
    if spec["task"] == "retrieval":
        from torchrec_mm.redrec.experiment import run_retrieval_experiment

        return run_retrieval_experiment(spec, spec_path, data, out, only)
    unknown = sorted(set(only or []) - set(spec["variants"]))
    if unknown:
        raise ValueError(f"--variants: unknown variant(s) {unknown}; {spec_path} has "
                         f"{list(spec['variants'])}")
    os.makedirs(out, exist_ok=True)
    values = spec_values(data, out)
    prepared, timings = run_prepare_steps(spec, data, out)
    results: Dict[str, Any] = {}
    curves: Dict[str, Any] = {}
    for variant, overrides in spec["variants"].items():
        # --variants: the others are reported when all their seeds have finished runs
        run_it = not only or variant in only
        overrides = _substitute(dict(overrides or {}), values)
        plugins = overrides.pop("plugins", None)
        spec_file = None
        if plugins:
            spec_file = os.path.join(out, "specs", f"{variant}.yaml")
            os.makedirs(os.path.dirname(spec_file), exist_ok=True)
            with open(spec_file, "w") as f:
                yaml.safe_dump({"plugins": plugins}, f)
        per_seed, curve = [], None
        for seed in spec["seeds"]:
            t = time.time()
            cfg = _train_config(data, os.path.join(out, "runs", variant, f"seed{seed}"),
                                spec["train"], overrides, int(seed), spec_file)
            r = _run_once(cfg, train, only_finished=not run_it)
            if r is None:
                break
            timings[f"{variant}/seed{seed}"] = time.time() - t
            per_seed.append(r["eval"])
            if seed == spec["seeds"][0]:
                curve = r["curve"]
        if len(per_seed) < len(spec["seeds"]):
            continue
        curves[variant] = curve
        results[variant] = {"per_seed": per_seed, "summary": summarise(per_seed)}
        print(f"{variant:>12}: " + "  ".join(
            f"{sl} AUC {results[variant]['summary'][sl]['auc']['mean']:.4f}"
            for sl in ("test", "warm", "cold") if "auc" in results[variant]["summary"][sl]))
    metrics = {"name": spec.get("name", os.path.basename(spec_path)), "data": data,
               "seeds": spec["seeds"], "variants": results, "prepare": prepared,
               "timings_s": timings}
    table_runs = {v: [{f"{sl} {m}": r[sl][m] for sl in ("test", "warm", "cold")
                       for m in ("auc", "gauc") if m in r.get(sl, {})}
                      for r in res["per_seed"]] for v, res in results.items()}
    write_report(
        out, metrics, curves=curves, title=f"experiment: {metrics['name']}",
        config={"spec": spec_path, "data": data, "seeds": spec["seeds"],
                "train": spec["train"]},
        sections=[Section(title="Ablation", text=spec.get("description", ""),
                          tables=[Table.from_runs("AUC / GAUC (mean ± std over seeds)",
                                                  table_runs)])],
        slice_metrics={v: res["per_seed"] for v, res in results.items()},
        slice_order=SLICE_ORDER + _age_slices(results))
    print(f"report: {os.path.join(out, 'report.html')}")
    return metrics


def _age_slices(results: Dict[str, Any]) -> List[str]:
    """The item-age slice names of the results, in bucket order (youngest first)."""
    names: List[str] = []
    for res in results.values():
        for r in res["per_seed"]:
            names += [k for k in r if k.startswith("age") and k not in names]
    return names


def _run(args: argparse.Namespace) -> int:
    # absolute paths: the runs store them, and a resumed experiment must match its runs
    # whatever directory it is started from
    run_experiment(args.config, os.path.abspath(args.data), os.path.abspath(args.out),
                   only=args.variants.split(",") if args.variants else None)
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "experiment", help="run an ablation (variants x seeds) from a YAML spec",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="experiment spec (YAML)")
    p.add_argument("--data", required=True, help="dataset directory (with split.json)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--variants", help="comma-separated subset of variants to run")
    p.set_defaults(func=_run)
