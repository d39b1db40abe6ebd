"""RED-Rec sequence mixing: vectorised ``mix`` vs the per-user Python reference.

Generates a synthetic 3-scenario log (homefeed / search / ads, ~300k interactions,
``torchrec_mm.data.synth``) in a temporary directory. For a batch of 4096 users it
builds ``last_n = 128`` mixed sequences with every policy, using both
:func:`~torchrec_mm.redrec.sequences.mix` and
:func:`~torchrec_mm.redrec.sequences.mix_reference`. It checks that the two outputs
are identical and prints the speed-up (goal: >= 20x). There are two kinds of cutoff:

* ``latest``: ``t_now`` after the user's last event (serving: the most recent N
  events of the whole history);
* ``random``: ``t_now`` is one of the user's own event times, drawn at random (the
  evaluation protocol; histories are about half as long).

Times are CPU seconds of this process (``time.process_time``), in several rounds that
alternate the two implementations, with medians taken. The machine is shared, and
wall-clock ratios there swing by 2x. The wall-clock time of ``mix`` is recorded
too. About half the cost of ``mix`` is writing the padded ``[B, N]`` outputs into
fresh memory (page faults), so it depends little on history length. The
reference's cost grows with it.

Run: ``python benchmarks/bench_redrec_mixing.py [--out PATH] [--users 4096]``.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median_time, write_result  # noqa: E402

from torchrec_mm.data.synth import SynthConfig, generate  # noqa: E402
from torchrec_mm.redrec.sequences import (  # noqa: E402
    POLICIES,
    EventLog,
    MixConfig,
    MixedSequences,
    mix,
    mix_reference,
)

GOAL = 20.0


def _same(a: MixedSequences, b: MixedSequences) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f))
               for f in MixedSequences._PADDED + ("length",))


def cpu_time(fn: Callable[[], Any], inner: int) -> float:
    """CPU seconds of this process per call of ``fn`` (mean of ``inner`` calls)."""
    t = time.process_time()
    for _ in range(inner):
        fn()
    return (time.process_time() - t) / inner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--users", type=int, default=4096, help="batch size B")
    ap.add_argument("--interactions", type=int, default=300_000)
    ap.add_argument("--last-n", type=int, default=128)
    ap.add_argument("--policies", nargs="*", default=list(POLICIES))
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds (medians)")
    args = ap.parse_args()

    num_users = max(args.users, 4096)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "synth")
        t = time.perf_counter()
        generate(SynthConfig(num_users=num_users, num_items=20_000,
                             num_interactions=args.interactions, seed=0), data)
        t_gen = time.perf_counter() - t
        t = time.perf_counter()
        log = EventLog.from_dataset(data)
        t_load = time.perf_counter() - t
    print(f"log: {log.num_events} events, {log.num_users} users, scenarios "
          f"{log.scenario_names} (generate {t_gen:.1f} s, EventLog {t_load:.2f} s)")

    rng = np.random.default_rng(0)
    counts = np.diff(log.user_offsets)
    users = rng.choice(np.flatnonzero(counts > 0), args.users, replace=False)
    # cutoff: a random event time of the user (events before it form the history)
    pick = log.user_offsets[users] + (rng.random(args.users) * counts[users]).astype(np.int64)
    cutoffs = {"latest": log.timestamp[log.user_offsets[users + 1] - 1] + 1,
               "random": log.timestamp[pick]}

    results = {}
    for mode, t_now in cutoffs.items():
        for policy in args.policies:
            cfg = MixConfig(policy=policy, last_n=args.last_n)
            fast = mix(log, users, t_now, cfg)
            if not _same(fast, mix_reference(log, users, t_now, cfg)):
                raise SystemExit(f"{mode}/{policy}: mix and mix_reference differ")
            # the machine is shared: time both side by side in several rounds, in CPU
            # time of this process (waiting for a core is not counted), take medians
            refs, fasts = [], []
            for _ in range(args.rounds):
                refs.append(cpu_time(lambda: mix_reference(log, users, t_now, cfg), 1))
                mix(log, users, t_now, cfg)  # warm-up: the reference leaves the heap cold
                fasts.append(cpu_time(lambda: mix(log, users, t_now, cfg), 5))
            t_ref, t_fast = statistics.median(refs), statistics.median(fasts)
            ratio = statistics.median([r / f for r, f in zip(refs, fasts)])
            t_wall = median_time(lambda: mix(log, users, t_now, cfg), repeat=5)
            mean_len = float(fast.length.mean())
            results[f"{mode}/{policy}"] = {
                "vectorised_cpu_ms": t_fast * 1e3, "reference_cpu_ms": t_ref * 1e3,
                "vectorised_wall_ms": t_wall * 1e3, "speedup": ratio,
                "mean_length": mean_len, "users_per_cpu_s": args.users / t_fast}
            print(f"{mode:6s} {policy:12s} B={args.users} N={args.last_n}: vectorised "
                  f"{t_fast*1e3:7.2f} ms  reference {t_ref*1e3:8.1f} ms  speed-up "
                  f"{ratio:6.1f}x  (mean length {mean_len:5.1f}) "
                  f"{'ok' if ratio >= GOAL else 'BELOW GOAL'}")
    write_result("redrec_mixing", {
        "goal": f"vectorised mix >= {GOAL:.0f}x the per-user reference",
        "data": {"generator": "torchrec_mm.data.synth", "events": log.num_events,
                 "users": log.num_users, "scenarios": log.scenario_names},
        "batch_users": args.users, "last_n": args.last_n, "results": results}, args.out)


if __name__ == "__main__":
    main()
