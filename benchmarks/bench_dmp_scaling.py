"""2-rank vs 1-rank training throughput of the DLRM baseline under DMP.

Both runs use the same per-rank batch, the same data and the same code path
(``shard_model`` + fused embedding optimizer + DDP); 1 rank uses every core, 2 ranks
split the cores between them. Prints samples/s of both and the ratio. On a 2-core
machine the ideal is ~1x-2x depending on how much of the step is parallel-friendly;
gloo's all-to-all and all-reduce run over loopback.

Run: ``python benchmarks/bench_dmp_scaling.py [--steps N] [--batch-size B] [--out PATH]``.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_result  # noqa: E402

from torchrec_mm.data.batching import RankingBatchDataset  # noqa: E402
from torchrec_mm.models.rankers import RankerConfig  # noqa: E402
from torchrec_mm.testing import random_samples  # noqa: E402
from torchrec_mm.training.distributed import init_distributed, spawn  # noqa: E402
from torchrec_mm.training.trainer import (  # noqa: E402
    TrainConfig,
    build_model,
    make_optimizer,
    shard_model,
)


def _worker(world: int, steps: int, batch_size: int, kind: str, out: str) -> None:
    rank = int(os.environ.get("RANK", 0))
    ctx = init_distributed(rank, world)
    samples = random_samples(num_interactions=300_000, num_users=20_000, num_items=50_000,
                             history_length=50, seed=0)
    cfg = TrainConfig(data="-", out="-", ranker=RankerConfig(kind=kind, embedding_dim=32),
                      batch_size=batch_size, sharding_type="table_wise", progress=False)
    model, plugins = build_model(cfg, samples.layout)
    model = shard_model(model, cfg, ctx, plugins)
    opt = make_optimizer(model, cfg)
    ds = RankingBatchDataset(samples, "train", batch_size, rank=rank, world_size=world)
    batches = [b for _, b in zip(range(steps + 5), ds)]

    def step(b) -> None:
        loss, _ = model(b)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for b in batches[:5]:
        step(b)
    torch.distributed.barrier()
    t = time.perf_counter()
    for b in batches[5:]:
        step(b)
    torch.distributed.barrier()
    elapsed = time.perf_counter() - t
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"seconds": elapsed, "samples": steps * batch_size * world}, f)


def run(world: int, steps: int, batch_size: int, kind: str) -> float:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        if world == 1:
            spawn(_worker, 1, (1, steps, batch_size, kind, out))
        else:
            spawn(_worker, world, (world, steps, batch_size, kind, out))
        with open(out) as f:
            r = json.load(f)
    return r["samples"] / r["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--kind", default="dlrm")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    one = run(1, args.steps, args.batch_size, args.kind)
    two = run(2, args.steps, args.batch_size, args.kind)
    print(f"{args.kind} per-rank batch {args.batch_size}: 1 rank {one:,.0f} samples/s, "
          f"2 ranks {two:,.0f} samples/s, ratio 2/1 = {two / one:.2f}x")
    write_result("dmp_scaling", {"kind": args.kind, "batch_size_per_rank": args.batch_size,
                                 "samples_per_s_1rank": one, "samples_per_s_2rank": two,
                                 "ratio_2_over_1": two / one}, args.out)


if __name__ == "__main__":
    main()
