"""``torchrec-mm redrec train``, ``evaluate``, ``sasrec`` and ``embed-users`` (user-tower
snapshots for the ``redrec_user`` ranker feature, :mod:`torchrec_mm.redrec.user_features`).

::

    torchrec-mm redrec train --data out/synth --out runs/redrec --epochs 2 \\
        --batch-size 32 [--config redrec.yaml] \\
        [--item-embedding content --content-store out/content]   # item LM frozen
    torchrec-mm redrec item-states --data out/synth --out out/item-states --layers 1
    torchrec-mm redrec train --data out/synth --out runs/redrec-joint \\
        --item-embedding content --item-states out/item-states     # item LM trained
    torchrec-mm redrec evaluate --run runs/redrec [--index HNSW32] [--split test_warm]
    torchrec-mm redrec embed-items --run runs/redrec --out out/redrec/items --index HNSW32
    torchrec-mm redrec sasrec --data out/synth --out runs/sasrec --epochs 20 \\
        [--max-len 118] [--max-users 1000]

``item-states`` stores the item tower's frozen part (every item's prompt through the
content encoder's bottom layers) for ``train --item-states``, whose top ``--layers``
layers then train jointly with the user tower (:mod:`torchrec_mm.redrec.item_tower`).
``train`` flags override the YAML :class:`~torchrec_mm.redrec.train.RedRecConfig`
given by ``--config``; it resumes from ``OUT``'s latest checkpoint unless
``--no-resume``. ``evaluate`` re-evaluates the latest checkpoint of a run directory
(evaluation options may differ from the training run) and writes
``RUN/eval_metrics.json``. ``sasrec`` trains the ID-only SASRec baseline on the train
split and evaluates it on the RED-Rec protocol: its evaluation flags have ``train``'s
names and defaults, so the same values give the same cases (users, cutoffs, targets,
pool) as a RED-Rec run; it writes ``OUT/model.safetensors``, ``config.json``,
``metrics.json`` (training) and ``eval_metrics.json``, and reuses a finished run of the
same settings unless ``--no-resume``.
"""

import argparse
import json
from typing import Any, Callable, Dict

from torchrec_mm.redrec.losses import ITEM_BIASES
from torchrec_mm.redrec.sequences import POLICIES
from torchrec_mm.redrec.item_tower import ITEM_INITS
from torchrec_mm.redrec.tower import (
    EVENT_MEANS,
    INITS,
    ITEM_EMBEDDINGS,
    LM_POSITIONS,
    TABLE_INITS,
)
from torchrec_mm.training.sharding import SHARDING_TYPES

_KS_HELP = "comma-separated cutoffs K of HR/NDCG/MRR@K, e.g. 10,50,100,1000"


def _ks(text: str) -> tuple:
    try:
        ks = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ks: expected integers like 10,50, got {text!r}")
    if not ks:
        raise argparse.ArgumentTypeError("--ks: no cutoff given")
    return ks


def _name_list(flag: str, example: str) -> Callable[[str], list]:
    """An argparse type: comma-separated names, at least one (errors name ``flag``)."""
    def parse(text: str) -> list:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if not names:
            raise argparse.ArgumentTypeError(f"{flag}: expected names like {example}")
        return names
    return parse


_names = _name_list("--target-actions", "is_click")
_scenario_names = _name_list("--target-scenarios", "ads")


_TARGET_ACTIONS_HELP = ("comma-separated actions that make an event a positive (e.g. "
                        "is_click for an impression log): only those events are training "
                        "and evaluation targets; default every event")


