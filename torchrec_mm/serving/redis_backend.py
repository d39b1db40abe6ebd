"""Online item store on Redis (a single instance or a primary with replicas; not Redis
Cluster: a batch spans hash slots).

Keys of a store with namespace ``NS`` (``redis://host:port/db?namespace=NS``,
default ``torchrec-mm:items``)::

    NS:schema              the schema JSON (SET NX when the store is made)
    NS:ids                 set of the stored ids (decimal)
    NS:v:<id>              the record's version string
    NS:f:<field>:<id>      the field's value: raw little-endian bytes, fixed width

One string key per field (not one hash per id) so that a lookup reads only the fields
asked for with a single ``MGET``. Measured with redis-py on this machine, 4096 ids of
the IDProxy schema (``p_coarse`` 256 B + ``z_groups`` 2304 B): reading ``p_coarse``
alone, MGET of its keys 14 ms vs a pipeline of 4096 ``HMGET`` on a hash per id 48 ms vs
a packed value per id (always every field) 33 ms; reading both fields 45 / 78 / 33 ms.
The plugins mostly read one field at a time, hence a key per field.

* ``get``: the ``MGET`` of each requested field (chunked) in one ``MULTI``/``EXEC``
  pipeline — one round trip per batch, and all fields read from one state (a put
  cannot land between two fields' reads); decoding is one ``join`` +
  ``numpy.frombuffer`` per field.
* ``put`` / ``delete``: one ``MULTI``/``EXEC`` transaction (``MSET`` of every key +
  ``SADD``/``SREM``), so a batch is applied whole or not at all; a client killed while
  sending it leaves nothing (Redis discards an unfinished ``MULTI``).
* Connection errors (refused, reset, timeout, ``LOADING`` after a restart) are retried
  with exponential backoff (:class:`RetryConfig`); when the budget is spent,
  :class:`~torchrec_mm.serving.schema.StoreUnavailableError` names ``host:port``.
  Retrying is safe: a put re-sends the same keys and values, a delete the same ids.
* Nothing is lost after a restart only if the server persists: run it with
  ``appendonly yes`` (``appendfsync always`` for every acknowledged put, ``everysec``
  for at most one second). Opening a store logs a warning when the server has neither
  AOF nor RDB snapshots.
"""

import logging
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

import numpy as np

from torchrec_mm.data.schema import DataError
from torchrec_mm.serving.backend import StoreBackend
from torchrec_mm.serving.schema import StoreSchema, StoreUnavailableError

logger = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "torchrec-mm:items"
_MGET_CHUNK = 16384  # keys per MGET / MSET command
T = TypeVar("T")


