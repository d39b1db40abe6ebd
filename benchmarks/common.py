"""Shared helpers of the benchmarks: timing by median of repeats, JSON results.

Every benchmark measures its baseline in the same run and prints ratios: absolute
times on shared CI machines mean little.
"""

import json
import os
import platform
import statistics
import time
from typing import Any, Callable, Dict, List

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def median_time(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1,
                inner: int = 1) -> float:
    """Median seconds of ``inner`` calls of ``fn`` over ``repeat`` repeats."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t) / inner)
    return statistics.median(times)


def write_result(name: str, result: Dict[str, Any], out: str = "") -> str:
    """Writes ``result`` (plus machine info) as JSON; returns the path."""
    path = out or os.path.join(RESULTS_DIR, f"{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    payload = {"benchmark": name, "machine": {
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__}, **result}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
    print(f"results: {path}")
    return path
