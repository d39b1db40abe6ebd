"""Embedded item store in one SQLite file (WAL mode), the measured alternative to the
memory-mapped default (numbers in :mod:`torchrec_mm.serving.store`).

Tables::

    meta(key TEXT PRIMARY KEY, value TEXT)            'schema' -> the schema JSON
    versions(code INTEGER PRIMARY KEY, name TEXT UNIQUE)
    records(id INTEGER PRIMARY KEY, version INTEGER, f_<field> BLOB, ...)

A put is one ``BEGIN IMMEDIATE`` … ``COMMIT`` transaction (``INSERT OR REPLACE``), so
a reader sees a batch whole or not at all, concurrent writers queue on SQLite's lock
(``busy_timeout``), and a writer killed mid-put leaves only uncommitted WAL frames,
which SQLite ignores. ``sync=True`` uses ``synchronous=FULL`` (power-loss durable),
``sync=False`` ``NORMAL`` (atomic and consistent, the last commits may be lost on
power loss). Lookups are ``WHERE id IN (...)`` on the primary key, chunked below
SQLite's host-parameter limit.
"""

import os
import sqlite3
import threading
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from torchrec_mm.data.schema import DataError
from torchrec_mm.serving.backend import StoreBackend
from torchrec_mm.serving.schema import StoreSchema

BACKEND_NAME = "sqlite"
_MAX_PARAMS = 32000 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999
BUSY_TIMEOUT_MS = 60_000


def _rows(arr: np.ndarray) -> List[bytes]:
    """Per-record bytes of a ``[n, ...]`` array."""
    n = arr.shape[0]
    if n == 0:
        return []
    buf = np.ascontiguousarray(arr).tobytes()
    w = len(buf) // n
    return [buf[i:i + w] for i in range(0, len(buf), w)]


