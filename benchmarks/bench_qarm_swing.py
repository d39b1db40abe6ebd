"""QARM pair mining speed: Swing and history (retrieval-space) pairs, vectorised vs the
straightforward loop references, on a synthetic log.

* Swing on the positives of a synthetic log (~120k of 300k interactions, sparse) and on
  all its impressions (300k, dense): items/s; ratio over ``swing_reference`` on a user
  subsample (same input for both; the ratio grows with density);
* ``pairs_from_history`` (window 50, d = 64) on the whole log: rows/s; ratio over
  ``pairs_from_history_reference`` on a user subsample (same input) — goal >= 20x.

Run: ``python benchmarks/bench_qarm_swing.py [--out PATH] [--interactions N]``.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median_time, write_result  # noqa: E402

from torchrec_mm.data.io import load_interaction_columns  # noqa: E402
from torchrec_mm.data.synth import SynthConfig, generate  # noqa: E402
from torchrec_mm.qarm.pairs import (  # noqa: E402
    SwingConfig,
    pairs_from_history,
    pairs_from_history_reference,
    swing,
    swing_reference,
)

GOAL_HISTORY = 20.0


def _once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--interactions", type=int, default=300_000)
    args = ap.parse_args()
    n = args.interactions
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SynthConfig(num_users=max(n // 100, 10), num_items=max(n // 40, 20),
                          num_interactions=n, target_ctr=0.4, seed=0)
        generate(cfg, os.path.join(tmp, "synth"))
        c = load_interaction_columns(os.path.join(tmp, "synth"),
                                     ["user_id", "item_id", "timestamp", "label"])
    user, item, ts, pos = c["user_id"], c["item_id"], c["timestamp"], c["label"] == 1
    num_items = cfg.num_items
    emb = np.random.default_rng(0).normal(size=(num_items, 64)).astype(np.float32)
    results = {"interactions": int(user.shape[0]), "positives": int(pos.sum()),
               "num_items": num_items, "num_users": cfg.num_users}
    print(f"log: {user.shape[0]} interactions, {pos.sum()} positives, "
          f"{cfg.num_users} users, {num_items} items")

    # ---- swing on the positives (sparse) and on every impression (dense)
    scfg = SwingConfig()
    for name, m, frac in (("positives", pos, 4), ("impressions", np.ones_like(pos), 8)):
        su, si, st = user[m], item[m], ts[m]
        t_full = median_time(lambda: swing(su, si, st, num_items, scfg), repeat=3)
        r = {"interactions": int(su.shape[0]), "full_s": t_full,
             "items_per_s": num_items / t_full, "interactions_per_s": su.shape[0] / t_full}
        print(f"swing on {su.shape[0]} {name}: {t_full:.2f} s ({num_items / t_full:,.0f} "
              f"items/s, {su.shape[0] / t_full:,.0f} interactions/s)")
        sub = su < cfg.num_users // frac  # the same user subsample for both
        args_sub = (su[sub], si[sub], st[sub], num_items, scfg)
        t_vec = median_time(lambda: swing(*args_sub), repeat=3)
        t_ref = _once(lambda: swing_reference(*args_sub))
        r["subsample"] = {"interactions": int(sub.sum()), "vectorised_s": t_vec,
                          "reference_s": t_ref, "ratio": t_ref / t_vec}
        print(f"  subsample of {sub.sum()} (1/{frac} of the users): vectorised "
              f"{t_vec * 1e3:.1f} ms, reference {t_ref:.2f} s, ratio {t_ref / t_vec:.1f}x")
        results[f"swing_{name}"] = r

    # ---- history pairs: full size
    t_hist = median_time(lambda: pairs_from_history(user, item, ts, pos, emb, window=50),
                         repeat=3)
    a, _ = pairs_from_history(user, item, ts, pos, emb, window=50)
    results["history_full_s"] = t_hist
    results["history_rows_per_s"] = user.shape[0] / t_hist
    results["history_pairs"] = int(a.shape[0])
    print(f"history pairs, {user.shape[0]} rows: {t_hist:.2f} s "
          f"({user.shape[0] / t_hist:,.0f} rows/s, {a.shape[0]} pairs)")
    # ---- history pairs: same subsample for both
    sub = user < cfg.num_users // 8
    args_sub = (user[sub], item[sub], ts[sub], pos[sub], emb)
    t_vec = median_time(lambda: pairs_from_history(*args_sub, window=50), repeat=3)
    t_ref = _once(lambda: pairs_from_history_reference(*args_sub, window=50))
    ratio = t_ref / t_vec
    results["history_subsample"] = {"rows": int(sub.sum()), "vectorised_s": t_vec,
                                    "reference_s": t_ref, "ratio": ratio}
    print(f"history pairs, subsample of {sub.sum()} rows: vectorised {t_vec * 1e3:.1f} ms, "
          f"reference {t_ref:.2f} s, ratio {ratio:.0f}x "
          f"({'ok' if ratio >= GOAL_HISTORY else f'BELOW the {GOAL_HISTORY:.0f}x goal'})")
    write_result("qarm_swing", {"goals": {"history_ratio": GOAL_HISTORY},
                                "results": results}, args.out)


if __name__ == "__main__":
    main()