@dataclass
class RetryConfig:
    """Retries of a Redis operation on connection errors.

    Attempt ``k`` (0-based) that fails waits ``min(max_delay, base_delay * 2**k)``
    before the next; after ``attempts`` attempts the error is raised. The default
    budget waits 0.05 + 0.1 + ... + 1.6 ≈ 3.2 s over 7 attempts.

    Attributes:
        attempts: tries in total (>= 1; 1 = no retry).
        base_delay: first wait, seconds.
        max_delay: cap of one wait, seconds.
        connect_timeout: seconds to establish a connection.
        socket_timeout: seconds to wait for a reply.
    """

    attempts: int = 7
    base_delay: float = 0.05
    max_delay: float = 2.0
    connect_timeout: float = 2.0
    socket_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryConfig.attempts must be >= 1, got {self.attempts}")
        for name in ("base_delay", "max_delay", "connect_timeout", "socket_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"RetryConfig.{name} must be >= 0")

    def delay(self, attempt: int) -> float:
        return min(self.max_delay, self.base_delay * (2.0 ** attempt))


def parse_redis_url(url: str) -> Tuple[str, Dict[str, Any]]:
    """``(namespace, redis.Redis keyword arguments)`` of a ``redis://`` URL.

    Supported: ``redis://[user:password@]host[:port][/db][?namespace=NS]`` and
    ``unix:///path/to/redis.sock[?db=N&namespace=NS]``.
    """
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    namespace = query.pop("namespace", DEFAULT_NAMESPACE)
    if not namespace or any(c in namespace for c in " \n\r"):
        raise ValueError(f"{url}: invalid namespace {namespace!r}")
    if query:
        raise ValueError(f"{url}: unsupported query parameters {sorted(query)} "
                         "(only namespace, and db for unix://)")
    kw: Dict[str, Any] = {}
    if parts.scheme == "unix":
        kw["unix_socket_path"] = parts.path
        kw["db"] = int(dict(urllib.parse.parse_qsl(parts.query)).get("db", 0))
    elif parts.scheme in ("redis", "rediss"):
        kw["host"] = parts.hostname or "127.0.0.1"
        kw["port"] = parts.port or 6379
        path = parts.path.strip("/")
        kw["db"] = int(path) if path else 0
        kw["ssl"] = parts.scheme == "rediss"
    else:
        raise ValueError(f"{url}: not a redis:// or unix:// URL")
    if parts.username:
        kw["username"] = urllib.parse.unquote(parts.username)
    if parts.password:
        kw["password"] = urllib.parse.unquote(parts.password)
    return namespace, kw


class RedisBackend(StoreBackend):
    """See the module docstring.

    Args:
        url: ``redis://host:port/db?namespace=NS``.
        schema: required to create the store (the namespace has no schema key yet);
            checked against the stored one if given.
        create: make the store if the namespace holds none.
        readonly: refuse writes.
        retry: retry policy on connection errors.
    """

    def __init__(self, url: str, schema: Optional[StoreSchema] = None, create: bool = True,
                 readonly: bool = False, retry: Optional[RetryConfig] = None) -> None:
        try:
            import redis
        except ImportError:
            raise ImportError("the Redis item store needs the python package 'redis' "
                              "(pip install 'redis>=5.0'; it is in requirements/cpu.txt)"
                              ) from None
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._redis = redis
        self.retry = retry or RetryConfig()
        self.namespace, kw = parse_redis_url(url)
        self.address = (kw["unix_socket_path"] if "unix_socket_path" in kw
                        else f"{kw['host']}:{kw['port']}")
        self.location = f"redis {self.address} db {kw['db']} namespace {self.namespace!r}"
        self.readonly = readonly
        self._closed = False
        self._client = redis.Redis(
            **kw, socket_connect_timeout=self.retry.connect_timeout,
            socket_timeout=self.retry.socket_timeout,
            retry=Retry(NoBackoff(), 0), retry_on_timeout=False,  # our own retries only
            protocol=2)  # RESP2: any server version (RESP3, redis-py 8's default, needs 6+)
        ns = self.namespace
        self._k_schema = f"{ns}:schema"
        self._k_ids = f"{ns}:ids"
        self._before_commit: Optional[Callable[[], None]] = None  # test hook
        stored_json = self._call("open", lambda: self._client.get(self._k_schema))
        if stored_json is None:
            if not create or readonly:
                raise FileNotFoundError(f"{self.location}: no item store (key "
                                        f"{self._k_schema!r} not set)")
            if schema is None:
                raise ValueError(f"{self.location}: no item store here; pass a schema to "
                                 "create one")
            self._call("create", lambda: self._client.set(self._k_schema, schema.to_json(),
                                                          nx=True))
            stored_json = self._call("open", lambda: self._client.get(self._k_schema))
        stored = StoreSchema.from_json(stored_json, f"{self.location} key {self._k_schema}")
        if schema is not None:
            schema.check_same(stored, self.location)
        self.schema = stored
        self._warn_if_volatile()

    # ---------------------------------------------------------------- plumbing
    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Runs ``fn`` with retries on connection errors."""
        if self._closed:
            raise ValueError(f"{self.location}: the item store is closed")
        errors = (self._redis.ConnectionError, self._redis.TimeoutError)
        start = time.monotonic()
        for attempt in range(self.retry.attempts):
            try:
                return fn()
            except errors as e:
                last = e
                if attempt + 1 < self.retry.attempts:
                    wait = self.retry.delay(attempt)
                    logger.warning("redis at %s: %s failed (%s); retry %d/%d in %.2fs",
                                   self.address, what, e, attempt + 1,
                                   self.retry.attempts - 1, wait)
                    time.sleep(wait)
        raise StoreUnavailableError(
            f"redis at {self.address} unreachable: {what} failed after "
            f"{self.retry.attempts} attempts over {time.monotonic() - start:.1f}s "
            f"(last error: {last}); is redis-server running there?") from last

    def _warn_if_volatile(self) -> None:
        try:
            conf = self._call("config", lambda: self._client.config_get("appendonly")) or {}
            save = self._call("config", lambda: self._client.config_get("save")) or {}
        except self._redis.ResponseError:  # CONFIG disabled (managed services)
            return
        if conf.get("appendonly") == "no" and not save.get("save"):
            logger.warning("redis at %s persists nothing (appendonly no, no save points): "
                           "the item store is lost when it restarts", self.address)

    def _key(self, field: str) -> str:
        return f"{self.namespace}:f:{field}:"

    def _keys(self, prefix: str, ids: List[int]) -> List[str]:
        return [f"{prefix}{i}" for i in ids]

    def _writable(self) -> None:
        if self.readonly:
            raise ValueError(f"{self.location}: the item store was opened read-only")

    # ------------------------------------------------------------------ writes
    def put(self, ids: np.ndarray, values: Dict[str, np.ndarray], version: bytes) -> None:
        self._writable()
        id_list = ids.tolist()
        args: List[Any] = []
        for f in self.schema.names:
            arr = np.ascontiguousarray(values[f])
            buf = arr.tobytes()
            w = self.schema[f].nbytes
            keys = self._keys(self._key(f), id_list)
            vals = [buf[i:i + w] for i in range(0, len(buf), w)]
            args += [x for kv in zip(keys, vals) for x in kv]
        vkeys = self._keys(f"{self.namespace}:v:", id_list)
        args += [x for k in vkeys for x in (k, version)]

        def run() -> None:
            pipe = self._client.pipeline(transaction=True)
            for s in range(0, len(args), 2 * _MGET_CHUNK):
                pipe.execute_command("MSET", *args[s:s + 2 * _MGET_CHUNK])
            for s in range(0, len(id_list), _MGET_CHUNK):
                pipe.sadd(self._k_ids, *id_list[s:s + _MGET_CHUNK])
            if self._before_commit is not None:
                self._before_commit()
            pipe.execute()

        self._call("put", run)

    def delete(self, ids: np.ndarray) -> int:
        self._writable()
        id_list = ids.tolist()
        if not id_list:
            return 0
        keys = self._keys(f"{self.namespace}:v:", id_list)
        for f in self.schema.names:
            keys += self._keys(self._key(f), id_list)

        def run() -> int:
            pipe = self._client.pipeline(transaction=True)
            for s in range(0, len(id_list), _MGET_CHUNK):
                pipe.srem(self._k_ids, *id_list[s:s + _MGET_CHUNK])
            for s in range(0, len(keys), _MGET_CHUNK):
                pipe.delete(*keys[s:s + _MGET_CHUNK])
            res = pipe.execute()
            n_srem = (len(id_list) + _MGET_CHUNK - 1) // _MGET_CHUNK
            return int(sum(res[:n_srem]))

        return self._call("delete", run)

    # ------------------------------------------------------------------- reads
    def get(self, ids: np.ndarray, fields: List[str], with_versions: bool = False
            ) -> Tuple[Dict[str, np.ndarray], np.ndarray, Optional[np.ndarray]]:
        m = ids.size
        id_list = ids.tolist()
        prefixes = [self._key(f) for f in fields]
        if with_versions or not fields:
            prefixes.append(f"{self.namespace}:v:")
        key_lists = [self._keys(p, id_list) for p in prefixes]

        def run() -> List[List[Optional[bytes]]]:
            # MULTI/EXEC: the MGETs of all fields see one state (no put in between)
            pipe = self._client.pipeline(transaction=True)
            for keys in key_lists:
                for s in range(0, m, _MGET_CHUNK):
                    pipe.mget(keys[s:s + _MGET_CHUNK])
            res = pipe.execute()
            per = max(1, (m + _MGET_CHUNK - 1) // _MGET_CHUNK)
            return [sum(res[i * per:(i + 1) * per], []) for i in range(len(key_lists))]

        replies = self._call("get", run) if m else [[] for _ in key_lists]
        first = replies[0]
        found = np.fromiter((v is not None for v in first), dtype=bool, count=m)
        all_found = bool(found.all())
        out: Dict[str, np.ndarray] = {}
        for f, vals in zip(fields, replies):
            spec = self.schema[f]
            w = spec.nbytes
            if all_found:
                buf = bytearray().join(vals)
            else:
                zero = bytes(w)
                buf = bytearray().join(v if v is not None else zero for v in vals)
            if len(buf) != m * w:
                lengths = np.fromiter((-1 if v is None else len(v) for v in vals),
                                      dtype=np.int64, count=m)
                bad = np.flatnonzero((lengths != w) & (lengths != -1) | ((lengths == -1) & found))
                i = int(bad[0]) if bad.size else 0
                raise DataError(self.location, f"item {int(ids[i])}", f,
                                f"stored value has {lengths[i]} bytes, expected {w} for "
                                f"{spec.describe()} (key {self._key(f)}{int(ids[i])})")
            arr = np.frombuffer(buf, dtype=spec.storage_dtype).reshape((m,) + spec.shape)
            if not all_found:
                present = np.fromiter((v is not None for v in vals), dtype=bool, count=m)
                if not np.array_equal(present, found):
                    i = int(np.flatnonzero(present != found)[0])
                    raise DataError(self.location, f"item {int(ids[i])}", f,
                                    "incomplete record (some field keys missing): it was "
                                    "not written by this store")
            out[f] = arr
        versions = None
        if with_versions:
            versions = np.array([None if v is None else v.decode("utf-8", errors="replace")
                                 for v in replies[-1]] + [None], dtype=object)[:m]
        return out, found, versions

    def count(self) -> int:
        return int(self._call("count", lambda: self._client.scard(self._k_ids)))

    def ids(self) -> np.ndarray:
        members = self._call("ids", lambda: list(self._client.sscan_iter(self._k_ids,
                                                                         count=10000)))
        out = np.array([int(x) for x in members], dtype=np.int64)
        out.sort()
        return out

    def drop(self) -> None:
        """Deletes every key of the namespace (the schema too)."""
        self._writable()

        def run() -> None:
            keys = [self._k_schema, self._k_ids]
            for pattern in [f"{self.namespace}:v:*"] + [f"{self._key(f)}*"
                                                        for f in self.schema.names]:
                keys += self._client.scan_iter(match=pattern, count=10000)
            for s in range(0, len(keys), _MGET_CHUNK):
                self._client.delete(*keys[s:s + _MGET_CHUNK])

        self._call("drop", run)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._client.close()