def _add_eval_flags(p: argparse.ArgumentParser, protocol_only: bool = False) -> None:
    """Evaluation flags; ``protocol_only``: only those defining the cases (SASRec's
    evaluation scores exactly)."""
    p.add_argument("--split", dest="eval_split", choices=["test", "test_warm", "test_cold"],
                   help="events that may be evaluation targets (default test)")
    if not protocol_only:
        p.add_argument("--index", dest="eval_index", help="'exact' or a faiss "
                       "index_factory string (Flat, HNSW32, IVF64,Flat)")
        p.add_argument("--nprobe", dest="eval_nprobe", type=int, help="IVF probes")
    p.add_argument("--pool-size", dest="eval_pool_size", type=int,
                   help="random catalogue items in the candidate pool (default 1e6, clamped)")
    p.add_argument("--max-users", dest="eval_max_users", type=int,
                   help="evaluate at most this many users (default 10000)")
    p.add_argument("--num-targets", dest="eval_num_targets", type=int,
                   help="targets per user (default 3)")
    p.add_argument("--ks", dest="eval_ks", type=_ks, help=_KS_HELP)
    p.add_argument("--eval-seed", type=int)
    p.add_argument("--target-scenarios", type=_scenario_names,
                   help="positives only from these scenarios, comma-separated (e.g. ads: "
                   "the paper's '(for Advertisements)' tables): window targets in training, "
                   "targets in evaluation; histories keep every scenario")
    if not protocol_only:
        p.add_argument("--eval-batch-size", type=int, help="users per tower call")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="dataset directory (with split.json)")
    p.add_argument("--out", help="run directory (checkpoints, metrics)")
    p.add_argument("--config", help="YAML RedRecConfig; flags given here override it")
    p.add_argument("--model-path", help="local Hugging Face checkpoint of the user LM "
                   "(default: the bundled MiniLM)")
    p.add_argument("--init", choices=INITS)
    p.add_argument("--item-embedding", choices=ITEM_EMBEDDINGS)
    p.add_argument("--content-store", help="content store: frozen item vectors "
                   "(item_embedding=content)")
    p.add_argument("--item-states", help="directory of `redrec item-states`: the item "
                   "tower trained jointly (item_embedding=content)")
    p.add_argument("--lm-lr", type=float, help="learning rate of the user LM's layers "
                   "(default: --dense-lr)")
    p.add_argument("--lm-anchor", type=float, help="L2-SP weight pulling the user LM's "
                   "layers toward their pretrained weights (default 0: none)")
    p.add_argument("--item-lr", type=float, help="learning rate of the item tower's "
                   "layers (default: --dense-lr)")
    p.add_argument("--item-dropout", type=float, help="dropout of the item tower's layers "
                   "(default 0.0)")
    p.add_argument("--item-init", choices=ITEM_INITS, help="how the item tower's trained "
                   "layers start (scratch: random init)")
    p.add_argument("--lm-positions", choices=LM_POSITIONS, help="lm: the user LM adds its "
                   "own positions; none: order only through PE_seq / PE_gap")
    p.add_argument("--event-mean", choices=EVENT_MEANS, help="where the user's mean event "
                   "vector enters the tower besides the LM's attention: output (a path "
                   "around the LM) or queries (the query tokens start from it)")
    p.add_argument("--table-init", choices=TABLE_INITS, help="how the tower's embedding "
                   "tables start: torchrec (default: uniform +-1/sqrt(rows)) or lm (normal "
                   "with the LM's initializer_range as std, 0.02 for MiniLM)")
    p.add_argument("--item-bias", choices=ITEM_BIASES, help="a learned per-item logit "
                   "offset added to cos/tau in training and evaluation: none (default), zero "
                   "(starts at 0) or log_count (starts at the log train-split count)")
    p.add_argument("--item-bias-lr", type=float, help="Adam learning rate of the item bias "
                   "(default 0.01)")
    p.add_argument("--content-field", choices=["emb_token", "pooled"])
    p.add_argument("--center-items", action="store_true", default=None,
                   help="subtract the catalogue mean from the frozen item vectors "
                        "(--content-store) before the tower's projection")
    p.add_argument("--embedding-dim", type=int)
    p.add_argument("--interests-per-scenario", type=int)
    p.add_argument("--policy", choices=POLICIES, help="sequence mixing policy")
    p.add_argument("--last-n", type=int)
    p.add_argument("--window", type=int, help="W, the look-ahead window")
    p.add_argument("--target-actions", type=_names, help=_TARGET_ACTIONS_HELP)
    p.add_argument("--cutoffs-per-user", type=int)
    p.add_argument("--cutoffs", choices=["events", "targets"],
                   help="where training cutoffs fall: events (anywhere, the window is the "
                        "next W events) or targets (at an eligible event, the window is "
                        "the next W eligible ones: for sparse positives)")
    p.add_argument("--loss", choices=["multi_interest", "single_interest"])
    p.add_argument("--nce-weight", type=float, help="weight of the next-item NCE term")
    p.add_argument("--num-negatives", type=int)
    p.add_argument("--negatives", choices=["seen", "uniform", "popularity"],
                   help="sampled negatives: seen (default: uniform over the train split's "
                   "items), uniform (every catalogue id, held-out cold items too) or "
                   "popularity (count^alpha)")
    p.add_argument("--negative-alpha", type=float)
    p.add_argument("--in-batch", action="store_true", default=None,
                   help="also use other users' window items as negatives")
    p.add_argument("--batch-size", type=int, help="users per rank and step")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--dense-lr", type=float)
    p.add_argument("--embedding-lr", type=float)
    p.add_argument("--embedding-optimizer", choices=["sgd", "adagrad"])
    p.add_argument("--world-size", type=int, help="ranks to spawn (ignored under torchrun)")
    p.add_argument("--sharding-type", choices=SHARDING_TYPES)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--no-resume", action="store_true",
                   help="start from scratch even if OUT has a checkpoint")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    _add_eval_flags(p)


