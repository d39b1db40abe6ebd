"""Test and benchmark helpers of the item store: a throw-away ``redis-server`` and a
writer process whose records can be checked for torn writes.

``python -m torchrec_mm.serving.testing LOCATION --writer W --batches K`` puts ``K``
batches; batch ``k`` writes the ids ``[k*B, (k+1)*B)`` plus the shared ids
``SHARED + [0, S)`` with values derived from ``(writer, batch, id)`` and version
``"w<W>b<k>"``, printing ``DONE k`` after each put. :func:`check_records` recomputes
every record from its version, so a record mixing two puts (a torn write) is caught.
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from torchrec_mm.serving.schema import StoreSchema

# fields large enough that a record spans several cache lines / a page boundary
TEST_SCHEMA = StoreSchema.of(p=("float32", (16,)), z=("float16", (4, 64)), codes=("int32", (6,)))
SHARED = 1_000_000


def redis_server_binary() -> Optional[str]:
    """Path of ``redis-server`` (Debian puts it in /usr/bin), or None."""
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if os.path.exists(p)),
        None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A ``redis-server`` child process bound to 127.0.0.1 on a free port, with its data
    (AOF, ``appendfsync`` as given) in ``directory`` (a temp dir by default).

    Example::

        with RedisServer() as server:
            store = ItemStore.open(server.url("items"), schema)
            server.stop(kill=True); server.start()      # data survive (AOF)
    """

    def __init__(self, directory: Optional[str] = None, port: Optional[int] = None,
                 appendfsync: str = "always", binary: Optional[str] = None) -> None:
        self.binary = binary or redis_server_binary()
        if self.binary is None:
            raise FileNotFoundError("redis-server not found (Debian: apt-get install "
                                    "redis-server)")
        self._own_dir = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="torchrec-mm-redis-")
        os.makedirs(self.directory, exist_ok=True)
        self._fixed_port = port is not None
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.proc: Optional[subprocess.Popen] = None

    def url(self, namespace: str = "torchrec-mm:items", db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}?namespace={namespace}"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        for attempt in range(3):
            log = open(os.path.join(self.directory, "redis.log"), "ab")
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--dir", self.directory, "--appendonly", "yes",
                 "--appendfsync", self.appendfsync, "--save", "", "--daemonize", "no",
                 "--protected-mode", "yes", "--io-threads", "1"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            log.close()
            if self._wait_ready(timeout):
                self._fixed_port = True  # restarts keep the port (clients know it)
                return self
            self.stop(kill=True)
            if self._fixed_port:
                break
            self.port = free_port()  # somebody took the port: try another
        raise RuntimeError(f"redis-server did not start on 127.0.0.1:{self.port}; see "
                           f"{os.path.join(self.directory, 'redis.log')}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def stop(self, kill: bool = False) -> None:
        """Stops the server: SIGTERM (graceful) or SIGKILL (a crash)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "RedisServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------- checkable records


def record_values(ids: np.ndarray, writer: int, batch: int) -> Dict[str, np.ndarray]:
    """Values of TEST_SCHEMA derived from (writer, batch, id); all exact in their dtypes."""
    ids = np.asarray(ids, dtype=np.int64)
    base = (batch * 10 + writer) % 997
    p = (base * 1000 + (ids % 1000))[:, None] + np.arange(16)[None, :]
    z = ((base + ids % 1009)[:, None, None] + np.arange(64)[None, None, :] * 3
         + np.arange(4)[None, :, None]) % 2048
    codes = np.stack([np.full(ids.size, writer), np.full(ids.size, batch), ids % 100_000,
                      np.full(ids.size, base), ids % 7, np.full(ids.size, -1)], axis=1)
    return {"p": p.astype(np.float32), "z": z.astype(np.float16),
            "codes": codes.astype(np.int32)}


def parse_version(version: str) -> Tuple[int, int]:
    w, b = version[1:].split("b")
    return int(w), int(b)


def check_records(values: Dict[str, np.ndarray], found: np.ndarray,
                  versions: np.ndarray, ids: np.ndarray) -> int:
    """Asserts that every found record equals :func:`record_values` of its version;
    returns how many were found."""
    rows = np.flatnonzero(found)
    for v in set(versions[rows].tolist()):
        sel = rows[versions[rows] == v]
        w, b = parse_version(v)
        want = record_values(ids[sel], w, b)
        for f, a in want.items():
            got = np.asarray(values[f])[sel]
            if not np.array_equal(got.astype(np.float64), a.astype(np.float64)):
                bad = sel[int(np.flatnonzero(
                    (got.reshape(sel.size, -1) != a.reshape(sel.size, -1)).any(1))[0])]
                raise AssertionError(f"item {int(ids[bad])}: field {f!r} does not match its "
                                     f"version {v!r}: a torn or mixed record")
    return int(rows.size)


def batch_ids(batch: int, batch_size: int, shared: int) -> np.ndarray:
    own = np.arange(batch * batch_size, (batch + 1) * batch_size, dtype=np.int64)
    return np.concatenate([own, SHARED + np.arange(shared, dtype=np.int64)])


def _main(argv: Optional[List[str]] = None) -> int:
    from torchrec_mm.serving.store import ItemStore

    ap = argparse.ArgumentParser(description="item-store test writer")
    ap.add_argument("location")
    ap.add_argument("--writer", type=int, default=0)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--first", type=int, default=0, help="first batch number")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--shared", type=int, default=64)
    ap.add_argument("--hang-at", type=int, default=-1,
                    help="batch whose put stops after writing its data, before the "
                         "commit, printing MID (to be killed there)")
    ap.add_argument("--no-sync", action="store_true")
    args = ap.parse_args(argv)
    store = ItemStore.open(args.location, TEST_SCHEMA, sync=not args.no_sync)
    for k in range(args.first, args.first + args.batches):
        ids = batch_ids(k, args.batch_size, args.shared)
        if k == args.hang_at:
            def hang() -> None:
                print("MID", flush=True)
                time.sleep(600)
            store.backend._before_commit = hang  # type: ignore[attr-defined]
        store.put(ids, record_values(ids, args.writer, k), version=f"w{args.writer}b{k}")
        print(f"DONE {k}", flush=True)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
