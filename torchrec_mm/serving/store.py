"""Item store for the online path: item id → proxies / codes, written by the generation
service as new items arrive and read by the ranker's plugin modules per batch
(IDProxy §3.2.4, QARM §3: "write them into online storage … retrieve them via IDs").

:class:`ItemStore` is keyed by ``int64`` item id. A record holds every field of the
store's :class:`~torchrec_mm.serving.schema.StoreSchema` (fixed dtype and shape per
field) and the ``version`` string of the put that wrote it (the model that produced
the values). Use one store per producing model family, e.g. one for IDProxy
(``p_coarse`` float32[64], ``z_groups`` float16[3, 384]) and one for QARM (``vq``
int32[25], ``rq`` int32[6]).

Semantics (all backends, one test suite):

* ``put(ids, {field: [n, *shape]}, version)``: every field is required; the batch is
  atomic — a reader in any process sees all of it or none of it, also when the writer
  is killed mid-put; duplicate ids in a batch: the **last** occurrence wins; NaN/Inf and
  out-of-range values are rejected before anything is written (the error names the
  item id and the field).
* ``get(ids, fields) -> ({field: [*S, *shape]}, found [*S])`` for ids of any shape
  ``S``, duplicates answered per position. **Missing ids**: ``found`` is False and
  their rows hold the field's ``fill`` (0 by default) — the plugin modules then use
  their own fallback (IDProxy: the ID embedding / no proxy; QARM: the no-code index),
  so check ``found`` rather than the values. ``version="..."`` counts only records of
  that version as found (others: fill, False). Values come widened for the model
  (floats → float32, integers → int64) unless ``raw=True``.
* ``delete``, ``len``, ``ids()``, ``versions(ids)``, ``contains(ids)``, ``close()``,
  context manager. Opening checks the stored schema against the one given
  (:class:`~torchrec_mm.serving.schema.SchemaMismatchError` names each field).

Backends (``ItemStore.open(location)`` picks by location):

* ``"path/to/dir"`` — **mmap** (default, embedded, no server):
  :mod:`~torchrec_mm.serving.mmap_backend`, one memory-mapped fixed-width file per
  field, an append-only CRC'd commit log of the id → slot index, copy-on-write puts,
  flock for concurrent writers and readers.
* ``"path/to/file.db"`` or ``"sqlite:///path"`` — **sqlite**: one SQLite file in WAL
  mode, a BLOB column per field (:mod:`~torchrec_mm.serving.sqlite_backend`).
* ``"redis://host:port/db?namespace=NS"`` — **redis**, the online store
  (:mod:`~torchrec_mm.serving.redis_backend`): pipelined MGET reads, MULTI/EXEC
  writes, retries with exponential backoff.

Why mmap is the embedded default — ``benchmarks/bench_store.py`` on this machine (2
shared cores, 1 torch thread; medians, range over 3 runs), 50k stored items of the
IDProxy schema (``p_coarse`` float32[64] + ``z_groups`` float16[3, 384], 2.56 kB a
record), ``get`` of 4096 random ids through :meth:`ItemStore.get` (float32 out),
puts of 4096 records (overwrites):

====================  ====================  ====================  =======================
                      get p_coarse          get both fields       put, sync=True / False
====================  ====================  ====================  =======================
in-memory tensors     0.11-0.17 ms (1x)     9.9-13.3 ms (1x)      —
**mmap** (default)    0.42-0.61 ms (3-5x)   11.7-12.3 ms (~1x)    117-153 ms / 29-32 ms
sqlite (WAL)          25-30 ms (150-270x)   53-60 ms (4-6x)       126-264 / 123-232 ms
redis (localhost)     28-33 ms (170-290x)   99-112 ms (7-11x)     132-206 ms (AOF everysec)
====================  ====================  ====================  =======================

("both fields" is dominated by widening float16 → float32, which the in-memory
baseline does too.) The mmap store looks a batch up with one vectorised table lookup
(``searchsorted`` for sparse id ranges) and one ``numpy.take`` per field under a
shared ``flock`` — no per-record Python; SQLite and Redis hand back one Python
object per record and field, 50-70x slower than mmap on the small field. SQLite is
kept as an alternative (``*.db`` locations): a single file and the most
battle-tested crash safety, at the cost of the read latency above. A ``sync=True``
put is dominated by the fsyncs of this VM's disk.
"""

