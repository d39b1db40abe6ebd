"""Input pipeline vs train step: building KJT batches must not be the bottleneck.

For batch 512 and 2048 it times (a) building one ``Batch`` (history gather, KJT,
dense features) from the sample index and (b) one train step (forward, backward,
fused embedding update, dense Adam) of each ranker, both in this process on the same
data, and prints the ratio (goal: pipeline ≤ 10% of the step at batch 2048). Batches
are built by DataLoader workers in parallel with training in real runs, so the ratio
is an upper bound of the pipeline's share.

Run: ``python benchmarks/bench_input_pipeline.py [--out PATH]``.
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median_time, write_result  # noqa: E402

from torchrec_mm.models.rankers import RankerConfig  # noqa: E402
from torchrec_mm.testing import random_samples  # noqa: E402
from torchrec_mm.training.distributed import init_distributed  # noqa: E402
from torchrec_mm.training.trainer import (  # noqa: E402
    TrainConfig,
    build_model,
    make_optimizer,
    shard_model,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--interactions", type=int, default=400_000)
    ap.add_argument("--history", type=int, default=50)
    args = ap.parse_args()
    # 2k users x 200 interactions: most histories reach the 50-item cap
    samples = random_samples(num_interactions=args.interactions, num_users=2_000,
                             num_items=50_000, history_length=args.history, seed=0)
    ctx = init_distributed(0, 1)
    rows_all = samples.rows("train")
    rng = np.random.default_rng(0)
    results = {}
    for batch_size in (512, 2048):
        rows = rng.choice(rows_all, batch_size, replace=False)
        t_batch = median_time(lambda: samples.make_batch(rows, "train"), repeat=7, inner=3)
        batch = samples.make_batch(rows, "train")
        mean_hist = float(batch.sparse_features["hist_item_id"].lengths().float().mean())
        print(f"batch {batch_size}: mean history length {mean_hist:.1f} "
              f"(max {args.history})")
        for kind in ("dlrm", "dlrm_dcn", "target_attention"):
            cfg = TrainConfig(data="-", out="-", ranker=RankerConfig(kind=kind, embedding_dim=32),
                              history_length=args.history, batch_size=batch_size,
                              progress=False)
            model, plugins = build_model(cfg, samples.layout)
            model = shard_model(model, cfg, ctx, plugins)
            opt = make_optimizer(model, cfg)

            def step() -> None:
                loss, _ = model(batch)
                opt.zero_grad()
                loss.backward()
                opt.step()

            t_step = median_time(step, repeat=5, warmup=2, inner=3)
            ratio = t_batch / t_step
            results[f"{kind}/b{batch_size}"] = {
                "batch_ms": t_batch * 1e3, "mean_history_length": mean_hist, "step_ms": t_step * 1e3,
                "pipeline_over_step": ratio,
                "batches_per_s": 1 / t_batch, "steps_per_s": 1 / t_step}
            print(f"{kind:17s} batch {batch_size:5d}: build {t_batch*1e3:7.2f} ms  "
                  f"step {t_step*1e3:7.2f} ms  pipeline/step = {ratio:.3f} "
                  f"({'ok' if ratio <= 0.10 or batch_size != 2048 else 'ABOVE 10% GOAL'})")
    write_result("input_pipeline", {"goal": "pipeline/step <= 0.10 at batch 2048",
                                    "results": results}, args.out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
