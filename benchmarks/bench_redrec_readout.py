"""RED-Rec towers' train step with the last layer computed at the read positions only.

Both towers read their transformer at a few positions (the user tower at its ``K``
interest queries, the item tower at each item's ``[EMB]`` token):
:func:`torchrec_mm.redrec.readout.forward_at` computes the last layer there only
(keys and values still over every position). This benchmark times a forward +
backward of the two towers' transformers as the spec ``plugins/redrec-ablation-
ml100k.yaml`` runs them, with the fast readout and with the full forward read at the
same positions (the baseline, what the towers did before), in alternating rounds:

- item tower: the top ``--item-layers`` (1) MiniLM layer over ``--items`` (512)
  distinct items of ``--item-tokens`` (52, MovieLens 100K's mean) stored states;
- user tower: the bottom ``--user-layers`` (2) MiniLM layers over ``--users`` (16)
  users of ``--last-n`` (128) events + ``K`` (3) queries.

Three forms: ``full`` (the baseline), ``projected`` (last layer at the read positions,
keys and values projected over every position) and ``fast`` (what the towers run: the
cheaper attention form, for these sizes the absorbed one that projects no key or
value; :mod:`torchrec_mm.redrec.readout`). Prints the per-round median ratios full /
form of CPU time (> 1: faster than the full forward) and writes
``benchmarks/results/redrec_readout.json``. The forms' outputs are checked equal first.

Run: ``python benchmarks/bench_redrec_readout.py [--rounds 7] [--threads 1]``
(about a minute on 2 cores).
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_result  # noqa: E402

from torchrec_mm.redrec.readout import forward_at  # noqa: E402
from torchrec_mm.redrec.tower import UserTowerConfig, keep_layers, load_lm  # noqa: E402


FORMS = {"full": dict(fast=False), "projected": dict(fast=True, absorbed=False),
         "fast": dict(fast=True)}


def step(lm, x, mask, rows, cols, form):
    y = forward_at(lm, x, mask, rows, cols, **FORMS[form])
    y.square().mean().backward()
    lm.zero_grad(set_to_none=True)
    return y.detach()


def case(lm, x, mask, rows, cols, rounds):
    """Per-round CPU seconds of each form's step, alternating; ratios full / form."""
    lm.eval()  # dropout off for the check; the steps are timed in training mode
    with torch.no_grad():
        want = forward_at(lm, x, mask, rows, cols, fast=False)
        for form in FORMS:
            torch.testing.assert_close(forward_at(lm, x, mask, rows, cols, **FORMS[form]),
                                       want, rtol=1e-4, atol=1e-4)
    lm.train()
    times = {form: [] for form in FORMS}
    for form in FORMS:  # warm-up
        step(lm, x, mask, rows, cols, form)
    for _ in range(rounds):
        for form in FORMS:
            c = time.process_time()
            step(lm, x, mask, rows, cols, form)
            times[form].append(time.process_time() - c)
    out = {f"{form}_seconds": t for form, t in times.items()}
    for form in ("projected", "fast"):
        out[f"ratio_full_over_{form}"] = statistics.median(
            [a / b for a, b in zip(times["full"], times[form])])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--items", type=int, default=512)
    ap.add_argument("--item-tokens", type=int, default=52)
    ap.add_argument("--item-layers", type=int, default=1)
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--last-n", type=int, default=128)
    ap.add_argument("--queries", type=int, default=3)
    ap.add_argument("--user-layers", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    path = UserTowerConfig(num_items=1).resolved_model_path()
    g = torch.Generator().manual_seed(0)
    results = {}

    item_lm = keep_layers(load_lm(path), args.item_layers, "top").train()
    H = int(item_lm.config.hidden_size)
    n, T = args.items, args.item_tokens
    lengths = torch.randint(T // 2, T + T // 2, (n,), generator=g)
    t_max = int(lengths.max())
    x = torch.randn(n, t_max, H, generator=g)
    mask = torch.arange(t_max)[None, :] < lengths[:, None]
    cols = (torch.rand(n, 1, generator=g) * lengths[:, None]).long()
    results["item_tower"] = case(item_lm, x, mask, torch.arange(n)[:, None], cols,
                                 args.rounds)
    results["item_tower"].update(items=n, tokens_mean=float(lengths.float().mean()),
                                 layers=args.item_layers)

    user_lm = keep_layers(load_lm(path), args.user_layers, "bottom").train()
    B, K = args.users, args.queries
    lengths = torch.randint(args.last_n // 2, args.last_n + 1, (B,), generator=g)
    t_max = args.last_n + K
    x = torch.randn(B, t_max, H, generator=g)
    mask = torch.arange(t_max)[None, :] < (lengths + K)[:, None]
    cols = lengths[:, None] + torch.arange(K)[None, :]
    results["user_tower"] = case(user_lm, x, mask, torch.arange(B)[:, None].expand(B, K),
                                 cols, args.rounds)
    results["user_tower"].update(users=B, last_n=args.last_n, queries=K,
                                 layers=args.user_layers)
    for name, r in results.items():
        ms = {f: statistics.median(r[f"{f}_seconds"]) * 1e3 for f in FORMS}
        print(f"{name}: train step (fwd + bwd) full / fast readout = "
              f"{r['ratio_full_over_fast']:.2f}x (full / projected K,V only "
              f"{r['ratio_full_over_projected']:.2f}x); CPU ms full {ms['full']:.0f}, "
              f"projected {ms['projected']:.0f}, fast {ms['fast']:.0f}")
    write_result("redrec_readout", {"threads": torch.get_num_threads(),
                                    "rounds": args.rounds, **results}, args.out)


if __name__ == "__main__":
    main()