from types import TracebackType
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Tuple, Type

import numpy as np

from torchrec_mm.serving.backend import StoreBackend, prepare_put, unique_ids
from torchrec_mm.serving.schema import StoreSchema, as_id_array, iter_fields

if TYPE_CHECKING:
    import torch

    from torchrec_mm.serving.redis_backend import RetryConfig

BACKENDS = ("mmap", "sqlite", "redis")
_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


def resolve_backend(location: str, backend: Optional[str] = None) -> Tuple[str, str]:
    """``(backend name, location for it)`` of a store location.

    ``redis://``, ``rediss://``, ``unix://`` → redis; ``sqlite:///path`` or a path
    ending in .db/.sqlite/.sqlite3 → sqlite; any other path → mmap (a directory).
    """
    loc = str(location)
    if loc.startswith("sqlite://"):
        loc = loc[len("sqlite://"):]
        guess = "sqlite"
    elif loc.startswith(("redis://", "rediss://", "unix://")):
        guess = "redis"
    elif loc.endswith(_SQLITE_SUFFIXES):
        guess = "sqlite"
    else:
        guess = "mmap"
    if backend is None:
        return guess, loc
    if backend not in BACKENDS:
        raise ValueError(f"unknown item store backend {backend!r}; one of {list(BACKENDS)}")
    if (backend == "redis") != (guess == "redis"):
        raise ValueError(f"backend {backend!r} does not fit the location {location!r}")
    return backend, loc