class SQLiteBackend(StoreBackend):
    """See the module docstring.

    Args:
        path: the database file.
        schema: required to create the store; checked against the stored one if given.
        create: make the store if the file does not exist.
        readonly: open with ``mode=ro``.
        sync: ``synchronous=FULL`` (else ``NORMAL``).
    """

    def __init__(self, path: str, schema: Optional[StoreSchema] = None, create: bool = True,
                 readonly: bool = False, sync: bool = True) -> None:
        self.path = os.path.abspath(path)
        self.location = self.path
        self.readonly = readonly
        self._tlock = threading.RLock()
        self._closed = False
        exists = os.path.exists(self.path)
        if not exists and (not create or readonly):
            raise FileNotFoundError(f"{self.path} not found: no item store there")
        if not exists and schema is None:
            raise ValueError(f"{self.path}: no item store here; pass a schema to create one")
        if not exists:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.sync = sync
        self._pid = os.getpid()
        self._conn = self._connect()
        stored = self._read_schema()
        if stored is None:
            if schema is None or readonly:
                raise ValueError(f"{self.path}: not an item store (no schema in table meta)")
            self._create(schema)
            stored = self._read_schema()
        assert stored is not None
        if schema is not None:
            schema.check_same(stored, self.path)
        self.schema = stored
        self._cols = {f: f"f_{f}" for f in stored.names}
        self._version_names: Dict[int, str] = {}
        self._before_commit: Optional[Callable[[], None]] = None  # test hook

    def _connect(self) -> sqlite3.Connection:
        uri = f"file:{self.path}?mode=ro" if self.readonly else f"file:{self.path}"
        c = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False,
                            timeout=BUSY_TIMEOUT_MS / 1000)
        c.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        if not self.readonly:
            c.execute("PRAGMA journal_mode=WAL")
        c.execute(f"PRAGMA synchronous={'FULL' if self.sync else 'NORMAL'}")
        return c

    def _guard(self) -> "threading.RLock":
        """The thread lock; in a forked child, first opens a new connection (an SQLite
        connection must not be used across fork; the inherited one is left alone)."""
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._tlock = threading.RLock()
            if not self._closed:
                self._conn = self._connect()
        return self._tlock

    def _read_schema(self) -> Optional[StoreSchema]:
        try:
            row = self._conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return None
            raise
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{self.path}: not an SQLite item store ({e})") from None
        return None if row is None else StoreSchema.from_json(row[0], self.path)

    def _create(self, schema: StoreSchema) -> None:
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            c.execute("CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT)")
            c.execute("CREATE TABLE IF NOT EXISTS versions("
                      "code INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL)")
            cols = ", ".join(f"f_{f} BLOB NOT NULL" for f in schema.names)
            c.execute(f"CREATE TABLE IF NOT EXISTS records(id INTEGER PRIMARY KEY, "
                      f"version INTEGER NOT NULL, {cols})")
            c.execute("INSERT OR IGNORE INTO meta VALUES('schema', ?)", (schema.to_json(),))
            c.execute("INSERT OR IGNORE INTO meta VALUES('backend', ?)", (BACKEND_NAME,))
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def _check(self, write: bool = False) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: the item store is closed")
        if write and self.readonly:
            raise ValueError(f"{self.path}: the item store was opened read-only")

    # ------------------------------------------------------------------ writes
    def put(self, ids: np.ndarray, values: Dict[str, np.ndarray], version: bytes) -> None:
        with self._guard():
            self._check(write=True)
            columns = [_rows(values[f]) for f in self.schema.names]
            params = zip(ids.tolist(), *columns)
            names = ", ".join(self._cols[f] for f in self.schema.names)
            marks = ", ".join("?" * len(self.schema.names))
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                name = version.decode("utf-8")
                c.execute("INSERT OR IGNORE INTO versions(name) VALUES(?)", (name,))
                (code,) = c.execute("SELECT code FROM versions WHERE name=?", (name,)).fetchone()
                c.executemany(f"INSERT OR REPLACE INTO records(id, version, {names}) "
                              f"VALUES(?, {code}, {marks})", params)
                if self._before_commit is not None:
                    self._before_commit()
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise

    def delete(self, ids: np.ndarray) -> int:
        with self._guard():
            self._check(write=True)
            c = self._conn
            removed = 0
            c.execute("BEGIN IMMEDIATE")
            try:
                for s in range(0, ids.size, _MAX_PARAMS):
                    chunk = ids[s:s + _MAX_PARAMS].tolist()
                    cur = c.execute(f"DELETE FROM records WHERE id IN "
                                    f"({','.join('?' * len(chunk))})", chunk)
                    removed += cur.rowcount
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise
            return removed

    # ------------------------------------------------------------------- reads
    def _version_name(self, code: int) -> str:
        if code not in self._version_names:
            self._version_names = dict(self._conn.execute("SELECT code, name FROM versions"))
        return self._version_names[code]

    def get(self, ids: np.ndarray, fields: List[str], with_versions: bool = False
            ) -> Tuple[Dict[str, np.ndarray], np.ndarray, Optional[np.ndarray]]:
        with self._guard():
            self._check()
            uniq, inverse = np.unique(ids, return_inverse=True)
            cols = ", ".join(["id", "version"] + [self._cols[f] for f in fields])
            rows: List[tuple] = []
            c = self._conn
            c.execute("BEGIN")  # one snapshot for all chunks
            try:
                for s in range(0, uniq.size, _MAX_PARAMS):
                    chunk = uniq[s:s + _MAX_PARAMS].tolist()
                    rows += c.execute(f"SELECT {cols} FROM records WHERE id IN "
                                      f"({','.join('?' * len(chunk))})", chunk).fetchall()
            finally:
                c.execute("COMMIT")
        got = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        order = np.argsort(got)
        got = got[order]
        pos = np.searchsorted(got, uniq)
        ufound = pos < got.size
        ufound[ufound] = got[pos[ufound]] == uniq[ufound]
        found = ufound[inverse]
        src = np.zeros(ids.size, dtype=np.int64)  # row of each requested position
        src[found] = order[pos[inverse[found]]]
        out = {}
        for j, f in enumerate(fields):
            spec = self.schema[f]
            arr = np.zeros((ids.size,) + spec.shape, dtype=spec.storage_dtype)
            if rows:
                blobs = [r[2 + j] for r in rows]
                buf = b"".join(blobs)
                if len(buf) != len(rows) * spec.nbytes:
                    bad = next(r[0] for r in rows if len(r[2 + j]) != spec.nbytes)
                    raise DataError(self.path, f"item {bad}", f,
                                    f"stored value has the wrong size (expected "
                                    f"{spec.nbytes} bytes for {spec.describe()})")
                table = np.frombuffer(buf, dtype=spec.storage_dtype).reshape(
                    (len(rows),) + spec.shape)
                arr[found] = table[src[found]]
            out[f] = arr
        versions = None
        if with_versions:
            codes = np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows))
            names = np.array([self._version_name(int(k)) for k in np.unique(codes)] + [None],
                             dtype=object)
            per_row = np.searchsorted(np.unique(codes), codes)
            versions = np.full(ids.size, None, dtype=object)
            versions[found] = names[per_row[src[found]]]
        return out, found, versions

    def count(self) -> int:
        with self._guard():
            self._check()
            return int(self._conn.execute("SELECT COUNT(*) FROM records").fetchone()[0])

    def ids(self) -> np.ndarray:
        with self._guard():
            self._check()
            cur = self._conn.execute("SELECT id FROM records ORDER BY id")
            return np.fromiter((r[0] for r in cur), dtype=np.int64)

    def close(self) -> None:
        with self._guard():
            if not self._closed:
                self._closed = True
                self._conn.close()
