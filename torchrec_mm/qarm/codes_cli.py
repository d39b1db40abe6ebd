"""``torchrec-mm qarm codes``: VQ and RQ codes of aligned item representations.

``register(subparsers)`` adds the ``codes`` command to the ``qarm`` command's
subparsers (the lead mounts it); see :mod:`torchrec_mm.qarm.codes`.
"""

import argparse
import json
import os
from typing import Any, Optional

import numpy as np


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "codes", help="QARM VQ + RQ codes of item representations (faiss)",
        description="Quantises item representations into QARM codes: VQ = the K nearest "
                    "codebook items (codebook = the representations themselves, exact or "
                    "IVF/HNSW search), RQ = L levels of k-means on the residuals. Writes "
                    "OUT/codes.safetensors and OUT/codes.json (written last) and prints "
                    "per-level code statistics and the VQ recall.")
    p.add_argument("--reps", required=True,
                   help="safetensors file with 'reps' [N, d] and 'has_rep' [N] (from `qarm "
                        "align`), or a content store directory (from `encode`, pooled states)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--metric", choices=["cosine", "l2"], default="cosine",
                   help="cosine: l2-normalise the representations first (default)")
    g = p.add_argument_group("VQ")
    g.add_argument("--k", type=int, default=25, help="VQ codes per item (default 25)")
    g.add_argument("--index", choices=["auto", "flat", "ivf", "hnsw"], default="auto",
                   help="VQ search: auto = exact up to --exact-max-items codebook items, "
                        "else IVF")
    g.add_argument("--exact-max-items", type=int, default=100_000)
    g.add_argument("--nlist", type=int, default=0, help="IVF lists (0: 4*sqrt(n))")
    g.add_argument("--nprobe", type=int, default=16, help="IVF lists searched")
    g.add_argument("--hnsw-m", type=int, default=32)
    g.add_argument("--ef-search", type=int, default=128)
    g.add_argument("--recall-sample", type=int, default=1000,
                   help="queries on which the approximate index's recall@K is measured")
    g.add_argument("--codebook-items", choices=["all", "train"], default="all",
                   help="VQ codebook: all items with a representation, or only those with "
                        "interactions in the train split of --data (new items are then "
                        "quantised onto trained items)")
    g.add_argument("--data", default=None, help="dataset directory (for --codebook-items train)")
    g = p.add_argument_group("RQ")
    g.add_argument("--levels", type=int, default=6, help="RQ levels L (default 6)")
    g.add_argument("--codebook-size", type=int, default=256, help="centroids per level")
    g.add_argument("--niter", type=int, default=20, help="k-means iterations per level")
    g.add_argument("--init", choices=["kmeans++", "random", "afk-mc2"], default="kmeans++",
                   help="k-means initialisation (random = the paper's plain faiss.Kmeans)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="faiss OpenMP threads (0: faiss default = all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_codes)


def train_item_mask(data_dir: str, num_items: Optional[int] = None) -> np.ndarray:
    """``bool [num_items]``: items with at least one interaction in the train split."""
    from torchrec_mm.data.io import load_interaction_columns, load_meta
    from torchrec_mm.data.split import TRAIN, load_split

    meta = load_meta(data_dir)
    if num_items is not None and meta.num_items != num_items:
        raise ValueError(f"{data_dir} has {meta.num_items} items but the representations "
                         f"have {num_items} rows")
    split = load_split(data_dir)
    cols = load_interaction_columns(data_dir, ["user_id", "item_id", "timestamp"])
    train = split.assign(cols["item_id"], cols["timestamp"], cols["user_id"]) == TRAIN
    return np.bincount(cols["item_id"][train], minlength=meta.num_items) > 0


def _codes(args: argparse.Namespace) -> int:
    from torchrec_mm.qarm.codes import (RQConfig, VQConfig, build_codes, faiss_threads,
                                        format_stats, load_representations, save_codes)

    if args.codebook_items == "train" and args.data is None:
        raise SystemExit("qarm codes: --codebook-items train needs --data DIR")
    vq = VQConfig(k=args.k, index=args.index, exact_max_items=args.exact_max_items,
                  nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m,
                  ef_search=args.ef_search, recall_sample=args.recall_sample, seed=args.seed,
                  metric=args.metric)
    rq = RQConfig(levels=args.levels, codebook_size=args.codebook_size, niter=args.niter,
                  seed=args.seed, init=args.init, metric=args.metric)
    reps, has_rep = load_representations(args.reps, metric=args.metric)
    mask = (train_item_mask(args.data, reps.shape[0]) if args.codebook_items == "train"
            else None)
    with faiss_threads(args.threads):
        codes = build_codes(reps, has_rep, vq, rq, codebook_mask=mask,
                            progress=not args.no_progress)
    codes.meta["source"] = {"reps": os.path.abspath(args.reps),
                            "codebook_items": args.codebook_items,
                            "data": os.path.abspath(args.data) if args.data else None}
    save_codes(codes, args.out)
    print(format_stats(codes.meta))
    print(f"codes of {codes.meta['num_with_code']} of {codes.num_items} items written to "
          f"{args.out} ({codes.num_items - codes.meta['num_with_code']} without a "
          f"representation get the 'no code' indices vq={codes.vq_none}, rq={codes.rq_none})")
    print(json.dumps({"vq_recall": codes.meta["vq_recall"],
                      "num_codebook_items": codes.meta["num_codebook_items"]}))
    return 0