class ItemStore:
    """Item id → fixed-shape tensors, with a version per record (see the module
    docstring for the semantics shared by all backends).

    Args:
        backend: an opened :class:`~torchrec_mm.serving.backend.StoreBackend`; use
            :meth:`open` to make one from a location.

    Example::

        schema = StoreSchema.of(p_coarse=("float32", (64,)), z_groups=("float16", (3, 384)))
        with ItemStore.open("out/item_store", schema) as store:
            store.put(new_ids, {"p_coarse": p, "z_groups": z}, version="idproxy@run-7")
            vals, found = store.get(batch_item_ids, ["p_coarse"])   # [B, 64], [B]
    """

    def __init__(self, backend: StoreBackend) -> None:
        self._backend = backend

    @classmethod
    def open(cls, location: str, schema: Optional[StoreSchema] = None, *,
             backend: Optional[str] = None, create: bool = True, readonly: bool = False,
             sync: bool = True, retry: Optional["RetryConfig"] = None) -> "ItemStore":
        """Opens (or creates) the store at ``location``.

        Args:
            location: a directory (mmap), a ``.db`` file / ``sqlite:///path`` (sqlite) or
                ``redis://host:port/db?namespace=NS`` (redis).
            schema: required to create a store; if given for an existing store it must
                equal the stored schema (:class:`SchemaMismatchError` otherwise).
            backend: force ``"mmap"`` / ``"sqlite"`` / ``"redis"``.
            create: create the store when missing (else ``FileNotFoundError``).
            readonly: refuse writes (mmap maps read-only, sqlite opens ``mode=ro``).
            sync: embedded backends: fsync every put (power-loss durable).
            retry: redis: :class:`~torchrec_mm.serving.redis_backend.RetryConfig`.
        """
        name, loc = resolve_backend(location, backend)
        be: StoreBackend
        if name == "redis":
            from torchrec_mm.serving.redis_backend import RedisBackend

            be = RedisBackend(loc, schema, create=create, readonly=readonly, retry=retry)
        elif name == "sqlite":
            from torchrec_mm.serving.sqlite_backend import SQLiteBackend

            be = SQLiteBackend(loc, schema, create=create, readonly=readonly, sync=sync)
        else:
            from torchrec_mm.serving.mmap_backend import MmapBackend

            be = MmapBackend(loc, schema, create=create, readonly=readonly, sync=sync)
        return cls(be)

    # ------------------------------------------------------------------ basics
    @property
    def schema(self) -> StoreSchema:
        return self._backend.schema

    @property
    def location(self) -> str:
        return self._backend.location

    @property
    def backend(self) -> StoreBackend:
        return self._backend

    def __len__(self) -> int:
        return self._backend.count()

    def __repr__(self) -> str:
        return f"ItemStore({type(self._backend).__name__}: {self.location}; " \
               f"{self.schema.describe()})"

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> "ItemStore":
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]],
                 exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.close()

    # ------------------------------------------------------------------ writes
    def put(self, ids: Any, values: Mapping[str, Any], version: str) -> int:
        """Writes a batch of records atomically.

        Args:
            ids: int ``[n]`` item ids (tensor, array or list); duplicates: last wins.
            values: ``{field: [n, *shape]}`` for every field of the schema (torch or
                numpy; floats are cast to the field's dtype, integers range-checked).
            version: the model that produced the values, e.g. ``"idproxy@run-7"``.

        Returns:
            the number of distinct ids written.

        Raises:
            DataError: naming the store, the item id (or ``batch``) and the field:
                NaN/Inf, overflow, wrong shape or dtype, missing/unknown field. Nothing
                of the batch is written then.
        """
        u, arrays, v = prepare_put(self.schema, ids, values, version, self.location)
        if u.size:
            self._backend.put(u, arrays, v)
        return int(u.size)

    def delete(self, ids: Any) -> int:
        """Removes the records of ``ids`` (atomically); returns how many existed."""
        u = unique_ids(ids)
        return self._backend.delete(u) if u.size else 0

    # ------------------------------------------------------------------- reads
    def get(self, ids: Any, fields: Optional[Iterable[str]] = None, *,
            version: Optional[str] = None, raw: bool = False
            ) -> Tuple[Dict[str, "torch.Tensor"], "torch.Tensor"]:
        """Looks a batch of ids up.

        Args:
            ids: int ids of any shape ``S`` (duplicates and unknown ids allowed).
            fields: names to read (default: all).
            version: if given, only records written with this version count as found.
            raw: return the stored dtypes (e.g. float16) instead of float32 / int64.

        Returns:
            ``({field: [*S, *shape]}, found bool [*S])``; rows of ids not found hold the
            field's ``fill`` (0 unless the schema says otherwise).
        """
        import torch

        arr = as_id_array(ids)
        flat = arr.reshape(-1)
        names = iter_fields(self.schema, fields, self.location)
        values, found, versions = self._backend.get(flat, names,
                                                    with_versions=version is not None)
        if version is not None:
            found = found & (versions == version).astype(bool)
        missing = torch.from_numpy(~found)
        any_missing = bool(missing.any())
        out: Dict[str, torch.Tensor] = {}
        for f in names:
            spec = self.schema[f]
            a = values[f]
            if spec.dtype == "bfloat16":
                t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
            else:
                t = torch.from_numpy(a)
            if not raw:
                t = t.to(spec.output_dtype)
            if any_missing:
                t[missing] = spec.fill
            out[f] = t.reshape(arr.shape + spec.shape)
        return out, torch.from_numpy(found).reshape(arr.shape)

    def contains(self, ids: Any) -> "torch.Tensor":
        """bool tensor of ``ids``' shape: which ids have a record."""
        import torch

        arr = as_id_array(ids)
        _, found, _ = self._backend.get(arr.reshape(-1), [])
        return torch.from_numpy(found).reshape(arr.shape)

    def __contains__(self, item_id: int) -> bool:
        return bool(self.contains(np.array([int(item_id)]))[0])

    def versions(self, ids: Any) -> List[Optional[str]]:
        """Version string of each id's record (``None`` where there is none), flat."""
        arr = as_id_array(ids).reshape(-1)
        _, _, versions = self._backend.get(arr, [], with_versions=True)
        return list(versions) if versions is not None else []

    def ids(self) -> "torch.Tensor":
        """int64 ``[len(self)]`` ids of all records, ascending."""
        import torch

        return torch.from_numpy(self._backend.ids())