_NOT_OPTIONS = {"command", "redrec_command", "func", "config", "no_resume", "no_eval",
                "no_progress", "verbose", "run"}

# `redrec sasrec`: SASRecConfig flags (dest = field name); protocol flags = train's
_SASREC_FLAGS = ("dim", "num_layers", "num_heads", "max_len", "dropout", "lr",
                 "weight_decay", "epochs", "batch_size", "negatives", "tau_init", "seed")
_PROTOCOL_FLAGS = ("eval_split", "eval_num_targets", "eval_pool_size", "eval_ks",
                   "eval_max_users", "eval_seed", "min_history", "target_actions",
                   "target_scenarios")


def _options(args: argparse.Namespace) -> Dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in _NOT_OPTIONS and v is not None}


def config_from_args(args: argparse.Namespace):
    """A :class:`RedRecConfig` from ``--config`` overridden by the given flags."""
    from torchrec_mm.redrec.train import load_redrec_config

    flags = _options(args)
    if args.no_resume:
        flags["resume"] = False
    if args.no_eval:
        flags["evaluate"] = False
    if args.no_progress:
        flags["progress"] = False
    return load_redrec_config(args.config, **flags)


def _summary(metrics: Dict[str, Any]) -> Dict[str, Any]:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()
            if k.startswith(("HR@", "NDCG@", "MRR")) or k in ("num_users", "pool_size")}


def _run_train(args: argparse.Namespace) -> int:
    from torchrec_mm.redrec.train import train_redrec

    cfg = config_from_args(args)
    result = train_redrec(cfg)
    out: Dict[str, Any] = {"steps": result["steps"],
                           "train_seconds": round(result["train_seconds"], 1)}
    if result["curve"]:
        out["last_loss"] = round(result["curve"][-1]["loss"], 4)
    if result.get("eval"):
        out["eval"] = _summary(result["eval"])
    print(json.dumps(out, indent=1))
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from torchrec_mm.redrec.train import evaluate_run

    overrides = _options(args)
    if args.no_progress:
        overrides["progress"] = False
    result = evaluate_run(args.run, **overrides)
    print(json.dumps({"step": result["step"], **_summary(result["metrics"])}, indent=1))
    return 0


def _add_sasrec_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset directory (with split.json)")
    p.add_argument("--out", required=True, help="run directory (model, metrics)")
    p.add_argument("--config", help="YAML of SASRecConfig fields and evaluation options "
                   "(eval_split, eval_max_users, ...); flags given here override it")
    p.add_argument("--dim", type=int, help="item / hidden width d (default 64)")
    p.add_argument("--num-layers", type=int, help="causal transformer blocks (default 2)")
    p.add_argument("--num-heads", type=int, help="attention heads (default 2)")
    p.add_argument("--max-len", type=int, help="longest history L (default 50)")
    p.add_argument("--dropout", type=float)
    p.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--epochs", type=int, help="passes over the training segments (default 10)")
    p.add_argument("--batch-size", type=int, help="segments per step (default 64; the "
                   "in-batch softmax grows with (batch x max-len)^2: on CPU 16 is far "
                   "faster per epoch)")
    p.add_argument("--negatives", type=int, help="sampled negatives per step (default 256)")
    p.add_argument("--tau-init", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--min-history", type=int, help="events required before the cutoff "
                   "(default 1, as redrec train)")
    p.add_argument("--target-actions", type=_names, help=_TARGET_ACTIONS_HELP)
    p.add_argument("--no-resume", action="store_true",
                   help="train again even if OUT holds a finished run of these settings")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    _add_eval_flags(p, protocol_only=True)


