"""RED-Rec user-tower inference vs the bare Hugging Face encoder on the same token count.

The user tower (:class:`~torchrec_mm.redrec.tower.UserTower`, the bundled MiniLM by
default) embeds ``B`` users with full ``last_n = 128`` event sequences from 3 scenarios
(``K = 9`` interest queries, so ``128 + 9`` positions per user): KJT checks, the derived
action-bit feature, the EmbeddingCollection lookups of item / scenario / hour / position
/ gap / action tables, the event sum, the LM over ``[events; Q]`` and the output
projection. The baseline is the same checkpoint's ``AutoModel`` forward on ``B x (128 +
9)`` token ids with an all-ones attention mask: the floor any tower built on that LM can
reach. Goal: tower users/s >= 0.9x the bare encoder's.

Both run in ``torch.inference_mode`` with ``--threads`` intra-op threads (1 by default:
on 2 cores shared with other jobs a single thread makes the two timings far less noisy;
0 keeps torch's default), in rounds that alternate the two (tower, bare, tower, ...)
so both see the same machine load. Wall and CPU times (``time.process_time``: waiting for
a core is not counted) are taken; the medians and the median of the per-round ratios
are printed and written to ``benchmarks/results/redrec_tower.json`` (the goal is judged
on the CPU-time ratio).

Run: ``python benchmarks/bench_redrec_tower.py [--batch 16] [--rounds 9] [--threads 1]
[--model PATH]`` (about 2 minutes on 2 cores).
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_result  # noqa: E402

from torchrec_mm.redrec.sequences import SEQ_FEATURES, EventLog, MixConfig, mix  # noqa: E402
from torchrec_mm.redrec.tower import UserTower, UserTowerConfig  # noqa: E402

GOAL = 0.9


def full_sequences(users: int, last_n: int, num_items: int, seed: int = 0):
    """A log where every user has ``2 * last_n`` events over 3 scenarios and the
    mixed sequences (2-D mixing) of all of them: ``users`` full rows of ``last_n``."""
    rng = np.random.default_rng(seed)
    per = 2 * last_n
    n = users * per
    log = EventLog.from_arrays(
        np.repeat(np.arange(users), per), rng.integers(0, num_items, n),
        rng.integers(0, 3, n), rng.integers(0, 16, n),
        1_700_000_000 + rng.integers(0, 30 * 86400, n), num_users=users,
        scenario_names=["homefeed", "search", "ads"], num_actions=4)
    t_now = np.full(users, 1_700_000_000 + 31 * 86400)
    seq = mix(log, np.arange(users), t_now, MixConfig(policy="2d", last_n=last_n))
    assert (seq.length == last_n).all()
    return seq


def timed(fn) -> "tuple[float, float]":
    """(wall, CPU) seconds of one call."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--batch", type=int, default=16, help="users per forward")
    ap.add_argument("--last-n", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads "
                    "(0: torch's default)")
    ap.add_argument("--model", default=None, help="local HF checkpoint (default: MiniLM)")
    ap.add_argument("--num-items", type=int, default=100_000)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModel

    cfg = UserTowerConfig(model_path=args.model, num_items=args.num_items, num_scenarios=3,
                          num_actions=4, last_n=args.last_n, interests_per_scenario=3)
    torch.manual_seed(0)
    tower = UserTower(cfg).eval()
    bare = AutoModel.from_pretrained(cfg.resolved_model_path(), local_files_only=True,
                                     dtype=torch.float32).eval()
    K = tower.num_interests
    tokens = args.last_n + K
    kjt = full_sequences(args.batch, args.last_n, args.num_items).to_kjt(SEQ_FEATURES)
    vocab = int(bare.config.vocab_size)
    ids = torch.randint(1000, vocab, (args.batch, tokens), generator=torch.Generator()
                        .manual_seed(0))
    mask = torch.ones(args.batch, tokens, dtype=torch.long)

    def run_tower():
        return tower(kjt)

    def run_bare():
        return bare(input_ids=ids, attention_mask=mask).last_hidden_state

    with torch.inference_mode():
        out = run_tower()
        assert out.shape == (args.batch, K, tower.dim)
        run_bare()
        times = {"tower": [], "bare": []}
        for _ in range(args.rounds):
            times["tower"].append(timed(run_tower))
            times["bare"].append(timed(run_bare))
    res = {}
    for i, clock in enumerate(("wall", "cpu")):
        t_tower = [x[i] for x in times["tower"]]
        t_bare = [x[i] for x in times["bare"]]
        # tower users/s over bare users/s, per round
        ratio = statistics.median([b / t for t, b in zip(t_tower, t_bare)])
        med_t, med_b = statistics.median(t_tower), statistics.median(t_bare)
        res[clock] = {"tower_users_per_s": args.batch / med_t,
                      "bare_users_per_s": args.batch / med_b, "ratio": ratio,
                      "tower_seconds": t_tower, "bare_seconds": t_bare}
        print(f"[{clock:4s}] user tower {args.batch / med_t:7.1f} users/s, bare HF LM "
              f"{args.batch / med_b:7.1f} users/s ({tokens} positions per user): "
              f"ratio {ratio:.3f}x")
    ratio = res["cpu"]["ratio"]
    print(f"ratio tower / bare (CPU time) = {ratio:.3f}x  (goal >= {GOAL}x: "
          f"{'ok' if ratio >= GOAL else 'BELOW GOAL'})")
    write_result("redrec_tower", {
        "goal": f"user-tower users/s >= {GOAL}x the bare HF encoder forward on the same "
                "token count",
        "model": str(cfg.resolved_model_path()), "batch_users": args.batch,
        "last_n": args.last_n, "interests": K, "positions_per_user": tokens,
        "rounds": args.rounds, "threads": torch.get_num_threads(), "ratio": ratio,
        "meets_goal": ratio >= GOAL, **res}, args.out)


if __name__ == "__main__":
    main()
