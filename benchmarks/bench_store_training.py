"""Training and scoring with proxies / codes read from the online item store vs from the
in-memory artefact tables (issue 6: goal ≤ 1.1× step time with the embedded backend).

* IDProxy v5 (augment, fine proxy) train step, DLRM and target attention, batch 2048:
  ``store`` = the proxies' inputs of each batch's distinct items read from the mmap
  store (``idproxy`` option ``store``) vs the frozen input table;
* the embedded (mmap) store vs Redis (when ``redis-server`` is installed) for the IDProxy
  step.

The step is the one ``torchrec-mm train`` runs (the ranker built by
``trainer.build_model``, ``DistributedModelParallel`` at world size 1, TorchRec's fused
embedding optimizer on the tables, Adam on the dense parameters). Both sides of every
ratio run in this process, interleaved (``common.interleaved_median_times``). Run:
``python benchmarks/bench_store_training.py [--out PATH] [--redis]``.
"""

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_median_times, train_step, write_result  # noqa: E402

from torchrec_mm.idproxy.artifacts import Proxies, group_basis  # noqa: E402
from torchrec_mm.models.rankers import RankerConfig  # noqa: E402
from torchrec_mm.plugins import parse_spec  # noqa: E402
from torchrec_mm.serving.fields import idproxy_schema, write_idproxy_records  # noqa: E402
from torchrec_mm.serving.store import ItemStore  # noqa: E402
from torchrec_mm.testing import random_samples  # noqa: E402
from torchrec_mm.training.distributed import init_distributed  # noqa: E402
from torchrec_mm.training.trainer import TrainConfig, build_model, make_optimizer  # noqa: E402
from torchrec_mm.training.trainer import shard_model  # noqa: E402

N_ITEMS, DIM, GROUPS, D_CONTENT, Z_RANK = 20_000, 32, 3, 384, 32


def _proxies() -> Proxies:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N_ITEMS, GROUPS, D_CONTENT, generator=g).half().float()
    mean, basis = group_basis(z, Z_RANK)
    return Proxies(p_coarse=torch.nn.functional.normalize(torch.randn(N_ITEMS, DIM, generator=g),
                                                          dim=1),
                   z_groups=z, has_content=torch.ones(N_ITEMS, dtype=torch.bool), z_mean=mean,
                   z_basis=basis, meta={})


def _step_fn(samples, kind, proxies, store, batch, dist_ctx):
    """The trainer's step of the v5 ranker, its proxies' inputs from ``store`` (None:
    the frozen input table)."""
    options = {"proxies": "-", "mode": "augment", "z_rank": Z_RANK}
    if store:
        options["store"] = store
    cfg = TrainConfig(data="-", out="-", ranker=RankerConfig(kind=kind, embedding_dim=DIM),
                      batch_size=len(batch.labels), progress=False, seed=0)
    spec = parse_spec({"plugins": [{"name": "idproxy", "options": options}]})
    model, plugins = build_model(cfg, samples.layout, spec=spec,
                                 extras={"idproxy_proxies": proxies})
    model = shard_model(model, cfg, dist_ctx, plugins)
    return train_step(model, make_optimizer(model, cfg), batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--redis", action="store_true", help="also the Redis backend")
    args = ap.parse_args()
    dist_ctx = init_distributed(0, 1)
    samples = random_samples(num_interactions=300_000, num_users=2_000, num_items=N_ITEMS,
                             history_length=50, seed=0)
    proxies = _proxies()
    rng = np.random.default_rng(0)
    batch = samples.make_batch(rng.choice(samples.rows("train"), args.batch_size, False))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        stores = {"mmap": os.path.join(tmp, "idproxy")}
        redis_server = None
        if args.redis:
            from torchrec_mm.serving.testing import RedisServer

            redis_server = RedisServer(directory=os.path.join(tmp, "redis"))
            redis_server.start()
            stores["redis"] = redis_server.url("bench")
        for loc in stores.values():
            with ItemStore.open(loc, idproxy_schema(DIM, GROUPS * Z_RANK)) as st:
                for lo in range(0, N_ITEMS, 5000):
                    write_idproxy_records(st, proxies, np.arange(lo, min(lo + 5000, N_ITEMS)),
                                          "bench", z_rank=Z_RANK)
        try:
            for kind in ("dlrm", "target_attention"):
                steps = {"table": _step_fn(samples, kind, proxies, None, batch, dist_ctx)}
                for name, loc in stores.items():
                    steps[name] = _step_fn(samples, kind, proxies, loc, batch, dist_ctx)
                med = interleaved_median_times(steps, repeat=7, warmup=2, inner=3)
                for k in stores:
                    ratio = med[k] / med["table"]
                    results[f"idproxy/{kind}/{k}"] = {"table_ms": med["table"] * 1e3,
                                                      "store_ms": med[k] * 1e3, "ratio": ratio}
                    print(f"idproxy v5 {kind:17s} b{args.batch_size}: table "
                          f"{med['table'] * 1e3:7.1f} ms  {k} store {med[k] * 1e3:7.1f} ms  "
                          f"ratio {ratio:.2f}x ({'ok' if ratio <= 1.1 else 'ABOVE 1.1x'})")
        finally:
            if redis_server is not None:
                redis_server.stop()
    write_result("store_training", {"goals": {"step_ratio": 1.1}, "results": results},
                 args.out)


if __name__ == "__main__":
    main()