def _run_sasrec(args: argparse.Namespace) -> int:
    import yaml

    from torchrec_mm.redrec.experiment import run_sasrec

    raw: Dict[str, Any] = {}
    if args.config:
        with open(args.config) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{args.config}: expected a mapping of SASRec options")
        unknown = sorted(set(raw) - set(_SASREC_FLAGS) - set(_PROTOCOL_FLAGS))
        if unknown:
            raise ValueError(f"{args.config}: unknown SASRec option(s) {unknown}")
    raw.update(_options(args))
    result = run_sasrec(args.data, args.out,
                        {k: v for k, v in raw.items() if k in _SASREC_FLAGS},
                        {k: v for k, v in raw.items() if k in _PROTOCOL_FLAGS},
                        progress=not args.no_progress, resume=not args.no_resume)
    train = result["train"]
    print(json.dumps({"epochs": len(train["loss"]),
                      "train_seconds": round(train["seconds"], 1),
                      "last_loss": round(train["loss"][-1], 4) if train["loss"] else None,
                      "eval": _summary(result["eval"])}, indent=1))
    return 0


def _run_item_states(args: argparse.Namespace) -> int:
    from torchrec_mm.content.encoder import ContentEncoderConfig
    from torchrec_mm.redrec.item_tower import build_item_states

    enc = {"model_path": args.model, "max_length": args.max_length,
           "prompt_template": args.prompt}
    cfg = ContentEncoderConfig(**{k: v for k, v in enc.items() if v is not None})
    m = build_item_states(args.data, args.out, args.layers, cfg, batch_size=args.batch_size,
                          progress=not args.no_progress, use_images=not args.no_images)
    print(json.dumps({k: m[k] for k in ("num_items", "num_tokens", "layers", "total_layers",
                                        "hidden_size", "use_images", "parity_max_abs_err")},
                     indent=1))
    return 0


def _run_embed_items(args: argparse.Namespace) -> int:
    from torchrec_mm.redrec.item_cache import embed_items

    m = embed_items(args.run, args.out, args.index, args.batch_size,
                    progress=not args.no_progress)
    print(json.dumps({k: m[k] for k in ("num_items", "dim", "item_side", "checkpoint",
                                        "index")}, indent=1))
    return 0


def register(subparsers: Any) -> None:
    """Adds ``redrec`` with the subcommands ``train``, ``evaluate``, ``sasrec``,
    ``item-states``, ``embed-items`` and ``embed-users``."""
    p = subparsers.add_parser("redrec", help="RED-Rec user tower: train and evaluate; the "
                              "SASRec baseline",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="redrec_command", metavar="SUBCOMMAND")
    sub.required = True
    t = sub.add_parser("train", help="train the RED-Rec user tower (resumable)")
    _add_train_flags(t)
    t.set_defaults(func=_run_train)
    e = sub.add_parser("evaluate", help="evaluate a run's latest checkpoint")
    e.add_argument("--run", required=True, help="run directory of `redrec train`")
    e.add_argument("--data", help="dataset directory (default: the run's)")
    e.add_argument("--world-size", type=int)
    e.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    _add_eval_flags(e)
    e.set_defaults(func=_run_evaluate)
    b = sub.add_parser("sasrec", help="train + evaluate the ID-only SASRec baseline on the "
                       "RED-Rec protocol")
    _add_sasrec_flags(b)
    b.set_defaults(func=_run_sasrec)
    s = sub.add_parser("item-states", help="store the item tower's frozen bottom layers' "
                       "output for every item (train --item-states trains the top ones)")
    s.add_argument("--data", required=True, help="dataset directory (items.parquet)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--layers", type=int, default=1, help="top item-LM layers that train "
                   "(default 1)")
    s.add_argument("--model", help="local Hugging Face checkpoint of the item LM "
                   "(default: the bundled MiniLM)")
    s.add_argument("--prompt", help="prompt template with {text} and [EMB] (default: the "
                   "content encoder's)")
    s.add_argument("--max-length", type=int, help="prompt tokens at most (default 256)")
    s.add_argument("--batch-size", type=int, default=64, help="items per forward")
    s.add_argument("--no-images", action="store_true", help="ignore image_path (a "
                   "vision-language item LM reads each item's image by default)")
    s.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    s.set_defaults(func=_run_item_states)
    i = sub.add_parser("embed-items", help="the item tower's vectors of the whole catalogue "
                       "for serving (with the faiss index factory to load them with)")
    i.add_argument("--run", required=True, help="run directory of `redrec train`")
    i.add_argument("--out", required=True, help="output directory")
    i.add_argument("--index", default="Flat", help="faiss index_factory string (Flat: "
                   "exact; HNSW32, IVF1024,Flat, ...)")
    i.add_argument("--batch-size", type=int, default=1024, help="items per item-tower call")
    i.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    i.set_defaults(func=_run_embed_items)
    from torchrec_mm.redrec.user_features import add_embed_users_parser

    add_embed_users_parser(sub)
