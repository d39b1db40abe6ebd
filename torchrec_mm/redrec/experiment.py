"""RED-Rec retrieval experiments: ``torchrec-mm experiment`` with ``task: retrieval``.

The ablation runner of :mod:`torchrec_mm.experiment` hands a spec with ``task:
retrieval`` to :func:`run_retrieval_experiment`. Spec (e.g.
``plugins/redrec-ablation.yaml``)::

    name: redrec-ablation
    task: retrieval
    seeds: [0, 1]
    prepare:                          # steps run once, before the variants
      - {step: encode, name: content}                 # item tower: content store
      - {step: redrec_lm, name: lm, options: {layers: 2}}   # MiniLM's top 2 layers
    train:                            # RedRecConfig fields shared by every variant
      model_path: "{prepare}/lm"
      item_embedding: content
      content_store: "{prepare}/content"
      epochs: 1
      eval_max_users: 1000            # eval_* / min_history: the protocol of ALL variants
    variants:
      base: {}                        # RedRecConfig overrides
      single_interest: {loss: single_interest}
      sasrec: {model: sasrec, epochs: 20, max_len: 50}   # SASRecConfig fields

**Variants.** A RED-Rec variant is ``train`` updated by its overrides
(:class:`~torchrec_mm.redrec.train.RedRecConfig` fields, ``data``/``out``/``seed`` set
by the experiment). A variant with ``model: sasrec`` is the ID-only SASRec baseline
(:mod:`~torchrec_mm.redrec.sasrec`, its other keys
:class:`~torchrec_mm.redrec.sasrec.SASRecConfig` fields but ``num_items``/``seed``),
trained on the train split and evaluated by :func:`run_sasrec` on the same protocol.
A variant ``{model: popularity}`` (no other keys) ranks every user's candidates by the
items' train-split counts (:mod:`~torchrec_mm.redrec.popularity`, :func:`run_popularity`):
the non-personalised floor, the same for every seed. A variant ``{model: content_mean}``
(options: :data:`CONTENT_MEAN_OPTIONS`, default ``train``'s) scores candidates by their
cosine with the mean frozen content vector of the user's mixed history
(:mod:`~torchrec_mm.redrec.content_mean`, :func:`run_content_mean`): the training-free
reference of the content towers, also the same for every seed.

**One protocol.** The evaluation cases (users, random cutoffs, targets, the shared
random pool, their seed) are defined by the protocol fields of ``train``
(:data:`PROTOCOL_FIELDS`, mapped by :func:`protocol_config` exactly as
:func:`~torchrec_mm.redrec.train.evaluate_redrec` maps them); a variant may not
override them, so every variant and seed is scored on the same cases. Fields that
change how a model is evaluated but not the cases (``eval_last_n``, ``eval_index``,
``eval_batch_size``, ``eval_nprobe``) may differ; ``eval_last_n`` defaults to
``last_n - window``, so a ``last_n: 32`` variant also reads shorter histories at
evaluation, as it does in training.

**Seeds** set the RED-Rec / SASRec ``seed`` (initialisation, training samples,
negatives), never the protocol's ``eval_seed``.

**Resumable.** Runs live in ``OUT/runs/<variant>/seed<k>``; a run whose directory holds
finished metrics for the same configuration is not retrained (an interrupted RED-Rec
run resumes from its last checkpoint). Prepare steps are the ranking runner's
(``encode``, ``redrec_train``, ``redrec_item_states``, ...) plus ``redrec_lm``
(:func:`truncate_lm`).

**Output.** ``OUT/metrics.json`` — per variant the per-seed HR@K / NDCG@K / MRR@K / MRR
and their mean, sample std and values over seeds, the protocol, timings — and
``OUT/report.html`` with the ablation table, HR@K / NDCG@K bars by variant and the
RED-Rec loss curves. One summary line per variant is printed.
"""

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from torchrec_mm.experiment import _substitute, register_step, run_prepare_steps, spec_values
from torchrec_mm.redrec.protocol import ProtocolConfig
from torchrec_mm.redrec.sasrec import SASRecConfig, train_sasrec
from torchrec_mm.redrec.train import RedRecConfig, normalized_redrec_config, train_redrec
from torchrec_mm.report import Figure, Section, Table, _new_figure, _png, mean_std
from torchrec_mm.training.trainer import same_run

