"""Prints the RED-Rec head diagnostics quoted in the README ("What it measures here").

Two rankings on the RED-Rec protocol's cases, both ``s · max_k cos(u_k, item) +
log(1 + train-split positives of the item)``:

* ``--content STORE``: ``u`` is the training-free content mean
  (:mod:`torchrec_mm.redrec.content_mean`) over 2-D's and global last-N's selection;
* ``--run RUN`` (repeatable): ``u`` are a trained run's interests, and then also the
  interests minus their mean over the evaluated cases (how much of them is personal).

``s = 0`` is the most-popular ranking. The scales are picked by hand, on the test cases:
an optimistic reference, not a baseline. Usage::

    python examples/redrec_head_diagnostics.py --data DATA --content OUT/prepare/content \\
        --run OUT/runs/seen_cen_2d/seed0
"""

import argparse
from typing import Optional, Sequence

import numpy as np
import torch

from torchrec_mm.data.io import load_meta
from torchrec_mm.data.split import TRAIN, load_split
from torchrec_mm.redrec.content_mean import centred_unit, history_means
from torchrec_mm.redrec.popularity import popularity_counts
from torchrec_mm.redrec.protocol import EvalCases, evaluate_multi_interest, make_eval_cases
from torchrec_mm.redrec.sequences import EventLog, MixConfig, mix
from torchrec_mm.redrec.train import (RedRecConfig, content_vectors, embed_cases,
                                      eval_target_rows)
from torchrec_mm.redrec.user_features import load_model
from torchrec_mm.training.distributed import DistContext

KEYS = ("HR@10", "HR@100", "HR@1000", "MRR")


def _cases(cfg: RedRecConfig, log: EventLog, num_items: int) -> EvalCases:
    rows = eval_target_rows(log, cfg.data, cfg.eval_split, cfg.target_actions,
                            scenarios=cfg.target_scenarios)
    return make_eval_cases(log.user_offsets, log.item, log.timestamp, num_items,
                           cfg.protocol(), target_rows=rows)


def _log_counts(cfg: RedRecConfig, log: EventLog, num_items: int) -> torch.Tensor:
    part = load_split(cfg.data).assign(log.item, log.timestamp, log.user)
    counts = popularity_counts(log, num_items, cfg.target_actions, part == TRAIN)
    return torch.from_numpy(np.log1p(counts)).float()


def _show(name: str, uv: torch.Tensor, iv: torch.Tensor, cases: EvalCases,
          prior: torch.Tensor, scales: Sequence[float]) -> None:
    for s in scales:
        m = evaluate_multi_interest(uv, iv, cases, progress=False, item_bias=prior, scale=s)
        print(f"{name:<40} s={s:<6.2f}", " / ".join(f"{m[k]:.3f}" for k in KEYS),
              f"distinct top-10 items {m['distinct_top10_items']}", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--content", help="content store for the content-mean rows")
    p.add_argument("--run", action="append", default=[], help="trained RED-Rec run dir")
    p.add_argument("--scales", default="0,1,2,5,10,20")
    p.add_argument("--last-n", type=int, default=32, help="content mean: events read")
    args = p.parse_args(argv)
    scales = [float(s) for s in args.scales.split(",")]
    num_items = load_meta(args.data).num_items
    log = EventLog.from_dataset(args.data)
    print("HR@10 / HR@100 / HR@1000 / MRR")
    if args.content:
        # the cases and positives of the README's table (redrec-mixing-sparse.yaml)
        cfg = RedRecConfig(data=args.data, out="", target_actions=("is_click",),
                           target_scenarios=("search", "ads"), eval_num_targets=3,
                           eval_pool_size=1_000_000, eval_max_users=1000, eval_seed=0,
                           eval_ks=(10, 50, 100, 1000))
        cases, prior = _cases(cfg, log, num_items), _log_counts(cfg, log, num_items)
        vec = centred_unit(content_vectors(args.content, "emb_token", num_items, args.data))
        users, cut = cases.users.numpy(), cases.cutoff_time.numpy()
        for policy in ("2d", "global_time"):
            seq = mix(log, users, cut, MixConfig(policy=policy, last_n=args.last_n))
            _show(f"content mean ({policy}) + log count", history_means(seq.item, vec),
                  vec, cases, prior, scales)
    for run in args.run:
        model, cfg, _ = load_model(run, data=args.data)
        cases, prior = _cases(cfg, log, num_items), _log_counts(cfg, log, num_items)
        with torch.no_grad():
            uv, iv = embed_cases(model, log, cases, cfg, DistContext(0, 1, torch.device("cpu")))
        inv_tau = 1.0 / float(model.tau().detach())
        print(f"{run}: 1/tau {inv_tau:.2f}")
        _show("interests + log count", uv, iv, cases, prior, scales + [inv_tau])
        resid = uv - uv.mean(0, keepdim=True)
        print(f"personal part: |u - mean_u u| / |u| = {float(resid.norm(dim=-1).mean()):.3f}")
        _show("interests minus their mean + log count", resid, iv, cases, prior,
              [s for s in scales if s > 0])


if __name__ == "__main__":
    main()
