"""Embedded item store: memory-mapped fixed-width record files and an id → slot index.

Layout of a store directory::

    DIR/
      store.json            the schema (written once, atomically, when the store is made)
      field-<name>.bin      one file per field: slot s holds the s-th fixed-width value
                            (``field.nbytes`` bytes), memory-mapped by every process
      index.log             append-only commit log of the id → slot index (below)
      writer.lock           flock: one writer at a time (across processes)
      index.lock            flock: readers share it while they look up and copy;
                            a writer holds it exclusively only to append a commit
      turnstile.lock        flock: a committing writer holds it, readers pass through
                            it before taking index.lock (flock is not fair: without
                            it, overlapping readers could starve a commit)

**Copy on write.** A put never touches a slot the index points to: it writes the
batch into free slots (growing the files if needed), flushes them (``sync=True``:
``fsync``), and only then appends one commit block ``(ids, slots, version)`` to the
log (and fsyncs it). A block carries a CRC32 of its header and payload; a reader
stops at the first incomplete or corrupt block, so a writer killed at any point
leaves either the whole batch visible or none of it. The next writer truncates such a
torn tail. Slots freed by a commit are reused by later puts; because readers hold
``index.lock`` (shared) while they refresh the index and copy the rows, and a commit
needs it exclusively, a reader never copies a slot that is rewritten under it.

**Index.** Each process keeps the index in memory as sorted ``int64`` keys with
slots and version codes; a lookup is a vectorised ``searchsorted``; before each
operation the process reads the log's new blocks (an ``fstat`` when nothing changed).
When the log holds more than twice the live entries (+64k) the writer rewrites it
compacted (atomic rename; readers notice the new inode and reload).

Durability: with ``sync=True`` (default) a put returns after its data and commit are
on disk (power-loss safe); ``sync=False`` skips the fsyncs — still all-or-nothing when
a process is killed, but a power loss may expose records whose data never reached disk.
"""

import contextlib
import fcntl
import json
import logging
import os
import struct
import threading
import zlib
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from torchrec_mm.serving.backend import StoreBackend
from torchrec_mm.serving.schema import StoreSchema
from torchrec_mm.utils.io import write_json

logger = logging.getLogger(__name__)

META_FILE = "store.json"
LOG_FILE = "index.log"
WRITER_LOCK = "writer.lock"
INDEX_LOCK = "index.lock"
TURNSTILE_LOCK = "turnstile.lock"
BACKEND_NAME = "mmap"

_MAGIC = b"TMI1"
_HEAD = struct.Struct("<4sB3xQI")  # magic, kind, n, version length   (20 bytes)
_CRC = struct.Struct("<I")         # crc32 of head + payload           (4 bytes)
_HEADER_BYTES = _HEAD.size + _CRC.size
_PUT, _DELETE = 1, 2
_MIN_CAPACITY = 1024


def _field_file(name: str) -> str:
    return f"field-{name}.bin"


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def encode_block(kind: int, ids: np.ndarray, slots: Optional[np.ndarray],
                 version: bytes) -> bytes:
    """One commit block of the index log."""
    payload = [version, b"\0" * (_pad8(len(version)) - len(version)),
               np.ascontiguousarray(ids, dtype="<i8").tobytes()]
    if kind == _PUT:
        payload.append(np.ascontiguousarray(slots, dtype="<i8").tobytes())
    body = b"".join(payload)
    head = _HEAD.pack(_MAGIC, kind, int(ids.shape[0]), len(version))
    return head + _CRC.pack(zlib.crc32(body, zlib.crc32(head))) + body


