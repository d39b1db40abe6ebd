"""``torchrec-mm qarm {align,codes}``: QARM item alignment and quantitative codes."""

import argparse
import json
import os
from typing import Any

from torchrec_mm.qarm import codes_cli


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("qarm", help="QARM: aligned content -> VQ/RQ code features")
    sub = p.add_subparsers(dest="qarm_command", required=True)
    a = sub.add_parser(
        "align", help="fine-tune the content encoder on item2item pairs",
        description="Mines item2item pairs from the train split (the user's most similar "
                    "earlier positive in a ranker run's item-ID space, and Swing "
                    "neighbours), fine-tunes the content encoder (top layers + pooling) and "
                    "an MLP head with a symmetric in-batch InfoNCE on them, and writes the "
                    "aligned representation of every item to OUT/aligned.safetensors "
                    "(reps, has_rep) with OUT/align_metrics.json (pair recall@K before and "
                    "after). Resumes from OUT/fit_state.")
    a.add_argument("--data", required=True, help="dataset directory (with split.json)")
    a.add_argument("--run", default=None, help="ranker run whose item-ID table gives the "
                   "'history' pairs (without it: Swing pairs only)")
    a.add_argument("--out", required=True, help="output directory")
    a.add_argument("--model", default=None, help="local HF checkpoint (default: MiniLM)")
    a.add_argument("--sources", default="history,swing", help="pair sources, in priority order")
    a.add_argument("--trainable-layers", type=int, default=1,
                   help="top encoder layers trained (0: frozen encoder, head only)")
    a.add_argument("--dim", type=int, default=64, help="aligned representation dim")
    a.add_argument("--epochs", type=int, default=2)
    a.add_argument("--batch-size", type=int, default=64)
    a.add_argument("--max-pairs", type=int, default=20_000, help="pairs per epoch (0: all)")
    a.add_argument("--max-length", type=int, default=64)
    a.add_argument("--temperature", type=float, default=0.07)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--no-progress", action="store_true", help="no progress bars")
    a.set_defaults(func=_align)
    codes_cli.register(sub)


def _align(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from torchrec_mm.qarm.align import AlignConfig, METRICS_FILE, REPS_FILE

    config = AlignConfig(model_path=args.model, trainable_layers=args.trainable_layers,
                         dim=args.dim, epochs=args.epochs, batch_size=args.batch_size,
                         max_pairs=args.max_pairs, max_length=args.max_length,
                         temperature=args.temperature, seed=args.seed,
                         sources=tuple(s for s in args.sources.split(",") if s))
    metrics = run_align(args.data, args.out, config, args.run, progress=not args.no_progress)
    for e in metrics["epochs"]:
        loss = f"loss {e['loss']:.4f}  " if "loss" in e else "(pre-trained content)  "
        print(f"epoch {e['epoch']}: {loss}" + "  ".join(
            f"{k} {v:.3f}" for k, v in e.items() if k.startswith(("recall@", "chance@"))))
    print(f"aligned representations of {metrics['num_items']} items: "
          f"{os.path.join(args.out, REPS_FILE)}; metrics: {os.path.join(args.out, METRICS_FILE)}")
    print(json.dumps({"before": metrics["before"], "after": metrics["after"],
                      "num_pairs": metrics["num_pairs"]}))
    return 0


def run_align(data: str, out: str, config: Any, run: Any = None, progress: bool = True
              ) -> dict:
    """:func:`~torchrec_mm.qarm.align.align_items` with the item-ID table of ``run``
    (for the ``history`` pair source)."""
    from torchrec_mm.qarm.align import align_items

    item_emb = None
    if run is not None and "history" in config.sources:
        from torchrec_mm.idproxy.targets import load_item_table

        _, table = load_item_table(run)
        item_emb = table.numpy()
    return align_items(data, out, config, item_emb=item_emb, progress=progress)
