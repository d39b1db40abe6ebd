"""IDProxy speed: the ranker's train step with the full (v5) plugin vs the base ranker,
and proxy generation for new items from stored states (adaptor + gate only).

* train step, target-attention ranker and DLRM, batch 512 and 2048: v5 (augment,
  coarse + fine proxies in the ID slots of the target and of every history item) over
  base — goal ≤ 1.25×;
* p_fine for new items from stored layer-group states (FineProxy forward, no grad):
  items/s — goal ≥ 50k/s on 2 cores.

Run: ``python benchmarks/bench_idproxy.py [--out PATH]``.
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median_time, write_result  # noqa: E402

from torchrec_mm.idproxy.artifacts import Proxies  # noqa: E402
from torchrec_mm.idproxy.modules import FineProxy  # noqa: E402
from torchrec_mm.models.rankers import RankerConfig, build_collections, build_ranker  # noqa: E402
from torchrec_mm.models.rankers import RankerTrain  # noqa: E402
from torchrec_mm.plugins import PluginContext, apply_plugins, parse_spec  # noqa: E402
from torchrec_mm.testing import random_samples  # noqa: E402

D_CONTENT, GROUPS = 384, 3


def _proxies(num_items: int, dim: int) -> Proxies:
    g = torch.Generator().manual_seed(0)
    p = torch.nn.functional.normalize(torch.randn(num_items, dim, generator=g), dim=1)
    return Proxies(p_coarse=p, z_groups=torch.randn(num_items, GROUPS, D_CONTENT, generator=g),
                   has_content=torch.ones(num_items, dtype=torch.bool), meta={})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    samples = random_samples(num_interactions=300_000, num_users=2_000, num_items=20_000,
                             history_length=50, seed=0)
    proxies = _proxies(samples.layout.num_items, 32)
    rng = np.random.default_rng(0)
    results = {}
    for kind in ("dlrm", "target_attention"):
        cfg = RankerConfig(kind=kind, embedding_dim=32)
        for batch_size in (512, 2048):
            batch = samples.make_batch(rng.choice(samples.rows("train"), batch_size, False))
            times = {}
            for variant in ("base", "v5"):
                torch.manual_seed(0)
                cols = build_collections(samples.layout, cfg)
                if variant == "v5":
                    ctx = PluginContext(layout=samples.layout, ranker=cfg,
                                        extras={"idproxy_proxies": proxies})
                    spec = parse_spec({"plugins": [{"name": "idproxy", "options": {
                        "proxies": "-", "mode": "augment"}}]})
                    cols = apply_plugins(cols, spec, ctx)
                model = RankerTrain(build_ranker(samples.layout, cfg, collections=cols))
                opt = torch.optim.Adagrad(model.parameters(), lr=0.01)

                def step() -> None:
                    loss, _ = model(batch)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()

                times[variant] = median_time(step, repeat=5, warmup=2, inner=3)
            ratio = times["v5"] / times["base"]
            results[f"{kind}/b{batch_size}"] = {"base_ms": times["base"] * 1e3,
                                                "v5_ms": times["v5"] * 1e3, "ratio": ratio}
            print(f"{kind:17s} batch {batch_size:5d}: base {times['base']*1e3:7.1f} ms  "
                  f"v5 {times['v5']*1e3:7.1f} ms  ratio {ratio:.2f}x "
                  f"({'ok' if ratio <= 1.25 else 'ABOVE the 1.25x goal'})")
    fine = FineProxy(proxies.p_coarse, proxies.z_groups).eval()
    ids = torch.arange(samples.layout.num_items)
    with torch.no_grad():
        t = median_time(lambda: fine(ids), repeat=5, warmup=1)
    rate = len(ids) / t
    results["fine_proxy_items_per_s"] = rate
    print(f"p_fine from stored states: {rate:,.0f} items/s "
          f"({'ok' if rate >= 50_000 else 'below the 50k/s goal'})")
    write_result("idproxy", {"goals": {"train_step_ratio": 1.25, "items_per_s": 50_000},
                             "results": results}, args.out)


if __name__ == "__main__":
    main()
