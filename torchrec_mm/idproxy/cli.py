"""``torchrec-mm idproxy fit``: IDProxy stage 1 (coarse proxies)."""

import argparse
import json
import os
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("idproxy", help="IDProxy: content proxies of item-ID embeddings")
    sub = p.add_subparsers(dest="idproxy_command", required=True)
    f = sub.add_parser(
        "fit", help="stage 1: align content proxies to a trained ranker's item-ID embeddings",
        description="Trains the content encoder (top layers + attention pooling) and an MLP "
                    "head with the Proxy Alignment Loss (in-batch InfoNCE) against the ranker's "
                    "l2-normalised item-ID embeddings, then writes p_coarse and the layer-group "
                    "states of every item to OUT (proxies.safetensors, proxies.json, "
                    "fit_metrics.json). Resumes from OUT/fit_state.")
    f.add_argument("--data", required=True, help="dataset directory (with split.json)")
    f.add_argument("--run", default=None,
                   help="`torchrec-mm train` run directory (item table from its checkpoint)")
    f.add_argument("--out", required=True, help="output directory")
    f.add_argument("--model", default=None, help="local HF checkpoint (default: MiniLM)")
    f.add_argument("--trainable-layers", type=int, default=2,
                   help="top encoder layers trained (0: pooling+head only, -1: all)")
    f.add_argument("--epochs", type=int, default=3)
    f.add_argument("--batch-size", type=int, default=64)
    f.add_argument("--tau", type=int, default=5, help="min training impressions of a target")
    f.add_argument("--temperature", type=float, default=0.07)
    f.add_argument("--lr-encoder", type=float, default=1e-4)
    f.add_argument("--lr-head", type=float, default=1e-3)
    f.add_argument("--hidden", type=int, default=512, help="hidden width of the MLP head")
    f.add_argument("--max-length", type=int, default=128, help="max prompt tokens")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--table-file", default=None,
                   help="safetensors file holding the item-ID table (instead of --run)")
    f.add_argument("--table-key", default=None, help="tensor name in --table-file")
    f.add_argument("--last-epoch", action="store_true",
                   help="proxies from the last epoch (default: the epoch with the best "
                        "held-out recall)")
    f.add_argument("--no-progress", action="store_true", help="no progress bars")
    f.set_defaults(func=_fit)


def _fit(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from torchrec_mm.idproxy.coarse import CoarseFitConfig, fit_coarse, format_metrics

    if args.run is None and args.table_file is None:
        raise SystemExit("idproxy fit: give --run RUN or --table-file FILE")
    if args.table_key is not None and args.table_file is None:
        raise SystemExit("idproxy fit: --table-key needs --table-file")
    config = CoarseFitConfig(
        model_path=args.model, trainable_layers=args.trainable_layers, hidden=args.hidden,
        temperature=args.temperature, lr_encoder=args.lr_encoder, lr_head=args.lr_head,
        batch_size=args.batch_size, epochs=args.epochs, max_length=args.max_length,
        seed=args.seed, tau=args.tau, select_best=not args.last_epoch)
    metrics = fit_coarse(args.data, args.run, args.out, config, progress=not args.no_progress,
                         table_file=args.table_file, table_key=args.table_key)
    print(format_metrics(metrics))
    print(f"proxies of {metrics['num_items']} items written to {args.out} "
          f"({metrics['num_without_content']} without content); metrics in "
          f"{os.path.join(args.out, 'fit_metrics.json')}")
    print(json.dumps({"final": metrics["final"], "baseline": metrics["baseline"]}))
    return 0