__all__ = [
    "PROTOCOL_FIELDS",
    "RetrievalVariant",
    "check_spec",
    "metric_names",
    "metric_values",
    "plot_metric_panels",
    "protocol_config",
    "retrieval_section",
    "run_redrec",
    "run_retrieval_experiment",
    "run_content_mean",
    "run_popularity",
    "run_sasrec",
    "truncate_lm",
    "variant_configs",
]

MODELS = ("redrec", "sasrec", "popularity", "content_mean")
#: RedRecConfig fields a ``content_mean`` variant may set: its item vectors and which
#: history events it averages
CONTENT_MEAN_OPTIONS = ("content_store", "content_field", "policy", "last_n", "quotas",
                        "eval_last_n")
#: RedRecConfig fields that define the evaluation cases: shared by every variant
PROTOCOL_FIELDS: Tuple[str, ...] = ("eval_split", "eval_num_targets", "eval_pool_size",
                                    "eval_ks", "eval_max_users", "eval_seed", "min_history",
                                    "target_actions", "target_scenarios")
_SET_BY_EXPERIMENT = ("data", "out", "seed")
_REDREC_FIELDS = tuple(f.name for f in dataclasses.fields(RedRecConfig)
                       if f.name not in _SET_BY_EXPERIMENT)
_SASREC_FIELDS = tuple(f.name for f in dataclasses.fields(SASRecConfig)
                       if f.name not in ("num_items", "seed"))
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
#: a baseline run's evaluation (SASRec, popularity, content_mean): ``{"config", "metrics"}``
BASELINE_EVAL_FILE = "eval_metrics.json"
LM_MARKER = "truncation.json"


# --------------------------------------------------------------------------- protocol


def protocol_config(cfg: RedRecConfig) -> ProtocolConfig:
    """The :class:`ProtocolConfig` a RED-Rec configuration evaluates on
    (:meth:`RedRecConfig.protocol`, what :func:`~torchrec_mm.redrec.train.evaluate_redrec`
    uses)."""
    return cfg.protocol()


def metric_names(ks: Sequence[int]) -> List[str]:
    """``HR@K, NDCG@K`` for every K, then ``MRR@K`` for every K, then ``MRR``."""
    ks = [int(k) for k in ks]
    return ([f"{m}@{k}" for k in ks for m in ("HR", "NDCG")]
            + [f"MRR@{k}" for k in ks] + ["MRR"])


def metric_values(metrics: Mapping[str, Any]) -> Dict[str, float]:
    """The HR@K / NDCG@K / MRR@K / MRR entries of an evaluation result, in
    :func:`metric_names` order (other entries dropped)."""
    ks = sorted({int(k.split("@")[1]) for k in metrics if k.startswith("HR@")})
    return {k: float(metrics[k]) for k in metric_names(ks) if k in metrics}


