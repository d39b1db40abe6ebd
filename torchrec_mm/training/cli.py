"""``torchrec-mm train`` and ``torchrec-mm evaluate``."""

import argparse
import dataclasses
import json
import os
from typing import Any, Dict

from torchrec_mm.models.rankers import RANKER_KINDS
from torchrec_mm.models.target_attention import ATTENTION_WEIGHTS
from torchrec_mm.training.sharding import SHARDING_TYPES


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset directory (with split.json)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics)")
    p.add_argument("--config", help="YAML TrainConfig; flags given here override it")
    p.add_argument("--ranker", choices=RANKER_KINDS, help="ranker kind")
    p.add_argument("--embedding-dim", type=int)
    p.add_argument("--tasks", help="extra tasks besides the click, comma-separated action "
                   "names of the dataset (e.g. is_like): a multi-task MMoE head")
    p.add_argument("--plugins", help="plugin spec (YAML) applied to the ranker")
    p.add_argument("--world-size", type=int, help="ranks to spawn (ignored under torchrun)")
    p.add_argument("--sharding-type", choices=SHARDING_TYPES,
                   help="sharding of every table (default: planner's choice)")
    p.add_argument("--batch-size", type=int, help="per-rank batch size")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--history-length", type=int)
    p.add_argument("--dense-lr", type=float)
    p.add_argument("--embedding-lr", type=float)
    p.add_argument("--embedding-optimizer", choices=["sgd", "adagrad", "adam"])
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    p.add_argument("--num-workers", type=int, help="DataLoader workers per rank")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-resume", action="store_true",
                   help="start from scratch even if OUT has a checkpoint")
    p.add_argument("--no-eval", action="store_true", help="skip evaluation")
    p.add_argument("--pipeline", action="store_true",
                   help="train through TrainPipelineSparseDist (overlaps input dist)")


def config_from_args(args: argparse.Namespace):
    """A TrainConfig from ``--config`` (if any) overridden by explicit flags."""
    from torchrec_mm.models.rankers import RankerConfig
    from torchrec_mm.training.trainer import TrainConfig, load_train_config

    flags: Dict[str, Any] = {
        "data": args.data, "out": args.out, "plugins": args.plugins,
        "world_size": args.world_size, "sharding_type": args.sharding_type,
        "batch_size": args.batch_size, "epochs": args.epochs, "max_steps": args.max_steps,
        "history_length": args.history_length, "dense_lr": args.dense_lr,
        "embedding_lr": args.embedding_lr, "embedding_optimizer": args.embedding_optimizer,
        "checkpoint_every": args.checkpoint_every, "num_workers": args.num_workers,
        "seed": args.seed,
    }
    if args.no_resume:
        flags["resume"] = False
    if args.no_eval:
        flags["evaluate"] = False
    if args.pipeline:
        flags["pipeline"] = True
    if args.config:
        cfg = load_train_config(args.config, **flags)
    else:
        cfg = TrainConfig(**{k: v for k, v in flags.items() if v is not None})
    ranker = dataclasses.asdict(cfg.ranker)
    if args.ranker:
        ranker["kind"] = args.ranker
    if args.embedding_dim:
        ranker["embedding_dim"] = args.embedding_dim
    if args.tasks:
        ranker["tasks"] = [t for t in args.tasks.split(",") if t]
    cfg.ranker = RankerConfig.from_dict(ranker)
    return cfg


def _run_train(args: argparse.Namespace) -> int:
    from torchrec_mm.training.trainer import train

    cfg = config_from_args(args)
    result = train(cfg)
    summary = {"steps": result["steps"], "train_seconds": round(result["train_seconds"], 1)}
    for split, m in (result.get("eval") or {}).items():
        summary[split] = {k: round(v, 4) for k, v in m.items() if k in ("auc", "gauc", "uauc")}
    print(json.dumps(summary, indent=2))
    print(f"metrics: {os.path.join(cfg.out, 'train_metrics.json')}")
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from torchrec_mm.training.evaluate import evaluate_run

    metrics = evaluate_run(args.run, data=args.data, batch_size=args.batch_size,
                           out=args.out, attention=args.attention)
    print(json.dumps({k: {m: round(v, 4) for m, v in d.items()
                          if m in ("auc", "gauc", "uauc", "count")}
                      for k, d in metrics["slices"].items()}, indent=2))
    if "attention" in metrics:
        a = metrics["attention"]
        print(f"target attention ({a['weights']} weights in the scores): learned weights' "
              f"normalised entropy {a['normalized_entropy']:.3f} (1 = uniform), effective "
              f"fraction of the history {a['effective_fraction']:.3f}, "
              f"{int(a['samples'])} samples")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train", help="train a ranker (single or multi-process, sharded by DMP)",
        description="Train a TorchRec ranker (DLRM, DLRM_DCN or the target-attention "
        "ranker), optionally with plugins, on 1..N ranks under DistributedModelParallel "
        "with a plan from EmbeddingShardingPlanner. Resumes from OUT/checkpoints.")
    _add_train_flags(p)
    p.set_defaults(func=_run_train)

    e = subparsers.add_parser(
        "evaluate", help="evaluate a trained run (AUC/UAUC/GAUC by slice)",
        description="Load the latest checkpoint of a run and compute AUC, UAUC and GAUC "
        "overall, on warm and cold items and by popularity group L1..L6.")
    e.add_argument("--run", required=True, help="run directory written by `train`")
    e.add_argument("--data", help="dataset (default: the one the run was trained on)")
    e.add_argument("--batch-size", type=int, default=4096)
    e.add_argument("--out", help="where to write eval_metrics.json (default: RUN)")
    e.add_argument("--attention", choices=ATTENTION_WEIGHTS, default="learned",
                   help="target-attention ranker: score with the learned attention weights "
                   "or with mean pooling over the history instead ('uniform': what the "
                   "learned weights contribute; written to "
                   "eval_metrics_uniform_attention.json)")
    e.set_defaults(func=_run_evaluate)
