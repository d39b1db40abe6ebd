"""Item store: ``get()`` of a batch of 4096 ids and ``put`` throughput, embedded
(mmap, the default; SQLite, the measured alternative) vs Redis vs an in-memory tensor
``index_select`` baseline, ratios in one run.

Data: ``--items`` (default 50k) items of the IDProxy schema — ``p_coarse`` float32[64]
and ``z_groups`` float16[3, 384], 2.56 kB a record — written in puts of 4096 records
(the fill is the put-throughput measurement, ``sync=True`` = fsync per put for the
embedded stores; Redis runs with ``appendonly yes, appendfsync everysec``). Then, for
random batches of ``--batch`` ids (uniform over the stored items, so duplicates
occur), ``ItemStore.get`` of ``p_coarse`` alone and of both fields, as the plugins
would call it (float32 tensors out), against ``index_select`` of in-memory tables
(``z_groups`` kept float16 and widened, like the store). Timings are interleaved
round by round (``--repeat`` rounds, median) so all sides see the same machine load.
Also timed: overwriting puts of 4096 records with ``sync=True`` and ``sync=False``.

Run: ``python benchmarks/bench_store.py [--items 50000] [--threads 1] [--out PATH]``
(default ``benchmarks/results/store.json``; about 1-2 min on 2 cores). Redis is skipped
(with a message) when ``redis-server`` is not installed.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median_time, write_result  # noqa: E402

from torchrec_mm.serving import ItemStore, StoreSchema  # noqa: E402
from torchrec_mm.serving.testing import RedisServer, redis_server_binary  # noqa: E402

SCHEMA = StoreSchema.of(p_coarse=("float32", (64,)), z_groups=("float16", (3, 384)))


def fill(store: ItemStore, p: torch.Tensor, z: torch.Tensor, batch: int) -> float:
    """Puts every item in batches; returns records per second."""
    n = p.shape[0]
    t = time.perf_counter()
    for s in range(0, n, batch):
        ids = torch.arange(s, min(n, s + batch))
        store.put(ids, {"p_coarse": p[ids], "z_groups": z[ids]}, version="bench@v1")
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--put-batch", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backends", default="mmap,sqlite,redis")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    N, B = args.items, args.batch
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(N, 64, generator=gen)
    z = torch.randn(N, 3, 384, generator=gen).half()
    root = tempfile.mkdtemp(prefix="bench-store-")
    server = None
    stores: Dict[str, ItemStore] = {}
    results: Dict[str, object] = {"items": N, "batch": B, "put_batch": args.put_batch,
                                  "threads": args.threads,
                                  "record_bytes": sum(f.nbytes for f in SCHEMA.fields.values()),
                                  "backends": {}}
    try:
        for name in args.backends.split(","):
            if name == "redis":
                if redis_server_binary() is None:
                    print("redis: skipped (redis-server is not installed)")
                    continue
                server = RedisServer(os.path.join(root, "redis"), appendfsync="everysec")
                server.start()
                loc = server.url("bench")
            else:
                loc = os.path.join(root, "store.db" if name == "sqlite" else "store")
            store = ItemStore.open(loc, SCHEMA, backend=name)
            rps = fill(store, p, z, args.put_batch)
            stores[name] = store
            results["backends"][name] = {"fill_records_per_s": rps}
            print(f"{name:7s} fill: {N} records in puts of {args.put_batch}: "
                  f"{rps:,.0f} records/s")

        rng = np.random.default_rng(1)
        batches = [torch.from_numpy(rng.integers(0, N, B)) for _ in range(args.repeat)]
        for name, store in stores.items():  # the same answer as the tables
            vals, found = store.get(batches[0])
            assert bool(found.all())
            assert torch.equal(vals["p_coarse"], p[batches[0]])
            assert torch.equal(vals["z_groups"], z[batches[0]].float())

        def memory(ids: torch.Tensor, both: bool) -> None:
            p.index_select(0, ids)
            if both:
                z.index_select(0, ids).float()

        sides: Dict[str, Callable[[torch.Tensor, bool], object]] = {"memory": memory}
        for name, store in stores.items():
            sides[name] = (lambda s: lambda ids, both: s.get(
                ids, ["p_coarse", "z_groups"] if both else ["p_coarse"]))(store)
        times: Dict[str, Dict[str, List[float]]] = {k: {"p": [], "both": []} for k in sides}
        for ids in batches:  # interleaved rounds
            for k, fn in sides.items():
                for which in ("p", "both"):
                    times[k][which].append(median_time(lambda: fn(ids, which == "both"),
                                                       repeat=1, warmup=1, inner=3))
        med = {k: {w: statistics.median(v) for w, v in t.items()} for k, t in times.items()}
        print(f"\nget() of {B} ids (median of {args.repeat} rounds), ratio to in-memory "
              "index_select:")
        print(f"{'':9s}{'p_coarse':>22s}{'p_coarse + z_groups':>28s}")
        for k, m in med.items():
            rp, rb = m["p"] / med["memory"]["p"], m["both"] / med["memory"]["both"]
            print(f"{k:9s}{m['p'] * 1e3:9.2f} ms ({rp:6.1f}x){m['both'] * 1e3:14.2f} ms "
                  f"({rb:6.1f}x)")
            entry = {"get_p_coarse_ms": m["p"] * 1e3, "get_both_ms": m["both"] * 1e3,
                     "ratio_p_coarse": rp, "ratio_both": rb}
            if k == "memory":
                results["memory"] = entry
            else:
                results["backends"][k].update(entry)

        print(f"\nput of {args.put_batch} records (overwrites):")
        for name, store in stores.items():
            row = {}
            modes = [True, False] if name != "redis" else [True]
            for sync in modes:
                if name != "redis":
                    store.close()
                    store = stores[name] = ItemStore.open(store.location, SCHEMA,
                                                          backend=name, sync=sync)
                ids = torch.from_numpy(rng.integers(0, N, args.put_batch))
                vals = {"p_coarse": p[ids], "z_groups": z[ids]}
                t = median_time(lambda: store.put(ids, vals, "bench@v2"), repeat=5)
                key = "put_ms" if sync else "put_ms_nosync"
                row[key] = t * 1e3
                print(f"{name:7s} sync={str(sync):5s} {t * 1e3:8.1f} ms "
                      f"({args.put_batch / t:,.0f} records/s)")
            results["backends"][name].update(row)
        write_result("store", results, args.out)
    finally:
        for s in stores.values():
            s.close()
        if server is not None:
            server.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