def _summarise(per_seed: List[Dict[str, float]]) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    for name in per_seed[0]:
        vals = [r[name] for r in per_seed if r.get(name) is not None
                and math.isfinite(r[name])]
        if vals:  # sample std (ddof 1), as the report's mean ± std cells
            out[name] = {"mean": float(np.mean(vals)),
                         "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                         "values": vals}
    return out


def _canonical(obj: Any) -> Any:
    """JSON round trip (tuples -> lists), as a config reads back from a metrics file."""
    return json.loads(json.dumps(obj))


# --------------------------------------------------------------------------- runs


def run_redrec(cfg: RedRecConfig, only_finished: bool = False) -> Optional[Dict[str, Any]]:
    """``train_metrics.json`` of ``cfg.out`` if it holds a finished run of the same
    configuration (with its evaluation when ``cfg.evaluate``), else (None with
    ``only_finished``) :func:`~torchrec_mm.redrec.train.train_redrec` (which resumes
    from the last checkpoint; a run of other settings is refused, except ``epochs`` /
    ``max_steps``, and so is a checkpoint that trained longer than ``cfg`` asks for)."""
    done = os.path.join(cfg.out, "train_metrics.json")
    if os.path.exists(done):
        with open(done) as f:
            old = json.load(f)
        if same_run(old.get("config") or {}, cfg, normalized_redrec_config) and (
                old.get("eval") or not cfg.evaluate):
            return old
    return None if only_finished else train_redrec(cfg)


def _protocol_of(data: str, out: str, eval_options: Optional[Mapping[str, Any]],
                 who: str) -> "RedRecConfig":
    """The RedRecConfig whose protocol a baseline with ``eval_options``
    (:data:`PROTOCOL_FIELDS`, RedRecConfig names and defaults) evaluates on."""
    ev = dict(eval_options or {})
    bad = sorted(set(ev) - set(PROTOCOL_FIELDS))
    if bad:
        raise ValueError(f"{who}: unknown evaluation option(s) {bad}; known: "
                         f"{list(PROTOCOL_FIELDS)}")
    return RedRecConfig(data=data, out=out, **ev)


def _sasrec_setup(data: str, out: str, options: Optional[Mapping[str, Any]],
                  eval_options: Optional[Mapping[str, Any]]
                  ) -> Tuple[SASRecConfig, RedRecConfig]:
    from torchrec_mm.data.io import load_meta

    opts = dict(options or {})
    bad = sorted(set(opts) - set(_SASREC_FIELDS) - {"seed"})
    if bad:
        raise ValueError(f"SASRec: unknown option(s) {bad}; known: {sorted(_SASREC_FIELDS)}")
    # the protocol a RED-Rec run with these settings evaluates on (same defaults)
    red = _protocol_of(data, out, eval_options, "SASRec")
    # the positives RED-Rec trains and is evaluated on are SASRec's next-item targets
    opts.setdefault("target_actions", red.target_actions)
    model = SASRecConfig(num_items=load_meta(data).num_items, **opts)
    return model, red


def run_sasrec(data: str, out: str, options: Optional[Mapping[str, Any]] = None,
               eval_options: Optional[Mapping[str, Any]] = None, progress: bool = False,
               resume: bool = True, only_finished: bool = False) -> Optional[Dict[str, Any]]:
    """Trains the SASRec baseline on ``data``'s train split and evaluates it on the
    RED-Rec protocol.

    Args:
        data: dataset directory (with ``split.json``); out: run directory.
        options: :class:`SASRecConfig` fields (``num_items`` from the dataset).
        eval_options: :data:`PROTOCOL_FIELDS` (RedRecConfig names and defaults), so a
            RED-Rec run with the same values evaluates on the same cases.
        progress: tqdm bars; resume: reuse a finished run of the same configuration.
        only_finished: return that finished run, or None (never train).

    Returns:
        ``{"config": {"data", "model", "protocol", "eval_split"}, "train": the metrics
        of :func:`~torchrec_mm.redrec.sasrec.fit_sasrec`, "eval": HR/NDCG/MRR@K, MRR,
        num_users, pool_size, ...}``. ``out`` holds ``model.safetensors``,
        ``config.json``, ``metrics.json`` (training) and ``eval_metrics.json``
        (``{"config", "metrics"}``).
    """
    from torchrec_mm.redrec.sasrec import METRICS_FILE, evaluate_sasrec

    model_cfg, red = _sasrec_setup(data, out, options, eval_options)
    pcfg, split = protocol_config(red), red.eval_split
    run_cfg = _canonical({"data": data, "model": dataclasses.asdict(model_cfg),
                          "protocol": dataclasses.asdict(pcfg), "eval_split": split,
                          **_scenarios_entry(red.target_scenarios)})
    done = os.path.join(out, BASELINE_EVAL_FILE)
    if resume and os.path.exists(done) and os.path.exists(os.path.join(out, METRICS_FILE)):
        with open(done) as f:
            old = json.load(f)
        if old.get("config") == run_cfg:
            with open(os.path.join(out, METRICS_FILE)) as f:
                return {"config": run_cfg, "train": json.load(f), "eval": old["metrics"]}
    if only_finished:
        return None
    from torchrec_mm.utils.io import write_json

    os.makedirs(out, exist_ok=True)
    trained = train_sasrec(data, model_cfg, out_dir=out, progress=progress)
    model = trained.pop("model")
    metrics = evaluate_sasrec(model, data, pcfg, target_split=split, progress=progress,
                              target_actions=red.target_actions,
                              scenarios=red.target_scenarios)
    write_json(done, {"config": run_cfg, "metrics": metrics})
    return {"config": run_cfg, "train": trained, "eval": metrics}


def run_popularity(data: str, out: str, eval_options: Optional[Mapping[str, Any]] = None,
                   resume: bool = True, only_finished: bool = False
                   ) -> Optional[Dict[str, Any]]:
    """Evaluates the most-popular baseline (:func:`~torchrec_mm.redrec.popularity.
    evaluate_popularity`) on the protocol of ``eval_options`` (:data:`PROTOCOL_FIELDS`)
    and writes ``out/eval_metrics.json``; a finished run of the same configuration is
    reused, or returned alone with ``only_finished`` (None if there is none).

    Returns:
        ``{"config": {"data", "model", "protocol", "eval_split", "target_actions"},
        "eval": the metrics}``.
    """
    from torchrec_mm.redrec.popularity import evaluate_popularity

    red = _protocol_of(data, out, eval_options, "popularity")
    pcfg = protocol_config(red)
    run_cfg = _canonical({"data": data, "model": "popularity",
                          "protocol": dataclasses.asdict(pcfg), "eval_split": red.eval_split,
                          "target_actions": red.target_actions,
                          **_scenarios_entry(red.target_scenarios)})
    return _evaluated_once(out, run_cfg, resume, only_finished, lambda: evaluate_popularity(
        data, pcfg, red.eval_split, red.target_actions, scenarios=red.target_scenarios))


def _scenarios_entry(scenarios: Optional[Sequence[str]]) -> Dict[str, Any]:
    """A baseline run's ``target_scenarios`` config entry, only when set (so a finished
    run of a protocol without it is still recognised)."""
    return {} if scenarios is None else {"target_scenarios": list(scenarios)}


def _evaluated_once(out: str, run_cfg: Dict[str, Any], resume: bool, only_finished: bool,
                    evaluate: Callable[[], Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """A training-free baseline's ``{"config", "eval"}``: read from
    ``out/eval_metrics.json`` when it holds a run of ``run_cfg`` (and ``resume``), else
    None with ``only_finished``, else ``evaluate()`` written there."""
    from torchrec_mm.utils.io import write_json

    done = os.path.join(out, BASELINE_EVAL_FILE)
    if resume and os.path.exists(done):
        with open(done) as f:
            old = json.load(f)
        if old.get("config") == run_cfg:
            return {"config": run_cfg, "eval": old["metrics"]}
    if only_finished:
        return None
    metrics = evaluate()
    os.makedirs(out, exist_ok=True)
    write_json(done, {"config": run_cfg, "metrics": metrics})
    return {"config": run_cfg, "eval": metrics}


def run_content_mean(cfg: RedRecConfig, resume: bool = True, only_finished: bool = False
                     ) -> Optional[Dict[str, Any]]:
    """Evaluates the mean-of-history content baseline (:func:`~torchrec_mm.redrec.
    content_mean.evaluate_content_mean`) with ``cfg``'s content store, the events
    RED-Rec's user tower reads at evaluation (``policy``, ``quotas``, ``eval_last_n``,
    default ``last_n - window``) and ``cfg``'s protocol; writes
    ``cfg.out/eval_metrics.json``. A finished run of the same configuration is reused,
    or returned alone with ``only_finished`` (None if there is none).

    Returns:
        ``{"config": {"data", "model", "protocol", "eval_split", "target_actions",
        "content_store", "content_field", "mix"}, "eval": the metrics}``.
    """
    from torchrec_mm.redrec.content_mean import evaluate_content_mean

    if not cfg.content_store:
        raise ValueError("content_mean: needs content_store (the frozen item vectors of "
                         "`torchrec-mm content encode`)")
    pcfg = protocol_config(cfg)
    mix_cfg = cfg.mix_config(cfg.resolved_eval_last_n)
    run_cfg = _canonical({"data": cfg.data, "model": "content_mean",
                          "protocol": dataclasses.asdict(pcfg), "eval_split": cfg.eval_split,
                          "target_actions": cfg.target_actions,
                          "content_store": cfg.content_store,
                          "content_field": cfg.content_field,
                          "mix": dataclasses.asdict(mix_cfg),
                          **_scenarios_entry(cfg.target_scenarios)})
    return _evaluated_once(cfg.out, run_cfg, resume, only_finished,
                           lambda: evaluate_content_mean(
                               cfg.data, cfg.content_store, pcfg, cfg.eval_split,
                               cfg.target_actions, mix_cfg, cfg.content_field,
                               scenarios=cfg.target_scenarios))


# --------------------------------------------------------------------------- LM


def truncate_lm(out: str, layers: int, model_path: Optional[str] = None,
                keep: str = "top") -> str:
    """Writes a Hugging Face checkpoint made of ``layers`` transformer layers of
    ``model_path`` (default: the bundled MiniLM) to ``out`` and returns ``out``.

    ``keep="top"`` keeps the last ``layers`` layers, ``"bottom"`` the first; embeddings
    and everything else are kept. A user tower that reads this checkpoint (``model_path
    = out``) costs about ``layers / L`` of the full LM per token, and ``init="scratch"``
    / ``"frozen"`` apply to it as to any checkpoint. Written to a temporary directory
    and renamed; an ``out`` made by the same call is reused.
    """
    from transformers import AutoModel

    from torchrec_mm.content.encoder import _quiet_transformers, default_model_path
    from torchrec_mm.redrec.tower import keep_layers

    if keep not in ("top", "bottom"):
        raise ValueError(f"truncate_lm: keep must be 'top' or 'bottom', got {keep!r}")
    src = model_path or default_model_path()
    marker = {"source": os.path.abspath(src), "layers": int(layers), "keep": keep}
    marker_path = os.path.join(out, LM_MARKER)
    if os.path.exists(marker_path):
        with open(marker_path) as f:
            if json.load(f) == marker:
                return out
    with _quiet_transformers():
        lm = AutoModel.from_pretrained(src, local_files_only=True)
    total = int(lm.config.get_text_config().num_hidden_layers)
    if not 1 <= layers <= total:
        raise ValueError(f"truncate_lm: layers must be in [1, {total}] for {src}, got "
                         f"{layers}")
    keep_layers(lm, int(layers), keep)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with _quiet_transformers():
            lm.save_pretrained(tmp)
        with open(os.path.join(tmp, LM_MARKER), "w") as f:
            json.dump(marker, f)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@register_step("redrec_lm")
def redrec_lm_step(data: str, out: str, options: Dict[str, Any],
                   train_defaults: Dict[str, Any]) -> Dict[str, Any]:
    """Prepare step: :func:`truncate_lm` into ``OUT/prepare/<name>``. Options: ``layers``
    (required), ``keep`` (``top``), ``model_path`` (default: the bundled MiniLM)."""
    opts = dict(options)
    bad = sorted(set(opts) - {"layers", "keep", "model_path"})
    if bad or "layers" not in opts:
        raise ValueError(f"experiment step redrec_lm: options are layers (required), keep, "
                         f"model_path; got {sorted(opts)}")
    truncate_lm(out, int(opts["layers"]), opts.get("model_path"), opts.get("keep", "top"))
    return {"model_path": out}


# --------------------------------------------------------------------------- spec


@dataclasses.dataclass
class RetrievalVariant:
    """One variant of a retrieval spec: ``model`` (``"redrec"`` | ``"sasrec"`` |
    ``"popularity"`` | ``"content_mean"``) and its ``options`` (RedRecConfig overrides /
    SASRecConfig fields / none / :data:`CONTENT_MEAN_OPTIONS`)."""

    name: str
    model: str
    options: Dict[str, Any]


def check_spec(spec: Mapping[str, Any], spec_path: str) -> Dict[str, RetrievalVariant]:
    """Validates the ``seeds``, ``train`` and ``variants`` keys of a retrieval spec: the
    option names of every variant (their values are checked by :func:`variant_configs`).

    Raises:
        ValueError: naming ``spec_path``, the variant and the offending key.
    """
    train = spec.get("train") or {}
    if not isinstance(train, dict):
        raise ValueError(f"{spec_path}: 'train' must be a mapping of RED-Rec options")
    bad = sorted(set(train) - set(_REDREC_FIELDS))
    if bad:
        hint = (" (set by the experiment)" if set(bad) & set(_SET_BY_EXPERIMENT) else "")
        raise ValueError(f"{spec_path}: train: unknown RED-Rec option(s) {bad}{hint}")
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"{spec_path}: 'seeds' must be a non-empty list of integers, got "
                         f"{seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{spec_path}: 'seeds' has duplicates: {seeds}")
    variants = spec.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise ValueError(f"{spec_path}: 'variants' must be a mapping name -> options")
    out: Dict[str, RetrievalVariant] = {}
    for name, raw in variants.items():
        where = f"{spec_path}: variant '{name}'"
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"{where}: a variant name is letters, digits and _.+- "
                             "(it names a directory)")
        if not isinstance(raw, (dict, type(None))):
            raise ValueError(f"{where}: expected a mapping of options, got {raw!r}")
        opts = dict(raw or {})
        model = opts.pop("model", "redrec")
        if model not in MODELS:
            raise ValueError(f"{where}: model must be one of {list(MODELS)}, got {model!r}")
        if model == "redrec":
            bad = sorted(set(opts) - set(_REDREC_FIELDS))
            if bad:
                raise ValueError(f"{where}: unknown RED-Rec option(s) {bad}")
            shared = sorted(set(opts) & set(PROTOCOL_FIELDS))
            if shared:
                raise ValueError(f"{where}: {shared} define the evaluation cases, which "
                                 "every variant shares: set them under 'train'")
        elif model == "popularity":
            if opts:
                raise ValueError(f"{where}: the popularity baseline takes no options, got "
                                 f"{sorted(opts)}")
        elif model == "content_mean":
            bad = sorted(set(opts) - set(CONTENT_MEAN_OPTIONS))
            if bad:
                raise ValueError(f"{where}: unknown content_mean option(s) {bad}; known: "
                                 f"{list(CONTENT_MEAN_OPTIONS)}")
        else:
            bad = sorted(set(opts) - set(_SASREC_FIELDS))
            if bad:
                raise ValueError(f"{where}: unknown SASRec option(s) {bad}; known: "
                                 f"{sorted(_SASREC_FIELDS)}")
        out[name] = RetrievalVariant(name, model, opts)
    return out


def _base_config(spec: Mapping[str, Any], spec_path: str, data: str, out: str
                 ) -> RedRecConfig:
    train = _substitute(copy.deepcopy(spec.get("train") or {}), spec_values(data, out))
    try:
        return RedRecConfig(**{"progress": True, **train, "data": data,
                               "out": os.path.join(out, "runs")})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{spec_path}: train: {e}") from None


def variant_configs(spec: Mapping[str, Any], spec_path: str, data: str, out: str
                    ) -> Dict[str, List[Any]]:
    """Every run of a retrieval spec, validated: ``{variant: [per seed]}``, a
    :class:`RedRecConfig` for RED-Rec and content_mean variants, ``(SASRecConfig
    options, eval options, run dir)`` for SASRec variants (``({}, eval options, run
    dir)`` for popularity). No data is read (``{prepare}`` / ``{data}`` are
    substituted with ``OUT/prepare`` and ``data``)."""
    variants = check_spec(spec, spec_path)
    values = spec_values(data, out)
    base = _base_config(spec, spec_path, data, out)
    train = {k: v for k, v in dataclasses.asdict(base).items() if k not in _SET_BY_EXPERIMENT}
    eval_options = {k: train[k] for k in PROTOCOL_FIELDS}
    result: Dict[str, List[Any]] = {}
    for name, var in variants.items():
        opts = _substitute(copy.deepcopy(var.options), values)
        runs = []
        for seed in spec.get("seeds", [0]):
            run_dir = os.path.join(out, "runs", name, f"seed{seed}")
            try:
                if var.model == "redrec":
                    runs.append(RedRecConfig(**{**train, **opts, "data": data,
                                                "out": run_dir, "seed": int(seed)}))
                elif var.model == "popularity":
                    runs.append(({}, eval_options, run_dir))
                elif var.model == "content_mean":
                    # frozen content vectors whatever item side ``train`` has
                    runs.append(RedRecConfig(**{
                        **train, "item_embedding": "content", "item_states": None,
                        "item_lr": None, "item_init": "pretrained", **opts, "data": data,
                        "out": run_dir, "seed": int(seed)}))
                else:
                    options = {**opts, "seed": int(seed)}
                    SASRecConfig(num_items=1, **options)  # validates the values
                    runs.append((options, eval_options, run_dir))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{spec_path}: variant '{name}': {e}") from None
        result[name] = runs
    return result


# --------------------------------------------------------------------------- report


def plot_metric_panels(values: Mapping[str, Mapping[str, Sequence[float]]],
                       metrics: Sequence[str], ncols: int = 4) -> bytes:
    """One bar panel per metric, a bar per variant (mean, error bar = std over seeds).

    Args:
        values: ``{variant: {metric: [value per seed]}}``.
        metrics: the panels, e.g. ``["HR@10", "HR@50", "NDCG@10", ...]``.

    Returns:
        PNG bytes.
    """
    variants = list(values)
    if not variants or not metrics:
        raise ValueError("plot_metric_panels: nothing to plot")
    ncols = min(ncols, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    width = max(2.6, 0.32 * len(variants) + 1.0)
    fig = _new_figure(width * ncols, 3.0 * nrows)
    colors = [f"C{i % 10}" for i in range(len(variants))]
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        stats = [mean_std(list(values[v].get(metric, []))) for v in variants]
        means = [0.0 if math.isnan(m) else m for m, _, _ in stats]
        errs = [sd if n > 1 else 0.0 for _, sd, n in stats]
        ax.bar(range(len(variants)), means, yerr=errs, capsize=2, color=colors)
        ax.set_xticks(range(len(variants)))
        ax.set_xticklabels(variants, rotation=60, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def retrieval_section(title: str, per_seed: Mapping[str, Sequence[Mapping[str, float]]],
                      text: str = "", note: str = "") -> Section:
    """A report section: the metrics table (mean ± std over seeds) and the HR@K /
    NDCG@K panels of ``{variant: [per-seed metric_values]}``."""
    ks = sorted({int(k.split("@")[1]) for runs in per_seed.values() for r in runs
                 for k in r if k.startswith("HR@")})
    columns = [f"{m}@{k}" for m in ("HR", "NDCG") for k in ks] + ["MRR"]
    table = Table.from_runs("HR@K / NDCG@K / MRR (mean ± std over seeds)",
                            {v: list(runs) for v, runs in per_seed.items()},
                            columns=columns, note=note)
    values = {v: {m: [r[m] for r in runs if m in r] for m in columns}
              for v, runs in per_seed.items()}
    fig = Figure("HR@K and NDCG@K by variant", plot_metric_panels(values, columns[:-1]),
                 caption="bars: mean over seeds; error bars: std over seeds")
    return Section(title=title, text=text, tables=[table], figures=[fig])


def _summary_line(variant: str, summary: Mapping[str, Mapping[str, Any]]) -> str:
    def cell(name: str) -> str:
        s = summary.get(name)
        if not s:
            return f"{name} —"
        sd = f"±{s['std']:.4f}" if len(s["values"]) > 1 else ""
        return f"{name} {s['mean']:.4f}{sd}"

    ks = sorted({int(k.split("@")[1]) for k in summary if k.startswith("HR@")})
    names = ([f"HR@{k}" for k in ks] + [f"NDCG@{ks[0]}"]) if ks else []
    return f"{variant:>16}: " + "  ".join(cell(n) for n in names + ["MRR"])


def _cases_digest(data: str, pcfg: ProtocolConfig, split: str,
                  target_actions: Optional[List[str]] = None,
                  scenarios: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Number and sha1 of the protocol's evaluation cases (users, cutoffs, targets,
    pool): identical for every variant by construction, recorded for the reader."""
    from torchrec_mm.data.io import load_meta
    from torchrec_mm.redrec.protocol import make_eval_cases
    from torchrec_mm.redrec.sequences import EventLog
    from torchrec_mm.redrec.train import eval_target_rows

    log = EventLog.from_dataset(data)
    rows = eval_target_rows(log, data, split, target_actions, scenarios=scenarios)
    cases = make_eval_cases(log.user_offsets, log.item, log.timestamp,
                            load_meta(data).num_items, pcfg, target_rows=rows)
    h = hashlib.sha1()
    for t in (cases.users, cases.cutoff_time, cases.targets, cases.pool):
        h.update(np.ascontiguousarray(t.numpy()).tobytes())
    return {"num_cases": len(cases), "pool_size": int(cases.pool.shape[0]),
            "sha1": h.hexdigest()}


# --------------------------------------------------------------------------- runner


def run_retrieval_experiment(spec: Dict[str, Any], spec_path: str, data: str, out: str,
                             only: Optional[List[str]] = None) -> Dict[str, Any]:
    """Runs the prepare steps, then every variant for every seed (skipping finished
    runs); writes ``OUT/metrics.json`` and ``OUT/report.html``; returns the metrics."""
    from tqdm import tqdm

    from torchrec_mm.report import write_report

    configs = variant_configs(spec, spec_path, data, out)  # all errors before any work
    variants = check_spec(spec, spec_path)
    if only:
        unknown = sorted(set(only) - set(variants))
        if unknown:
            raise ValueError(f"--variants: unknown variant(s) {unknown}; {spec_path} has "
                             f"{list(variants)}")
    selected = [v for v in variants if not only or v in only]
    base = _base_config(spec, spec_path, data, out)
    pcfg, split = protocol_config(base), base.eval_split
    os.makedirs(out, exist_ok=True)
    prepared, timings = run_prepare_steps(spec, data, out)

    results: Dict[str, Any] = {}
    curves: Dict[str, List[Dict[str, Any]]] = {}
    total = sum(len(configs[v]) for v in selected)
    bar = tqdm(total=total, desc="retrieval runs", unit="run", dynamic_ncols=True)
    seeds = spec.get("seeds", [0])
    for name in variants:
        # --variants: the others are reported when all their seeds have finished runs
        run_it = name in selected
        var = variants[name]
        per_seed: List[Dict[str, float]] = []
        info: List[Dict[str, Any]] = []
        for seed, run in zip(seeds, configs[name]):
            if run_it:
                bar.set_postfix_str(f"{name} seed {seed}")
            t = time.time()
            if var.model == "redrec":
                r = run_redrec(run, only_finished=not run_it)
                if r is None:
                    break
                ev = r["eval"]
                info.append({"steps": r["steps"], "train_seconds": r["train_seconds"],
                             "last_loss": r["curve"][-1]["loss"] if r["curve"] else None})
                if not per_seed:
                    curves[name] = [{"step": c["step"], "loss": c["loss"]}
                                    for c in r["curve"]]
            elif var.model in ("popularity", "content_mean"):
                if var.model == "popularity":
                    _, eval_options, run_dir = run
                    r = run_popularity(data, run_dir, eval_options, only_finished=not run_it)
                else:
                    r = run_content_mean(run, only_finished=not run_it)
                if r is None:
                    break
                ev = r["eval"]
                info.append({"train_seconds": ev["seconds"], "last_loss": None})
            else:
                options, eval_options, run_dir = run
                r = run_sasrec(data, run_dir, options, eval_options, progress=True,
                               only_finished=not run_it)
                if r is None:
                    break
                ev = r["eval"]
                info.append({"train_seconds": r["train"]["seconds"],
                             "last_loss": r["train"]["loss"][-1] if r["train"]["loss"]
                             else None})
            timings[f"{name}/seed{seed}"] = time.time() - t
            per_seed.append(metric_values(ev))
            info[-1].update({"num_users": ev.get("num_users"),
                             "pool_size": ev.get("pool_size")})
            bar.update(int(run_it))
        if len(per_seed) < len(seeds):
            curves.pop(name, None)
            continue
        results[name] = {"model": var.model, "per_seed": per_seed,
                         "summary": _summarise(per_seed), "runs": info}
        bar.write(_summary_line(name, results[name]["summary"]))
    bar.close()
    counts = {r["num_users"] for res in results.values() for r in res["runs"]}
    if len(counts) > 1:  # cannot happen unless the protocol mapping diverged
        raise RuntimeError(f"variants were evaluated on different numbers of cases: {counts}")

    protocol = {**dataclasses.asdict(pcfg), "split": split,
                **_cases_digest(data, pcfg, split, base.target_actions, base.target_scenarios)}
    metrics = {"name": spec.get("name", os.path.basename(spec_path)), "task": "retrieval",
               "data": data, "seeds": spec.get("seeds", [0]), "protocol": protocol,
               "variants": results, "prepare": prepared, "timings_s": timings}
    description = str(spec.get("description", "")).strip()
    section = retrieval_section(
        "Ablation", {v: res["per_seed"] for v, res in results.items()}, text=description,
        note=(f"{protocol['num_cases']} evaluation cases ({split} targets, "
              f"{pcfg.num_targets} per case), pool {protocol['pool_size']} items, shared by "
              "every variant and seed"))
    write_report(out, metrics, curves=curves or None,
                 title=f"retrieval experiment: {metrics['name']}",
                 config={"spec": spec_path, "data": data, "seeds": metrics["seeds"],
                         "train": spec.get("train") or {}},
                 sections=[section])
    print(f"report: {os.path.join(out, 'report.html')}")
    return metrics
