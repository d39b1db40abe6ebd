"""Length-bucketed vs naive batching of the content encoder (MiniLM, CPU).

Encodes the same items (texts of the synthetic dataset: short titles to a few hundred
words, log-normal) twice with ``ContentEncoder.encode_texts``: **naive** = batches in
item order, each padded to its longest prompt; **bucketed** = items sorted by prompt
length, contiguous batches padded only to their own max, results put back in item
order. Prints items/s of both and the ratio (goal ≥ 1.3×), checks that both give the
same vectors, and writes a JSON result. Repeats are interleaved (naive, bucketed, naive,
...) so that both modes see the same load on a shared machine; the number of padded
tokens each mode feeds the model is reported too (machine-independent). One torch thread
by default (``--threads``): with 2 threads on 2 cores shared with other jobs, the
OpenMP barriers of short batches stall and the timing stops reflecting the work.

Run: ``python benchmarks/bench_encode_bucketing.py [--items 512] [--out PATH]``
(default ``benchmarks/results/encode_bucketing.json``; about a minute on 2 cores).
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_result  # noqa: E402

from torchrec_mm.content.encoder import ContentEncoder, ContentEncoderConfig  # noqa: E402


def synthetic_texts(n: int, seed: int) -> tuple:
    """Item texts of the synthetic dataset generator (or a log-normal fallback)."""
    try:
        import pyarrow.parquet as pq

        from torchrec_mm.data.synth import SynthConfig, generate

        with tempfile.TemporaryDirectory() as d:
            generate(SynthConfig(num_users=20, num_items=n, num_interactions=200, seed=seed),
                     os.path.join(d, "synth"))
            texts = pq.read_table(os.path.join(d, "synth", "items.parquet"),
                                  columns=["text"]).column("text").to_pylist()
        return texts, "torchrec_mm.data.synth"
    except ImportError:
        from torchrec_mm.content.testing import item_texts

        return item_texts(n, seed), "torchrec_mm.content.testing.item_texts"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for this run (0: torch's default); 1 by default "
                         "because on a shared machine OpenMP threads waiting for a busy "
                         "core slow the many small ops of short batches most")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    texts, source = synthetic_texts(args.items, args.seed)
    encoder = ContentEncoder(ContentEncoderConfig(max_length=args.max_length))
    _, lengths = encoder.render_prompts(texts)
    print(f"{len(texts)} items from {source}; prompt tokens: median {np.median(lengths):.0f}, "
          f"p90 {np.percentile(lengths, 90):.0f}, max {lengths.max()} "
          f"(max_length {args.max_length}); batch size {args.batch_size}")

    def padded_tokens(order: np.ndarray) -> int:
        batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
        return int(sum(lengths[b].max() * len(b) for b in batches))

    encoder.encode_texts(texts[: args.batch_size], batch_size=args.batch_size)  # warm-up
    modes = {"naive": False, "bucketed": True}
    times = {name: [] for name in modes}
    outputs = {}
    for _ in range(args.repeat):  # interleaved, so both see the same machine load
        for name, bucket in modes.items():
            t = time.perf_counter()
            outputs[name] = encoder.encode_texts(texts, batch_size=args.batch_size, bucket=bucket)
            times[name].append(time.perf_counter() - t)
    results = {}
    for name, bucket in modes.items():
        seconds = float(np.median(times[name]))
        order = np.argsort(-lengths, kind="stable") if bucket else np.arange(len(texts))
        results[name] = {"seconds": seconds, "items_per_s": len(texts) / seconds,
                         "padded_tokens": padded_tokens(order), "all_seconds": times[name]}
        print(f"{name:>9}: {len(texts) / seconds:7.1f} items/s  ({seconds:.2f}s, "
              f"{results[name]['padded_tokens']} tokens incl. padding)")
    ratio = results["bucketed"]["items_per_s"] / results["naive"]["items_per_s"]
    max_diff = max(float((outputs["naive"].fields()[k] - v).abs().max())
                   for k, v in outputs["bucketed"].fields().items())
    token_ratio = results["naive"]["padded_tokens"] / results["bucketed"]["padded_tokens"]
    print(f"speed-up bucketed / naive: {ratio:.2f}x (goal >= 1.3x); padded tokens "
          f"{token_ratio:.2f}x fewer (real tokens {int(lengths.sum())}); "
          f"max |difference| of outputs {max_diff:.2e}")
    write_result("encode_bucketing", {
        "model": encoder.config.model_path, "items": len(texts), "text_source": source,
        "batch_size": args.batch_size, "max_length": args.max_length, "repeat": args.repeat,
        "prompt_tokens": {"median": float(np.median(lengths)),
                          "p90": float(np.percentile(lengths, 90)),
                          "max": int(lengths.max()), "total": int(lengths.sum())},
        "naive": results["naive"], "bucketed": results["bucketed"], "speedup": ratio,
        "padded_token_ratio": token_ratio, "threads": torch.get_num_threads(),
        "goal": 1.3, "meets_goal": bool(ratio >= 1.3), "max_abs_output_diff": max_diff,
    }, args.out)
    if max_diff > 1e-3:
        raise SystemExit(f"bucketed and naive outputs differ by {max_diff}")


if __name__ == "__main__":
    main()