def decode_blocks(buf: bytes) -> Tuple[List[Tuple[int, np.ndarray, Optional[np.ndarray], bytes]],
                                       int]:
    """Complete, intact blocks at the start of ``buf`` and the bytes they span (a torn
    or corrupt block and everything after it are left out)."""
    view = memoryview(buf)
    blocks = []
    pos = 0
    while pos + _HEADER_BYTES <= len(buf):
        magic, kind, n, vlen = _HEAD.unpack_from(buf, pos)
        if magic != _MAGIC or kind not in (_PUT, _DELETE) or vlen > 1024:
            break
        body_len = _pad8(vlen) + 8 * n * (2 if kind == _PUT else 1)
        end = pos + _HEADER_BYTES + body_len
        if end > len(buf):
            break
        (crc,) = _CRC.unpack_from(buf, pos + _HEAD.size)
        body = view[pos + _HEADER_BYTES:end]
        if zlib.crc32(body, zlib.crc32(view[pos:pos + _HEAD.size])) != crc:
            break
        version = bytes(body[:vlen])
        off = pos + _HEADER_BYTES + _pad8(vlen)
        ids = np.frombuffer(buf, dtype="<i8", count=n, offset=off).astype(np.int64)
        slots = (np.frombuffer(buf, dtype="<i8", count=n, offset=off + 8 * n).astype(np.int64)
                 if kind == _PUT else None)
        blocks.append((kind, ids, slots, version))
        pos = end
    return blocks, pos


