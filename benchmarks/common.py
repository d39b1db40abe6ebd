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


def interleaved_median_times(fns: Dict[str, Callable[[], Any]], repeat: int = 5,
                             warmup: int = 1, inner: int = 1) -> Dict[str, float]:
    """Median seconds per call of every ``fns[name]``, timed round-robin: each of the
    ``repeat`` rounds times ``inner`` calls of every function in turn, so a slow spell
    of a shared machine falls on all of them alike and their ratios stay comparable."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t) / inner)
    return {name: statistics.median(ts) for name, ts in times.items()}


def train_step(model: Any, opt: Any, batch: Any) -> Callable[[], None]:
    """One training step of ``model`` (``forward(batch) -> (loss, ...)``) with ``opt``,
    as a function of no arguments (for the timers above)."""
    def step() -> None:
        loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


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
