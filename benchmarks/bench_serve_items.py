"""New-item latency of ``torchrec-mm serve-items`` end to end — ``POST /items`` until
the records are visible to a reader of both item stores (IDProxy ``p_coarse``/``z``,
QARM ``vq``/``rq``) — p50/p95, and items/s under load, against the bare encoder
forward on the same items.

The service runs as its own process (the CLI, ``--http-port 0``, embedded mmap
stores, ``sync`` as given); the benchmark process is the client and a reader that
polls ``ItemStore.contains`` of both stores (as the ranker would look new ids up).

* **latency**: ``--items`` new items (catalogue texts under new ids), one request each
  (``?wait=0``), the service idle between them: time from sending the request until
  both stores hold the record (polled every 1 ms); p50 / p95.
* **throughput**: ``--rounds`` rounds of ``--load-items`` new items in requests of 16
  from 4 client threads (``wait=1``): items/s until the last request is answered (its
  records written); median over rounds.
* **baselines** on the same items with the same torch threads, run in the benchmark
  process *interleaved* with the service's requests (item by item, round by round;
  the machine is shared): (a) the models' own calls a library user makes,
  ``ProxyGenerator.generate`` + ``AlignedRepresenter.represent`` +
  ``QARMCodes.assign_new`` (one item per call for latency; batches of the service's
  ``--batch-size`` for throughput); (b) the bare Hugging Face forward (tokenizer +
  ``AutoModel(..., output_hidden_states=True)``) of each of the two encoders. Ratios =
  service / baseline (latency: > 1 is the cost of serving; items/s: < 1).

Artefacts: those of ``torchrec-mm demo`` (``--demo-out``, default ``out/demo``:
``idproxy/``, ``qarm/aligned``, ``qarm/codes``, ``data/``), or given one by one; when
there are none, small ones are built first with the bundled MiniLM (a 400-item
synthetic dataset, one epoch of ``idproxy fit`` and of a frozen-encoder ``qarm
align``, about a minute) — latency depends on the encoders, not on their training.

Run: ``python benchmarks/bench_serve_items.py [--demo-out out/demo] [--threads 1]
[--out PATH]`` (default ``benchmarks/results/serve_items.json``; ~3 min with the
demo's artefacts).
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_result  # noqa: E402

from torchrec_mm.serving.store import ItemStore  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def post(base: str, items: List[Dict[str, Any]], wait: bool) -> int:
    req = urllib.request.Request(f"{base}/items{'' if wait else '?wait=0'}",
                                 data=json.dumps(items).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        r.read()
        return r.status


def percentile(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def start_service(args: argparse.Namespace, root: str) -> Any:
    cmd = [sys.executable, "-m", "torchrec_mm.serving.cli", "serve-items",
           "--idproxy", args.idproxy, "--idproxy-store", os.path.join(root, "px"),
           "--qarm-align", args.qarm_align, "--qarm-codes", args.qarm_codes,
           "--qarm-store", os.path.join(root, "qarm"), "--z-rank", str(args.z_rank),
           "--http-port", "0", "--batch-size", str(args.batch_size),
           "--queue-items", "4096"] + (["--no-sync"] if args.no_sync else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = open(os.path.join(root, "service.log"), "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    base = None
    while time.monotonic() < deadline and proc.poll() is None:
        log.seek(0)
        text = log.read()
        m = re.search(r"listening on (http://[0-9.]+:\d+)", text)
        if m and "serve-items: ready" in text:
            base = m.group(1)
            break
        time.sleep(0.1)
    if base is None:
        log.seek(0)
        raise RuntimeError(f"serve-items did not start:\n{log.read()[-3000:]}")
    return proc, base


class Baselines:
    """(a) the models' calls a library user makes; (b) bare HF forwards of both
    encoders. Loaded in the benchmark process, run between the service's requests."""

    def __init__(self, args: argparse.Namespace) -> None:
        from transformers import AutoModel, AutoTokenizer

        from torchrec_mm.idproxy.generate import ProxyGenerator
        from torchrec_mm.qarm.codes import load_codes
        from torchrec_mm.qarm.represent import AlignedRepresenter

        self.gen = ProxyGenerator.load(args.idproxy, batch_size=args.batch_size)
        self.rep = AlignedRepresenter.load(args.qarm_align, batch_size=args.batch_size)
        self.codes = load_codes(args.qarm_codes)
        self.codes.vq_codebook("flat").index
        self.bare = []
        for enc in (self.gen.coarse.encoder, self.rep.encoder):
            path = enc.config.model_path
            self.bare.append((AutoTokenizer.from_pretrained(path),
                              AutoModel.from_pretrained(path).eval(), enc.max_length))

    def models(self, batch: List[str]) -> None:
        self.gen.generate(batch)
        self.codes.assign_new(self.rep.represent(batch))

    @torch.inference_mode()
    def bare_hf(self, batch: List[str]) -> None:
        for tok, model, max_len in self.bare:
            x = tok(batch, return_tensors="pt", padding=True, truncation=True,
                    max_length=max_len)
            model(**x, output_hidden_states=True)


