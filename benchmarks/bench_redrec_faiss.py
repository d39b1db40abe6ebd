"""RED-Rec retrieval over a 1M-item catalogue: exact vs approximate faiss indexes.

RED-Rec serving (paper ``001_42c7267e32b49bc6`` §4.3): every item vector goes into a
faiss index; a user's K interest vectors each retrieve their top ``n`` items and the
lists are merged (an item's score is its best cosine over the interests). This runs that
path — :class:`torchrec_mm.redrec.index.ItemIndex` (``retrieve`` = per-interest search
+ :func:`~torchrec_mm.redrec.index.merge_interest_results`) — with

* ``Flat`` — exact inner product (``IndexFlatIP``): the reference;
* ``IVF1024,Flat`` — inverted lists (trained on a 100k sample), swept over ``nprobe``;
* ``HNSW32`` — graph index, swept over ``efSearch``;

and reports build time, users/s and interest-queries/s of retrieval, and recall@n of each
approximate setting against the exact merged top ``n`` on the same users.

Data: ``--items`` (1M) item vectors of dim ``--dim`` (64), a mixture of Gaussians (one
cluster per 500 items, standard normal centres, noise std 1.0 per coordinate, as in
``bench_qarm_codebooks.py``), l2-normalised; ``--users`` (1000) users with K = 9
interests (3 scenarios x 3), each a random item's vector plus Gaussian noise of std 0.5
per coordinate (queries near the catalogue, not on it). Search timings are medians of
``--repeat`` rounds, each round visiting every setting in turn. faiss runs with
``--threads`` OpenMP threads (1 by default: on 2 cores shared with other jobs, idle
OpenMP threads spinning at barriers make multi-threaded faiss slower; 0 = faiss'
default).

Run: ``python benchmarks/bench_redrec_faiss.py [--items 1000000] [--users 1000]
[--out PATH]`` (4-7 minutes on 2 cores depending on their load, half of it the HNSW
build; limit 10 min).
"""

import argparse
import dataclasses
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_result  # noqa: E402

from torchrec_mm.redrec.index import IndexConfig, ItemIndex, recall_at_n  # noqa: E402


def clustered(n: int, d: int, seed: int, items_per_cluster: int = 500,
              noise: float = 1.0) -> np.ndarray:
    """``[n, d]`` float32 mixture of Gaussians (see the module doc)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // items_per_cluster), d)).astype(np.float32)
    x = centres[rng.integers(0, centres.shape[0], n)]
    x += noise * rng.standard_normal((n, d), dtype=np.float32)
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--interests", type=int, default=9, help="K per user")
    ap.add_argument("--n", type=int, default=100, help="items retrieved per user")
    ap.add_argument("--ivf", default="IVF1024,Flat")
    ap.add_argument("--nprobe", type=int, nargs="*", default=[4, 16, 64])
    ap.add_argument("--hnsw", default="HNSW32")
    ap.add_argument("--ef-search", type=int, nargs="*", default=[64, 128, 256])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    t_start = time.perf_counter()

    t = time.perf_counter()
    items = clustered(args.items, args.dim, seed=0)
    rng = np.random.default_rng(1)
    src = items[rng.integers(0, args.items, (args.users, args.interests))]
    interests = src + 0.5 * rng.standard_normal(src.shape, dtype=np.float32)
    print(f"data: {args.items} items x {args.dim}, {args.users} users x "
          f"{args.interests} interests ({time.perf_counter() - t:.1f} s)")

    base = IndexConfig(threads=args.threads)
    builds: Dict[str, ItemIndex] = {}
    for factory in ("Flat", args.ivf, args.hnsw):
        index = ItemIndex(items, dataclasses.replace(base, factory=factory))
        builds[factory] = index
        print(f"build {factory:14s}: {index.build_seconds:7.1f} s")

    # settings: (label, index, config)
    settings: List[Tuple[str, ItemIndex, IndexConfig]] = [("Flat", builds["Flat"], base)]
    settings += [(f"{args.ivf} nprobe={p}", builds[args.ivf],
                  dataclasses.replace(builds[args.ivf].config, nprobe=p)) for p in args.nprobe]
    settings += [(f"{args.hnsw} efSearch={e}", builds[args.hnsw],
                  dataclasses.replace(builds[args.hnsw].config, ef_search=e))
                 for e in args.ef_search]
    seconds: Dict[str, List[float]] = {label: [] for label, _, _ in settings}
    ids: Dict[str, np.ndarray] = {}
    for _ in range(args.repeat):
        for label, index, cfg in settings:
            index.config = cfg
            t = time.perf_counter()
            _, got = index.retrieve(interests, n=args.n)
            seconds[label].append(time.perf_counter() - t)
            ids[label] = got
    exact = ids["Flat"]
    results: Dict[str, Any] = {}
    for label, index, _ in settings:
        med = statistics.median(seconds[label])
        results[label] = {
            "factory": index.config.factory, "build_seconds": index.build_seconds,
            "retrieve_seconds": med, "users_per_s": args.users / med,
            "queries_per_s": args.users * args.interests / med,
            "recall_at_n": recall_at_n(ids[label], exact), "all_seconds": seconds[label]}
        r = results[label]
        print(f"{label:28s} build {r['build_seconds']:7.1f} s  retrieve "
              f"{r['users_per_s']:9.1f} users/s ({r['queries_per_s']:9.1f} queries/s)  "
              f"recall@{args.n} {r['recall_at_n']:.4f}  "
              f"({r['users_per_s'] / results['Flat']['users_per_s']:.1f}x exact)")
    total = time.perf_counter() - t_start
    print(f"total {total:.0f} s")
    write_result("redrec_faiss", {
        "data": "mixture of Gaussians, 500 items per cluster, noise 1.0; interests = "
                "item + N(0, 0.5^2) noise",
        "items": args.items, "dim": args.dim, "users": args.users,
        "interests": args.interests, "n": args.n, "threads": args.threads,
        "repeat": args.repeat, "total_seconds": total, "results": results}, args.out)


if __name__ == "__main__":
    main()