@contextlib.contextmanager
def _flock(fd: int, exclusive: bool) -> Iterator[None]:
    fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def merge_index(keys: np.ndarray, slots: np.ndarray, vers: np.ndarray, new_ids: np.ndarray,
                new_slots: np.ndarray, new_vers: np.ndarray
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Applies log entries in order (``new_slots < 0``: delete) to a sorted index.

    Returns new ``(keys, slots, vers)``; updates of existing keys are done in place,
    inserts and deletes cost one O(N) copy.
    """
    if new_ids.size == 0:
        return keys, slots, vers
    order = np.lexsort((np.arange(new_ids.size), new_ids))
    s = new_ids[order]
    last = np.ones(s.size, dtype=bool)
    last[:-1] = s[1:] != s[:-1]
    sel = order[last]
    u, us, uv = new_ids[sel], new_slots[sel], new_vers[sel]
    pos = np.searchsorted(keys, u)
    hit = pos < keys.size
    hit[hit] = keys[pos[hit]] == u[hit]
    is_put = us >= 0
    upd = hit & is_put
    slots[pos[upd]] = us[upd]
    vers[pos[upd]] = uv[upd]
    dele = hit & ~is_put
    if dele.any():
        keep = np.ones(keys.size, dtype=bool)
        keep[pos[dele]] = False
        keys, slots, vers = keys[keep], slots[keep], vers[keep]
    ins = ~hit & is_put
    if ins.any():
        p = np.searchsorted(keys, u[ins])
        keys = np.insert(keys, p, u[ins])
        slots = np.insert(slots, p, us[ins])
        vers = np.insert(vers, p, uv[ins])
    return keys, slots, vers


class MmapBackend(StoreBackend):
    """See the module docstring.

    Args:
        path: store directory.
        schema: required to create the store; checked against the stored one if given.
        create: make the store if ``path`` holds none.
        readonly: never write (no locks taken exclusively, files mapped read-only).
        sync: fsync data and commits (power-loss safe); see the module docstring.
    """

    def __init__(self, path: str, schema: Optional[StoreSchema] = None, create: bool = True,
                 readonly: bool = False, sync: bool = True) -> None:
        self.path = os.path.abspath(path)
        self.location = self.path
        self.readonly = readonly
        self.sync = sync
        self._tlock = threading.RLock()
        self._fds: List[int] = []
        self._closed = False
        meta = os.path.join(self.path, META_FILE)
        if not os.path.exists(meta):
            if not create or readonly:
                raise FileNotFoundError(f"{meta} not found: no item store at {self.path!r}")
            if schema is None:
                raise ValueError(f"{self.path}: no item store here; pass a schema to create one")
            self._create(schema)
        with open(meta) as f:
            raw = json.load(f)
        stored = StoreSchema.from_dict(raw.get("schema", {}), meta)
        if raw.get("backend") != BACKEND_NAME:
            raise ValueError(f"{meta}: store backend is {raw.get('backend')!r}, expected "
                             f"{BACKEND_NAME!r}")
        if schema is not None:
            schema.check_same(stored, self.path)
        self.schema = stored
        self._pid = os.getpid()
        self._open_files()
        # test hook: called after a put's data is written, before its commit
        self._before_commit: Optional[Callable[[], None]] = None

    # ------------------------------------------------------------------ set-up
    def _open_files(self) -> None:
        flags = os.O_RDONLY if self.readonly else os.O_RDWR
        self._writer_fd = self._open(WRITER_LOCK, flags)
        self._index_fd = self._open(INDEX_LOCK, flags)
        self._turnstile_fd = self._open(TURNSTILE_LOCK, flags)
        self._field_fds = {f: self._open(_field_file(f), flags) for f in self.schema.names}
        self._maps: Dict[str, np.ndarray] = {}
        self._mapped_rows = 0
        self._log_fd = -1
        self._reset_index()

    def _guard(self) -> "threading.RLock":
        """The object's thread lock; in a forked child, first reopens every file: flock
        locks belong to open file descriptions, which a child shares with its parent,
        so the inherited ones would not exclude the two processes from each other."""
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._tlock = threading.RLock()
            if not self._closed:
                for fd in self._fds:
                    os.close(fd)
                self._fds = []
                self._open_files()
        return self._tlock

    def _open(self, name: str, flags: int) -> int:
        fd = os.open(os.path.join(self.path, name), flags)
        self._fds.append(fd)
        return fd

    def _create(self, schema: StoreSchema) -> None:
        os.makedirs(self.path, exist_ok=True)
        lock = os.open(os.path.join(self.path, WRITER_LOCK), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            with _flock(lock, exclusive=True):
                if os.path.exists(os.path.join(self.path, META_FILE)):
                    return  # another process made it meanwhile
                ours = {WRITER_LOCK, INDEX_LOCK, TURNSTILE_LOCK, LOG_FILE} | {
                    _field_file(f) for f in schema.names}
                others = [f for f in os.listdir(self.path) if f not in ours]
                if others:
                    raise FileExistsError(f"{self.path}: directory is not empty and holds no "
                                          f"item store ({sorted(others)[:3]} ...); use an "
                                          "empty or new directory")
                for name in ([INDEX_LOCK, TURNSTILE_LOCK, LOG_FILE]
                             + [_field_file(f) for f in schema.names]):
                    fd = os.open(os.path.join(self.path, name),
                                 os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
                    os.close(fd)
                write_json(os.path.join(self.path, META_FILE),
                           {"backend": BACKEND_NAME, "schema": schema.to_dict()})
                _fsync_dir(self.path)
        finally:
            os.close(lock)

    def _reset_index(self) -> None:
        self._keys = np.zeros(0, dtype=np.int64)
        self._dense: Optional[Tuple[np.ndarray, np.ndarray]] = None  # (keys, table)
        self._slots = np.zeros(0, dtype=np.int64)
        self._vers = np.zeros(0, dtype=np.int32)
        self._versions: List[str] = []
        self._version_code: Dict[bytes, int] = {}
        self._log_pos = 0
        self._log_size = 0
        self._log_entries = 0
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._fds.remove(self._log_fd)
        self._log_fd = self._open(LOG_FILE, os.O_RDONLY if self.readonly else os.O_RDWR)
        self._log_ino = os.fstat(self._log_fd).st_ino

    @contextlib.contextmanager
    def _shared(self) -> Iterator[None]:
        """index.lock shared, entered through the turnstile."""
        with _flock(self._turnstile_fd, exclusive=True):
            pass
        with _flock(self._index_fd, exclusive=False):
            yield

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """index.lock exclusive; new readers wait at the turnstile meanwhile."""
        with _flock(self._turnstile_fd, exclusive=True):
            with _flock(self._index_fd, exclusive=True):
                yield

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: the item store is closed")

    # ------------------------------------------------------------------- index
    def _refresh(self) -> None:
        """Reads new commit blocks (caller holds index.lock shared or writer.lock)."""
        st = os.stat(os.path.join(self.path, LOG_FILE))
        if st.st_ino != self._log_ino or st.st_size < self._log_pos:
            self._reset_index()  # compacted by another process
        size = os.fstat(self._log_fd).st_size
        self._log_size = size
        if size == self._log_pos:
            return
        buf = os.pread(self._log_fd, size - self._log_pos, self._log_pos)
        blocks, used = decode_blocks(buf)
        if not blocks:
            return
        ids = np.concatenate([b[1] for b in blocks])
        slots = np.concatenate([b[2] if b[0] == _PUT else np.full(b[1].size, -1, np.int64)
                                for b in blocks])
        vers = np.concatenate([np.full(b[1].size, self._code(b[3]) if b[0] == _PUT else -1,
                                       np.int32) for b in blocks])
        self._keys, self._slots, self._vers = merge_index(
            self._keys, self._slots, self._vers, ids, slots, vers)
        self._log_pos += used
        self._log_entries += int(ids.size)

    def _code(self, version: bytes) -> int:
        code = self._version_code.get(version)
        if code is None:
            code = self._version_code[version] = len(self._versions)
            self._versions.append(version.decode("utf-8", errors="replace"))
        return code

    def _lookup(self, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """``(found [m] bool, positions in the index of the found ids)``.

        Dense id ranges (the usual ``[0, num_items)``) are looked up in a direct table
        ``id - lo -> position`` (built lazily after the index changed); sparse ones by
        ``searchsorted`` on the sorted keys.
        """
        keys = self._keys
        if keys.size == 0:
            return np.zeros(ids.size, dtype=bool), np.zeros(0, dtype=np.int64)
        lo, span = int(keys[0]), int(keys[-1]) - int(keys[0]) + 1
        if span <= 4 * keys.size + 4096:
            if self._dense is None or self._dense[0] is not keys:
                table = np.full(span, -1, dtype=np.int64)
                table[keys - lo] = np.arange(keys.size)
                self._dense = (keys, table)
            rel = ids - lo
            ok = (rel >= 0) & (rel < span)
            pos = np.full(ids.size, -1, dtype=np.int64)
            pos[ok] = self._dense[1][rel[ok]]
            found = pos >= 0
            return found, pos[found]
        pos = np.searchsorted(keys, ids)
        found = pos < keys.size
        found[found] = keys[pos[found]] == ids[found]
        return found, pos[found]

    # ------------------------------------------------------------------- data
    def _capacity(self) -> int:
        first = self.schema.names[0]
        return os.fstat(self._field_fds[first]).st_size // self.schema[first].nbytes

    def _map(self, rows_needed: int) -> None:
        """(Re)maps the field files when slots beyond the current maps are needed."""
        if rows_needed <= self._mapped_rows:
            return
        cap = self._capacity()
        if cap < rows_needed:
            raise ValueError(f"{self.path}: field files hold {cap} slots but the index "
                             f"refers to slot {rows_needed - 1}: the store is damaged")
        mode = "r" if self.readonly else "r+"
        self._maps = {f: np.memmap(os.path.join(self.path, _field_file(f)),
                                   dtype=spec.storage_dtype, mode=mode,
                                   shape=(cap,) + spec.shape)
                      for f, spec in self.schema.fields.items()}
        self._mapped_rows = cap

    def _grow(self, needed: int) -> None:
        cap = self._capacity()
        if cap >= needed:
            return
        new_cap = max(needed, 2 * cap, _MIN_CAPACITY)
        for f, spec in self.schema.fields.items():
            # allocate the blocks now: a full disk is an OSError here, not a SIGBUS
            # when the memory map is written later
            old = os.fstat(self._field_fds[f]).st_size
            os.posix_fallocate(self._field_fds[f], old, new_cap * spec.nbytes - old)
        self._map(new_cap)

    def _free_slots(self, n: int) -> np.ndarray:
        cap = self._capacity()
        used = np.zeros(cap, dtype=bool)
        used[self._slots] = True
        free = np.flatnonzero(~used)[:n]
        if free.size < n:
            self._grow(self._slots.size + n)
            free = np.concatenate([free, np.arange(cap, cap + n - free.size)])
        return free

    # ------------------------------------------------------------------ writes
    def _writable(self) -> None:
        self._check_open()
        if self.readonly:
            raise ValueError(f"{self.path}: the item store was opened read-only")

    def _commit(self, block: bytes) -> None:
        """Appends a commit block (caller holds writer.lock) under index.lock."""
        with self._exclusive():
            if self._log_size > self._log_pos:  # a writer died mid-commit: drop its tail
                os.ftruncate(self._log_fd, self._log_pos)
            start = self._log_pos
            written = os.pwrite(self._log_fd, block, start)
            if self.sync:
                os.fsync(self._log_fd)
            self._refresh()
            if written != len(block) or self._log_pos != start + len(block):
                os.ftruncate(self._log_fd, start)
                raise OSError(f"{self.path}: could not append the commit to {LOG_FILE} "
                              f"({written} of {len(block)} bytes written); the batch "
                              "was not stored")

    def put(self, ids: np.ndarray, values: Dict[str, np.ndarray], version: bytes) -> None:
        with self._guard():
            self._writable()
            with _flock(self._writer_fd, exclusive=True):
                self._refresh()
                slots = self._free_slots(ids.size)
                self._map(int(slots.max()) + 1 if slots.size else 0)
                for f in self.schema.names:
                    self._maps[f][slots] = values[f]
                if self.sync:
                    for f in self.schema.names:
                        os.fsync(self._field_fds[f])
                if self._before_commit is not None:
                    self._before_commit()
                self._commit(encode_block(_PUT, ids, slots, version))
                self._maybe_compact()

    def delete(self, ids: np.ndarray) -> int:
        with self._guard():
            self._writable()
            with _flock(self._writer_fd, exclusive=True):
                self._refresh()
                found, _ = self._lookup(ids)
                present = ids[found]
                if present.size:
                    self._commit(encode_block(_DELETE, present, None, b""))
                    self._maybe_compact()
                return int(present.size)

    def _maybe_compact(self) -> None:
        if self._log_entries <= 2 * self._keys.size + 65536:
            return
        self.compact()

    def compact(self) -> None:
        """Rewrites the index log with one block per version of the live records."""
        with self._guard():
            self._writable()
            with _flock(self._writer_fd, exclusive=True):
                self._refresh()
                tmp = os.path.join(self.path, f".{LOG_FILE}.{os.getpid()}.tmp")
                with open(tmp, "wb") as f:
                    for code in np.unique(self._vers):
                        sel = self._vers == code
                        f.write(encode_block(_PUT, self._keys[sel], self._slots[sel],
                                             self._versions[int(code)].encode("utf-8")))
                    f.flush()
                    os.fsync(f.fileno())
                with self._exclusive():
                    os.replace(tmp, os.path.join(self.path, LOG_FILE))
                    _fsync_dir(self.path)
                    self._reset_index()
                    self._refresh()
                logger.debug("%s: compacted the index log to %d entries", self.path,
                             self._keys.size)

    # ------------------------------------------------------------------- reads
    def get(self, ids: np.ndarray, fields: List[str], with_versions: bool = False
            ) -> Tuple[Dict[str, np.ndarray], np.ndarray, Optional[np.ndarray]]:
        with self._guard():
            self._check_open()
            with self._shared():
                self._refresh()
                found, pos = self._lookup(ids)
                slots = self._slots[pos]
                if slots.size:
                    self._map(int(slots.max()) + 1)
                all_found = slots.size == ids.size
                out = {}
                for f in fields:
                    spec = self.schema[f]
                    if all_found and slots.size:  # one gather straight into the result
                        out[f] = np.take(self._maps[f].view(np.ndarray), slots, axis=0)
                        continue
                    arr = np.zeros((ids.size,) + spec.shape, dtype=spec.storage_dtype)
                    if slots.size:
                        arr[found] = np.take(self._maps[f].view(np.ndarray), slots, axis=0)
                    out[f] = arr
                versions = None
                if with_versions:
                    names = np.array(self._versions + [None], dtype=object)
                    codes = np.full(ids.size, len(self._versions), dtype=np.int64)
                    codes[found] = self._vers[pos]
                    versions = names[codes]
        return out, found, versions

    def count(self) -> int:
        with self._guard():
            self._check_open()
            with self._shared():
                self._refresh()
                return int(self._keys.size)

    def ids(self) -> np.ndarray:
        with self._guard():
            self._check_open()
            with self._shared():
                self._refresh()
                return self._keys.copy()

    def close(self) -> None:
        with self._guard():
            if self._closed:
                return
            self._closed = True
            self._maps = {}
            for fd in self._fds:
                os.close(fd)
            self._fds = []


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