def timed(fn: Any, *a: Any) -> float:
    t = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t


def measure(args: argparse.Namespace, texts: List[str], first_id: int) -> Dict[str, Any]:
    """Service and baselines interleaved item by item (latency) and round by round
    (throughput), so that all see the same machine load."""
    base_fns = Baselines(args)
    root = tempfile.mkdtemp(prefix="bench-serve-items-")
    proc, base = start_service(args, root)
    lat: Dict[str, List[float]] = {"service": [], "models": [], "bare_hf": []}
    ips: Dict[str, List[float]] = {"service": [], "models": [], "bare_hf": []}
    try:
        readers = [ItemStore.open(os.path.join(root, "px"), readonly=True),
                   ItemStore.open(os.path.join(root, "qarm"), readonly=True)]
        post(base, [{"item_id": first_id - 1 - i, "text": t} for i, t in enumerate(texts[:4])],
             wait=True)  # warm-up
        base_fns.models(texts[:4])
        base_fns.bare_hf(texts[:4])
        n = min(args.items, len(texts))
        next_id = first_id
        for i in range(n):
            ids = np.array([next_id])
            t = time.perf_counter()
            post(base, [{"item_id": next_id, "text": texts[i]}], wait=False)
            while not all(bool(r.contains(ids)[0]) for r in readers):
                time.sleep(0.001)
            lat["service"].append(time.perf_counter() - t)
            next_id += 1
            lat["models"].append(timed(base_fns.models, [texts[i]]))
            lat["bare_hf"].append(timed(base_fns.bare_hf, [texts[i]]))
        m = args.load_items
        for r in range(args.rounds):
            load = [texts[(r * m + i) % len(texts)] for i in range(m)]
            items = [{"item_id": next_id + i, "text": t} for i, t in enumerate(load)]
            next_id += m
            chunks = [items[i:i + 16] for i in range(0, m, 16)]
            lock = threading.Lock()

            def client() -> None:
                while True:
                    with lock:
                        if not chunks:
                            return
                        c = chunks.pop()
                    post(base, c, wait=True)

            t = time.perf_counter()
            threads = [threading.Thread(target=client) for _ in range(4)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            ips["service"].append(m / (time.perf_counter() - t))
            ids = np.array([it["item_id"] for it in items])
            assert all(bool(rd.contains(ids).all()) for rd in readers), "records missing"
            for name in ("models", "bare_hf"):
                fn = getattr(base_fns, name)
                dt = sum(timed(fn, load[s:s + args.batch_size])
                         for s in range(0, m, args.batch_size))
                ips[name].append(m / dt)
        for rd in readers:
            rd.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(root, ignore_errors=True)
    return {name: {"latency_p50_ms": 1e3 * percentile(lat[name], 50),
                   "latency_p95_ms": 1e3 * percentile(lat[name], 95),
                   "items_per_s": statistics.median(ips[name])} for name in lat}


def build_artefacts(root: str) -> Dict[str, str]:
    """Small IDProxy / QARM artefacts with the bundled MiniLM (see the module doc)."""
    from torchrec_mm.data.synth import SynthConfig, generate
    from torchrec_mm.idproxy.coarse import CoarseFitConfig, fit_coarse
    from torchrec_mm.idproxy.targets import make_targets
    from torchrec_mm.qarm.align import AlignConfig, align_items
    from torchrec_mm.qarm.codes import (RQConfig, VQConfig, build_codes,
                                        load_representations, save_codes)

    n = 400
    out = {"data": os.path.join(root, "data"), "idproxy": os.path.join(root, "idproxy"),
           "qarm_align": os.path.join(root, "aligned"), "qarm_codes": os.path.join(root, "codes")}
    generate(SynthConfig(num_users=100, num_items=n, num_interactions=4000), out["data"])
    g = torch.Generator().manual_seed(0)
    targets = make_targets(torch.randn(n, 16, generator=g), np.full(n, 10), tau=5,
                           name="random")
    fit_coarse(out["data"], None, out["idproxy"], CoarseFitConfig(
        trainable_layers=1, epochs=1, batch_size=32, max_length=64, group_sample=64,
        basis_rank=32), progress=True, targets=targets)
    rng = np.random.default_rng(0)
    align_items(out["data"], out["qarm_align"], AlignConfig(
        trainable_layers=0, dim=64, epochs=1, max_length=64, recall_ks=(10,)),
        pairs={"a": rng.integers(0, n, 2000), "b": rng.integers(0, n, 2000)}, progress=True)
    reps, has = load_representations(os.path.join(out["qarm_align"], "aligned.safetensors"))
    save_codes(build_codes(reps, has, VQConfig(k=25), RQConfig(levels=6, codebook_size=32),
                           progress=False), out["qarm_codes"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo-out", default="out/demo")
    ap.add_argument("--idproxy", default=None)
    ap.add_argument("--qarm-align", default=None)
    ap.add_argument("--qarm-codes", default=None)
    ap.add_argument("--data", default=None, help="dataset whose texts are sent")
    ap.add_argument("--z-rank", type=int, default=32)
    ap.add_argument("--items", type=int, default=60, help="items of the latency test")
    ap.add_argument("--load-items", type=int, default=256, help="items per load round")
    ap.add_argument("--rounds", type=int, default=3, help="load rounds (median)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-sync", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    d = args.demo_out
    args.idproxy = args.idproxy or os.path.join(d, "idproxy")
    args.qarm_align = args.qarm_align or os.path.join(d, "qarm", "aligned")
    args.qarm_codes = args.qarm_codes or os.path.join(d, "qarm", "codes")
    args.data = args.data or os.path.join(d, "data")
    built = None
    if not all(os.path.exists(p) for p in (args.idproxy, args.qarm_align, args.qarm_codes,
                                           args.data)):
        built = tempfile.mkdtemp(prefix="bench-serve-items-art-")
        print(f"no demo artefacts in {d}: building small ones in {built}")
        art = build_artefacts(built)
        args.idproxy, args.qarm_align = art["idproxy"], art["qarm_align"]
        args.qarm_codes, args.data = art["qarm_codes"], art["data"]
    from torchrec_mm.content.encode_job import read_items

    items = read_items(args.data)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(items.texts))
    texts = [items.texts[i] for i in order if items.texts[i].strip()]
    first_id = items.num_items + 1000  # brand-new ids
    res = measure(args, texts, first_id)
    service, base = res["service"], {k: res[k] for k in ("models", "bare_hf")}
    result = {
        "threads": args.threads, "batch_size": args.batch_size, "sync": not args.no_sync,
        "latency_items": min(args.items, len(texts)), "load_items": args.load_items,
        "rounds": args.rounds,
        "artefacts": {"idproxy": args.idproxy, "qarm_align": args.qarm_align,
                      "qarm_codes": args.qarm_codes},
        "text_chars_mean": float(np.mean([len(t) for t in texts[:args.items]])),
        "service": service, "baseline": base,
        "ratios": {
            "latency_p50_vs_models": service["latency_p50_ms"] / base["models"]["latency_p50_ms"],
            "latency_p50_vs_bare_hf": service["latency_p50_ms"] / base["bare_hf"]["latency_p50_ms"],
            "items_per_s_vs_models": service["items_per_s"] / base["models"]["items_per_s"],
            "items_per_s_vs_bare_hf": service["items_per_s"] / base["bare_hf"]["items_per_s"],
        },
    }
    s, b = service, base
    print(f"service: POST -> visible p50 {s['latency_p50_ms']:.1f} ms, p95 "
          f"{s['latency_p95_ms']:.1f} ms; {s['items_per_s']:.1f} items/s under load")
    for name in ("models", "bare_hf"):
        print(f"{name:>8}: 1 item {b[name]['latency_p50_ms']:.1f} ms (p50); batches of "
              f"{args.batch_size}: {b[name]['items_per_s']:.1f} items/s")
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in result["ratios"].items()))
    result["artefacts"]["built"] = built is not None
    write_result("serve_items", result, args.out)
    if built:
        shutil.rmtree(built, ignore_errors=True)


if __name__ == "__main__":
    main()
