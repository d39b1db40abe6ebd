"""Writing and reading datasets in the canonical format (see ``schema.py`` and
``docs/data_format.md``).

Writing goes through :class:`DatasetWriter`, which streams interaction batches into
sorted parquet parts inside ``<out_dir>.partial`` and renames that directory onto
``out_dir`` only when everything has been written, so an interrupted import never
leaves a half-written dataset behind.

Reading is validated: every row that a reader yields has the right dtypes, a known
scenario, ids inside ``[0, num_users)`` / ``[0, num_items)``, a non-negative
timestamp, a 0/1 label and only known action bits. A bad row raises
:class:`~torchrec_mm.data.schema.DataError` naming the file, the row (0-based row
index inside the parquet part) and the field; with ``skip_bad=True`` bad rows are
dropped and counted in a :class:`ReadStats`.

Example::

    with DatasetWriter("out/ds", "my-data", scenarios=["homefeed"],
                       actions=["is_click"]) as w:
        w.add_interactions({"user_id": u, "item_id": i, "scenario": "homefeed",
                            "timestamp": t, "label": y, "actions": y})
        w.set_items({"raw_id": raw_item_ids, "text": texts})
    cols = load_interaction_columns("out/ds", ["user_id", "item_id", "label"])
"""

import contextlib
import dataclasses
import glob
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Union,
)

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from torchrec_mm.data.schema import (
    INTERACTION_SCHEMA,
    INTERACTIONS_DIR,
    ITEM_SCHEMA,
    ITEMS_FILE,
    MAX_ACTIONS,
    META_FILE,
    NUMPY_DTYPES,
    USER_ATTR_PREFIX,
    USER_SCHEMA,
    USERS_FILE,
    DataError,
    DatasetMeta,
)
from torchrec_mm.utils.io import write_json

logger = logging.getLogger(__name__)

PART_PATTERN = "part-{:05d}.parquet"
PARTIAL_SUFFIX = ".partial"
INTERACTION_COLUMNS: List[str] = INTERACTION_SCHEMA.names

ArrayLike = Union[np.ndarray, pa.Array, pa.ChunkedArray, Sequence[Any]]
Batch = Union[Mapping[str, Any], pa.Table, pa.RecordBatch]


# --------------------------------------------------------------------------- stats


@dataclass
class ReadStats:
    """Counts of a validated read (or of an import).

    Attributes:
        rows: rows that passed validation (yielded / imported).
        bad_rows: rows dropped because they were invalid (only with ``skip_bad``).
        bad_by_field: ``{field: number of rows with a problem in that field}``
            (a row with two bad fields counts once in ``bad_rows``, twice here).
        examples: the first few error messages, for the log.
        files: files read.
    """

    rows: int = 0
    bad_rows: int = 0
    bad_by_field: Dict[str, int] = field(default_factory=dict)
    examples: List[str] = field(default_factory=list)
    files: int = 0

    MAX_EXAMPLES = 5

    def add_bad(self, error: DataError, count: int) -> None:
        self.bad_by_field[str(error.field)] = self.bad_by_field.get(str(error.field), 0) + count
        if len(self.examples) < self.MAX_EXAMPLES:
            self.examples.append(str(error))

    def summary(self) -> str:
        s = f"{self.rows} valid rows"
        if self.bad_rows:
            fields = ", ".join(f"{k}: {v}" for k, v in sorted(self.bad_by_field.items()))
            s += f", {self.bad_rows} bad rows skipped ({fields})"
        return s

    def log_bad(self, what: str) -> None:
        if self.bad_rows:
            logger.warning("%s: skipped %d bad records (%s); first: %s", what,
                           self.bad_rows, self.bad_by_field, "; ".join(self.examples))


class RowChecker:
    """Collects row-level problems of one chunk of records, vectorised.

    Each :meth:`fail` call gets a boolean mask of bad rows for one field. Without
    ``skip_bad`` the first bad row raises a :class:`DataError`; with it the rows are
    marked and counted and :meth:`keep` returns the mask of good rows.

    Args:
        path: file named in errors.
        n: number of rows in the chunk.
        record: maps a row index of the chunk to the record named in errors
            (e.g. a 0-based parquet row or ``"line 17"``).
        skip_bad: drop and count instead of raising.
        stats: receives the counts.
    """

    def __init__(self, path: str, n: int, record: Callable[[int], Any], skip_bad: bool,
                 stats: ReadStats) -> None:
        self.path = path
        self.record = record
        self.skip_bad = skip_bad
        self.stats = stats
        self.bad = np.zeros(n, dtype=bool)

    def fail(self, mask: np.ndarray, field_name: str,
             message: Union[str, Callable[[int], str]]) -> None:
        """Marks rows ``mask`` as bad in ``field_name``; ``message(i)`` describes row i.
        Rows already marked bad are not reported again (one problem per row)."""
        mask = np.asarray(mask, dtype=bool) & ~self.bad
        if not mask.any():
            return
        i = int(np.flatnonzero(mask)[0])
        msg = message(i) if callable(message) else message
        error = DataError(self.path, self.record(i), field_name, msg)
        if not self.skip_bad:
            raise error
        self.stats.add_bad(error, int(mask.sum()))
        self.bad |= mask

    def keep(self) -> np.ndarray:
        """Mask of good rows; adds the bad ones to ``stats.bad_rows``."""
        self.stats.bad_rows += int(self.bad.sum())
        return ~self.bad


# --------------------------------------------------------------------------- helpers


def _to_numpy(values: Any) -> np.ndarray:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values.to_numpy(zero_copy_only=False)
    return np.asarray(values)


def _batch_columns(batch: Batch) -> Dict[str, Any]:
    if isinstance(batch, (pa.Table, pa.RecordBatch)):
        return {name: batch.column(name) for name in batch.schema.names}
    return dict(batch)


def _int_column(values: Any, n: int, path: str, name: str, offset: int) -> np.ndarray:
    arr = _to_numpy(values)
    if arr.ndim == 0:
        arr = np.full(n, arr)
    if arr.shape != (n,):
        raise DataError(path, offset, name, f"expected {n} values, got shape {arr.shape}")
    if arr.dtype == bool:
        arr = arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(path, offset, name, f"expected integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _remove_tree(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


def is_dataset_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META_FILE))


# --------------------------------------------------------------------------- writer


class DatasetWriter:
    """Streams a dataset into ``out_dir`` atomically.

    Interactions are added in batches with :meth:`add_interactions`; they are buffered
    and written as parquet parts of ``rows_per_part`` rows, each sorted by
    ``(user_id, timestamp)`` (when the whole dataset fits in one buffer, the parts are
    also globally sorted). Items and users are given with :meth:`set_items` /
    :meth:`set_users`; if they are not given, tables with ids ``0..max id`` and empty
    text are written. ``meta.json`` is written last, then ``<out_dir>.partial`` is
    renamed onto ``out_dir``. Used as a context manager, an exception removes the
    partial directory and leaves any previous ``out_dir`` untouched.

    Scenarios and actions may grow while writing (:meth:`add_scenario`,
    :meth:`add_action`) for sources whose vocabulary is only known after reading
    them; indices of existing entries never change.

    Args:
        out_dir: dataset directory to create.
        name: dataset name (``meta.name``).
        scenarios: allowed scenario names, in index order.
        actions: action names; bit ``k`` of ``actions`` is ``actions[k]``.
        user_attrs: expected ``{attr column: cardinality}`` of users.parquet; ``None``
            computes cardinalities as ``max + 1`` of each ``attr_*`` column.
        source: provenance written to ``meta.source``.
        overwrite: replace an existing dataset at ``out_dir``.
        rows_per_part: rows per interaction parquet part.
    """

    def __init__(
        self,
        out_dir: str,
        name: str,
        scenarios: Sequence[str],
        actions: Sequence[str],
        user_attrs: Optional[Mapping[str, int]] = None,
        source: Optional[Mapping[str, Any]] = None,
        *,
        overwrite: bool = False,
        rows_per_part: int = 1 << 20,
    ) -> None:
        self.out_dir = os.path.abspath(out_dir)
        self.tmp_dir = self.out_dir + PARTIAL_SUFFIX
        self.name = name
        self.scenarios: List[str] = []
        self.actions: List[str] = []
        for s in scenarios:
            self.add_scenario(s)
        for a in actions:
            self.add_action(a)
        self.user_attrs = None if user_attrs is None else dict(user_attrs)
        self.source: Dict[str, Any] = dict(source or {})
        self.overwrite = overwrite
        if rows_per_part < 1:
            raise ValueError("rows_per_part must be >= 1")
        self.rows_per_part = rows_per_part
        self._check_target()

        if os.path.exists(self.tmp_dir):
            logger.warning("removing stale %s left by an interrupted write", self.tmp_dir)
            _remove_tree(self.tmp_dir)
        os.makedirs(os.path.join(self.tmp_dir, INTERACTIONS_DIR))
        self._input = f"{self.out_dir} (interactions given to DatasetWriter)"
        self._buffer: List[Dict[str, np.ndarray]] = []
        self._buffered = 0
        self._num_rows = 0
        self._num_parts = 0
        self._max_user = -1
        self._max_item = -1
        self._num_items: Optional[int] = None
        self._num_users: Optional[int] = None
        self._closed = False
        self.meta: Optional[DatasetMeta] = None

    # ----------------------------------------------------------------- vocabulary

    def add_scenario(self, name: str) -> int:
        """Adds scenario ``name`` if new; returns its index."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"scenario names must be non-empty strings, got {name!r}")
        if name not in self.scenarios:
            if len(self.scenarios) >= np.iinfo(np.int16).max:
                raise ValueError("too many scenarios")
            self.scenarios.append(name)
        return self.scenarios.index(name)

    def add_action(self, name: str) -> int:
        """Adds action ``name`` if new; returns its bit index."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"action names must be non-empty strings, got {name!r}")
        if name not in self.actions:
            if len(self.actions) >= MAX_ACTIONS:
                raise ValueError(f"at most {MAX_ACTIONS} actions fit the int64 bit mask")
            self.actions.append(name)
        return self.actions.index(name)

    def path(self, relname: str) -> str:
        """Path of an extra file inside the dataset being written (e.g. ground truth);
        it is moved into place with the rest on :meth:`close`."""
        return os.path.join(self.tmp_dir, relname)

    @property
    def num_rows(self) -> int:
        """Interactions added so far."""
        return self._num_rows

    # ----------------------------------------------------------------- interactions

    def add_interactions(self, batch: Batch) -> None:
        """Adds a batch of interactions.

        Args:
            batch: a mapping of column name to array (or a pyarrow Table/RecordBatch)
                with ``user_id``, ``item_id``, ``timestamp`` (int, shape [n]),
                ``label`` (0/1 or bool, [n]), ``scenario`` ([n] strings from
                ``scenarios``, [n] integer indices into ``scenarios``, or one scalar
                string for the whole batch), optional ``actions`` (int64 bit mask,
                default 0) and ``duration`` (float seconds, default 0).

        Raises:
            DataError: a value is invalid (record = index of the interaction among
                all interactions added to this writer).
        """
        self._check_open()
        cols = _batch_columns(batch)
        for name in ("user_id", "item_id", "scenario", "timestamp", "label"):
            if name not in cols:
                raise DataError(self._input, self._num_rows, name, "missing column")
        unknown = set(cols) - set(INTERACTION_COLUMNS)
        if unknown:
            raise DataError(self._input, self._num_rows, sorted(unknown)[0],
                            f"unknown column (expected {INTERACTION_COLUMNS})")
        user = _to_numpy(cols["user_id"])
        n = int(user.shape[0]) if user.ndim else 1
        if n == 0:
            return
        off = self._num_rows
        path = self._input
        out = {
            "user_id": _int_column(cols["user_id"], n, path, "user_id", off),
            "item_id": _int_column(cols["item_id"], n, path, "item_id", off),
            "timestamp": _int_column(cols["timestamp"], n, path, "timestamp", off),
            "label": _int_column(cols["label"], n, path, "label", off),
            "actions": _int_column(cols.get("actions", 0), n, path, "actions", off),
            "scenario": self._scenario_codes(cols["scenario"], n, off),
        }
        duration = _to_numpy(cols.get("duration", 0.0))
        if duration.ndim == 0:
            duration = np.full(n, duration)
        if duration.shape != (n,) or not (np.issubdtype(duration.dtype, np.number)
                                         and duration.dtype != bool):
            raise DataError(path, off, "duration",
                            f"expected {n} numbers, got {duration.dtype} {duration.shape}")
        out["duration"] = duration.astype(np.float32)

        checker = RowChecker(path, n, lambda i: off + i, False, ReadStats())
        _check_values(out, checker, len(self.actions), None, None)
        self._max_user = max(self._max_user, int(out["user_id"].max()))
        self._max_item = max(self._max_item, int(out["item_id"].max()))
        self._buffer.append(out)
        self._buffered += n
        self._num_rows += n
        if self._buffered >= self.rows_per_part:
            self._flush(final=False)

    def _scenario_codes(self, values: Any, n: int, off: int) -> np.ndarray:
        if isinstance(values, str):
            if values not in self.scenarios:
                raise DataError(self._input, off, "scenario",
                                f"unknown scenario {values!r} (known: {self.scenarios})")
            return np.full(n, self.scenarios.index(values), dtype=np.int16)
        arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else None
        if arr is None:
            np_vals = np.asarray(values)
            if np_vals.shape != (n,):
                raise DataError(self._input, off, "scenario",
                                f"expected {n} values, got shape {np_vals.shape}")
            if np.issubdtype(np_vals.dtype, np.integer):
                bad = (np_vals < 0) | (np_vals >= len(self.scenarios))
                if bad.any():
                    i = _first_bad(bad)
                    raise DataError(self._input, off + i, "scenario",
                                    f"scenario index {np_vals[i]} not in "
                                    f"[0, {len(self.scenarios)})")
                return np_vals.astype(np.int16)
            arr = pa.array(np_vals, type=pa.string())
        if pa.types.is_dictionary(arr.type):
            arr = arr.cast(arr.type.value_type)
        if pa.types.is_integer(arr.type):
            return self._scenario_codes(arr.to_numpy(zero_copy_only=False), n, off)
        idx = pc.index_in(arr, value_set=pa.array(self.scenarios, pa.string()))
        missing = _to_numpy(idx.is_null())
        if missing.any():
            i = _first_bad(missing)
            raise DataError(self._input, off + i, "scenario",
                            f"unknown scenario {arr[i].as_py()!r} (known: {self.scenarios})")
        return _to_numpy(idx).astype(np.int16)

    def _flush(self, final: bool) -> None:
        if not self._buffer:
            return
        cols = {k: np.concatenate([b[k] for b in self._buffer]) for k in self._buffer[0]}
        order = np.lexsort((cols["timestamp"], cols["user_id"]))
        cols = {k: v[order] for k, v in cols.items()}
        n = len(order)
        start = 0
        while n - start >= self.rows_per_part or (final and start < n):
            stop = min(start + self.rows_per_part, n)
            self._write_part({k: v[start:stop] for k, v in cols.items()})
            start = stop
        rest = {k: v[start:] for k, v in cols.items()}
        self._buffer = [rest] if start < n else []
        self._buffered = n - start

    def _write_part(self, cols: Dict[str, np.ndarray]) -> None:
        scen = pc.take(pa.array(self.scenarios, pa.string()), pa.array(cols["scenario"]))
        table = pa.table(
            {
                "user_id": pa.array(cols["user_id"], pa.int64()),
                "item_id": pa.array(cols["item_id"], pa.int64()),
                "scenario": scen,
                "actions": pa.array(cols["actions"], pa.int64()),
                "duration": pa.array(cols["duration"], pa.float32()),
                "timestamp": pa.array(cols["timestamp"], pa.int64()),
                "label": pa.array(cols["label"].astype(np.int8), pa.int8()),
            },
            schema=INTERACTION_SCHEMA,
        )
        path = os.path.join(self.tmp_dir, INTERACTIONS_DIR, PART_PATTERN.format(self._num_parts))
        pq.write_table(table, path, compression="zstd", row_group_size=1 << 16)
        self._num_parts += 1

    # ----------------------------------------------------------------- items / users

    def set_items(self, items: Batch) -> None:
        """Writes items.parquet.

        Args:
            items: mapping/table with ``text`` ([n] str), optional ``item_id``
                ([n] int, a permutation of ``0..n-1``; default ``arange(n)``),
                ``raw_id`` ([n] str; default ``str(item_id)``), ``image_path``
                ([n] str or null) and any extra columns (kept as given). Rows are
                stored ordered by ``item_id``, so row ``i`` is item ``i``.
        """
        self._check_open()
        table = self._id_table(items, "item_id", ITEMS_FILE, required=("text",))
        text = table.column("text")
        if not (pa.types.is_string(text.type) or pa.types.is_large_string(text.type)):
            raise DataError(ITEMS_FILE, 0, "text", f"expected strings, got {text.type}")
        if text.null_count:
            i = _first_bad(_to_numpy(text.is_null()))
            raise DataError(ITEMS_FILE, i, "text", "null text (use '' for items without content)")
        if "image_path" not in table.schema.names:
            table = table.append_column(ITEM_SCHEMA.field("image_path"),
                                        pa.nulls(len(table), pa.string()))
        table = _conform(table, ITEM_SCHEMA)
        pq.write_table(table, self.path(ITEMS_FILE), compression="zstd")
        self._num_items = len(table)

    def set_users(self, users: Batch) -> None:
        """Writes users.parquet.

        Args:
            users: mapping/table with optional ``user_id`` (permutation of
                ``0..n-1``), ``raw_id`` and ``attr_<name>`` columns (dense int ids
                >= 0; categorical user features).
        """
        self._check_open()
        table = self._id_table(users, "user_id", USERS_FILE, required=())
        attrs = {}
        for name in table.schema.names:
            if name in USER_SCHEMA.names:
                continue
            if not name.startswith(USER_ATTR_PREFIX):
                raise DataError(USERS_FILE, 0, name,
                                f"extra user columns must be named {USER_ATTR_PREFIX}<name>")
            col = table.column(name)
            if not pa.types.is_integer(col.type) or col.null_count:
                raise DataError(USERS_FILE, 0, name,
                                f"expected non-null integer attribute ids, got {col.type}")
            vals = _to_numpy(col).astype(np.int64)
            if len(vals) and vals.min() < 0:
                raise DataError(USERS_FILE, _first_bad(vals < 0), name, "negative attribute id")
            card = int(vals.max()) + 1 if len(vals) else 0
            if self.user_attrs is not None:
                if name not in self.user_attrs:
                    raise DataError(USERS_FILE, 0, name,
                                    f"attribute not declared in user_attrs {self.user_attrs}")
                if card > self.user_attrs[name]:
                    i = _first_bad(vals >= self.user_attrs[name])
                    raise DataError(USERS_FILE, i, name,
                                    f"value {vals[i]} >= declared cardinality "
                                    f"{self.user_attrs[name]}")
                card = self.user_attrs[name]
            attrs[name] = card
            table = table.set_column(table.schema.get_field_index(name),
                                     pa.field(name, pa.int64(), nullable=False),
                                     pa.array(vals, pa.int64()))
        if self.user_attrs is not None:
            missing = set(self.user_attrs) - set(attrs)
            if missing:
                raise DataError(USERS_FILE, 0, sorted(missing)[0], "declared attribute missing")
        self.user_attrs = attrs
        table = _conform(table, USER_SCHEMA)
        pq.write_table(table, self.path(USERS_FILE), compression="zstd")
        self._num_users = len(table)

    def _id_table(self, data: Batch, id_name: str, fname: str,
                  required: Sequence[str]) -> pa.Table:
        cols = _batch_columns(data)
        for name in required:
            if name not in cols:
                raise DataError(fname, 0, name, "missing column")
        n = None
        for name, v in cols.items():
            length = len(v)
            if n is not None and length != n:
                raise DataError(fname, 0, name, f"column has {length} rows, expected {n}")
            n = length
        n = n or 0
        if id_name in cols:
            ids = _int_column(cols[id_name], n, fname, id_name, 0)
            order = np.argsort(ids, kind="stable")
            if not np.array_equal(ids[order], np.arange(n)):
                raise DataError(fname, int(order[np.flatnonzero(ids[order] != np.arange(n))[0]]),
                                id_name, f"ids must be a permutation of 0..{n - 1} (dense)")
        else:
            ids = np.arange(n, dtype=np.int64)
            order = None
        arrays = {id_name: pa.array(ids, pa.int64())}
        if "raw_id" in cols:
            raw = cols["raw_id"]
            arrays["raw_id"] = raw if isinstance(raw, (pa.Array, pa.ChunkedArray)) \
                else pa.array(np.asarray(raw).astype(str), pa.string())
        else:
            arrays["raw_id"] = pc.cast(arrays[id_name], pa.string())
        for name, v in cols.items():
            if name not in (id_name, "raw_id"):
                arrays[name] = v if isinstance(v, (pa.Array, pa.ChunkedArray)) else pa.array(v)
        table = pa.table(arrays)
        if not pa.types.is_string(table.column("raw_id").type):
            table = table.set_column(1, "raw_id", pc.cast(table.column("raw_id"), pa.string()))
        if order is not None:
            table = table.take(pa.array(order))
        return table

    # ----------------------------------------------------------------- finish

    def close(self) -> DatasetMeta:
        """Writes the remaining part, default items/users, meta.json, and moves the
        dataset into place. Returns its :class:`DatasetMeta`."""
        self._check_open()
        try:
            self._flush(final=True)
            if self._num_parts == 0:  # an empty dataset still has a (0-row) part
                self._write_part({k: np.zeros(0, NUMPY_DTYPES[k]) for k in INTERACTION_COLUMNS})
            if self._num_items is None:
                logger.info("no items given: writing %d items without text", self._max_item + 1)
                self.set_items({"text": pa.array([""] * (self._max_item + 1), pa.string())})
            if self._num_users is None:
                self.set_users({"user_id": np.arange(self._max_user + 1)})
            if self._max_item >= self._num_items:
                raise DataError(self._input, "?", "item_id",
                                f"item id {self._max_item} >= number of items {self._num_items}")
            if self._max_user >= self._num_users:
                raise DataError(self._input, "?", "user_id",
                                f"user id {self._max_user} >= number of users {self._num_users}")
            self.meta = DatasetMeta(
                name=self.name,
                scenarios=list(self.scenarios),
                actions=list(self.actions),
                num_users=int(self._num_users),
                num_items=int(self._num_items),
                num_interactions=int(self._num_rows),
                user_attrs=dict(self.user_attrs or {}),
                source=self.source,
            )
            write_json(self.path(META_FILE), _meta_dict(self.meta))
            self._move_into_place()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.meta

    def abort(self) -> None:
        """Discards everything written so far."""
        self._closed = True
        _remove_tree(self.tmp_dir)

    def _check_target(self) -> None:
        if not os.path.exists(self.out_dir):
            return
        if not os.path.isdir(self.out_dir):
            raise FileExistsError(f"{self.out_dir} exists and is not a directory")
        if not os.listdir(self.out_dir):
            return
        if not self.overwrite:
            raise FileExistsError(
                f"{self.out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
        if not is_dataset_dir(self.out_dir):
            raise FileExistsError(
                f"refusing to replace {self.out_dir}: it is not empty and not a torchrec-mm "
                f"dataset (no {META_FILE})")

    def _move_into_place(self) -> None:
        self._check_target()  # the target may have appeared while we were writing
        old = None
        if os.path.exists(self.out_dir):
            if os.listdir(self.out_dir):
                old = f"{self.out_dir}.old-{os.getpid()}"
                _remove_tree(old)
                os.rename(self.out_dir, old)
            else:
                os.rmdir(self.out_dir)
        os.rename(self.tmp_dir, self.out_dir)
        if old is not None:
            _remove_tree(old)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("DatasetWriter is closed")

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._closed:
            return
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _meta_dict(meta: DatasetMeta) -> Dict[str, Any]:
    return dataclasses.asdict(meta)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Puts the schema's columns first with the schema's types; keeps extra columns."""
    arrays, fields = [], []
    for f in schema:
        arrays.append(pc.cast(table.column(f.name), f.type))
        fields.append(f)
    for name in table.schema.names:
        if name not in schema.names:
            arrays.append(table.column(name))
            fields.append(table.schema.field(name))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


# --------------------------------------------------------------------------- validation


def _check_values(cols: Dict[str, np.ndarray], checker: RowChecker, num_actions: int,
                  num_users: Optional[int], num_items: Optional[int]) -> None:
    """Row-level checks of the interaction columns present in ``cols``."""
    if "user_id" in cols:
        u = cols["user_id"]
        checker.fail(u < 0, "user_id", lambda i: f"negative user id {u[i]}")
        if num_users is not None:
            checker.fail(u >= num_users, "user_id",
                         lambda i: f"user id {u[i]} out of range [0, {num_users})")
    if "item_id" in cols:
        it = cols["item_id"]
        checker.fail(it < 0, "item_id", lambda i: f"negative item id {it[i]}")
        if num_items is not None:
            checker.fail(it >= num_items, "item_id",
                         lambda i: f"item id {it[i]} out of range [0, {num_items})")
    if "timestamp" in cols:
        t = cols["timestamp"]
        checker.fail(t < 0, "timestamp", lambda i: f"negative timestamp {t[i]}")
    if "label" in cols:
        y = cols["label"]
        checker.fail((y != 0) & (y != 1), "label", lambda i: f"label must be 0 or 1, got {y[i]}")
    if "actions" in cols:
        a = cols["actions"]
        checker.fail(a < 0, "actions", lambda i: f"negative action mask {a[i]}")
        limit = 1 << num_actions
        checker.fail(a >= limit, "actions",
                     lambda i: f"action mask {a[i]} sets a bit >= {num_actions} "
                     f"(the dataset has {num_actions} actions)")
    if "duration" in cols:
        d = cols["duration"]
        checker.fail(~np.isfinite(d) | (d < 0), "duration",
                     lambda i: f"duration must be finite and >= 0, got {d[i]}")


def _type_ok(name: str, t: pa.DataType) -> bool:
    if name == "scenario":
        if pa.types.is_dictionary(t):
            t = t.value_type
        return pa.types.is_string(t) or pa.types.is_large_string(t)
    if name == "duration":
        return pa.types.is_floating(t) or pa.types.is_integer(t)
    if name == "label":
        return pa.types.is_integer(t) or pa.types.is_boolean(t)
    return pa.types.is_integer(t)


def _part_files(data_dir: str) -> List[str]:
    d = os.path.join(data_dir, INTERACTIONS_DIR)
    if not os.path.isdir(d):
        raise FileNotFoundError(f"{d} not found: '{data_dir}' has no interactions")
    files = sorted(glob.glob(os.path.join(d, "*.parquet")))
    if not files:
        raise FileNotFoundError(f"no parquet parts in {d}")
    return files


def _read_batches(data_dir: str, meta: DatasetMeta, batch_size: int, skip_bad: bool,
                  stats: ReadStats) -> Iterator[Dict[str, np.ndarray]]:
    """Yields validated batches as numpy columns (NUMPY_DTYPES; scenario = index)."""
    scen_index = meta.scenario_index()
    for path in _part_files(data_dir):
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(path, "file", None, f"not a readable parquet file: {e}") from None
        for f in INTERACTION_SCHEMA:
            if f.name not in schema.names:
                raise DataError(path, "schema", f.name, "missing column")
            t = schema.field(f.name).type
            if not _type_ok(f.name, t):
                raise DataError(path, "schema", f.name, f"wrong type: expected {f.type}, got {t}")
        pf = pq.ParquetFile(path, read_dictionary=["scenario"])
        stats.files += 1
        offset = 0
        for batch in pf.iter_batches(batch_size=batch_size, columns=INTERACTION_COLUMNS):
            n = batch.num_rows
            base = offset
            checker = RowChecker(path, n, lambda i, base=base: base + i, skip_bad, stats)
            cols: Dict[str, np.ndarray] = {}
            for name in INTERACTION_COLUMNS:
                col = batch.column(name)
                if col.null_count:
                    checker.fail(_to_numpy(col.is_null()), name, "null value")
                if name == "scenario":
                    cols[name] = _scenario_index(col, scen_index, checker, meta)
                    continue
                col = col.fill_null(0) if col.null_count else col
                if pa.types.is_boolean(col.type):
                    col = col.cast(pa.int8())
                arr = _to_numpy(col)
                if name == "duration":
                    cols[name] = arr.astype(np.float32)
                else:
                    cols[name] = arr.astype(np.int64, copy=False)
            _check_values(cols, checker, len(meta.actions), meta.num_users, meta.num_items)
            keep = checker.keep()
            if not keep.all():
                cols = {k: v[keep] for k, v in cols.items()}
            cols["label"] = cols["label"].astype(np.int8)
            stats.rows += int(keep.sum())
            offset += n
            yield cols


def _scenario_index(col: pa.Array, scen_index: Dict[str, int], checker: RowChecker,
                    meta: DatasetMeta) -> np.ndarray:
    if pa.types.is_dictionary(col.type):
        names = col.dictionary.to_pylist()
        lut = np.array([scen_index.get(s, -1) for s in names] + [-1], dtype=np.int16)
        codes = _to_numpy(col.indices.fill_null(len(names))).astype(np.int64)
        out = lut[codes]
        nulls = _to_numpy(col.is_null()) if col.null_count else np.zeros(len(col), bool)
        checker.fail((out < 0) & ~nulls, "scenario",
                     lambda i: f"unknown scenario {names[codes[i]]!r} "
                     f"(meta.scenarios = {meta.scenarios})")
        return out
    idx = pc.index_in(col, value_set=pa.array(meta.scenarios, pa.string()))
    bad = _to_numpy(idx.is_null()) & ~_to_numpy(col.is_null())
    checker.fail(bad, "scenario", lambda i: f"unknown scenario {col[i].as_py()!r} "
                 f"(meta.scenarios = {meta.scenarios})")
    return _to_numpy(idx.fill_null(-1)).astype(np.int16)


# --------------------------------------------------------------------------- readers


def load_meta(data_dir: str) -> DatasetMeta:
    """Reads ``meta.json`` (raises FileNotFoundError if ``data_dir`` is no dataset)."""
    meta = DatasetMeta.load(data_dir)
    path = os.path.join(data_dir, META_FILE)
    if len(set(meta.scenarios)) != len(meta.scenarios) or not meta.scenarios:
        raise DataError(path, 0, "scenarios", f"must be unique and non-empty: {meta.scenarios}")
    if len(meta.actions) > MAX_ACTIONS:
        raise DataError(path, 0, "actions", f"at most {MAX_ACTIONS} actions")
    return meta


class InteractionReader:
    """Iterable of validated interaction ``pyarrow.RecordBatch`` es (INTERACTION_SCHEMA
    types); ``stats`` (a :class:`ReadStats`) is filled while iterating."""

    def __init__(self, data_dir: str, columns: Optional[Sequence[str]], batch_size: int,
                 skip_bad: bool) -> None:
        self.data_dir = data_dir
        self.meta = load_meta(data_dir)
        self.columns = list(columns) if columns is not None else list(INTERACTION_COLUMNS)
        for c in self.columns:
            if c not in INTERACTION_COLUMNS:
                raise KeyError(f"unknown interaction column {c!r}; columns: {INTERACTION_COLUMNS}")
        self.batch_size = batch_size
        self.skip_bad = skip_bad
        self.stats = ReadStats()

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        names = pa.array(self.meta.scenarios, pa.string())
        schema = pa.schema([INTERACTION_SCHEMA.field(c) for c in self.columns])
        for cols in _read_batches(self.data_dir, self.meta, self.batch_size, self.skip_bad,
                                  self.stats):
            arrays = []
            for c in self.columns:
                if c == "scenario":
                    arrays.append(pc.take(names, pa.array(cols[c])))
                else:
                    arrays.append(pa.array(cols[c], INTERACTION_SCHEMA.field(c).type))
            yield pa.RecordBatch.from_arrays(arrays, schema=schema)
        self.stats.log_bad(self.data_dir)


def iter_interactions(data_dir: str, columns: Optional[Sequence[str]] = None,
                      batch_size: int = 65536, skip_bad: bool = False) -> InteractionReader:
    """Streams validated interactions of all parts, in file order.

    Every column is read and validated (so the set of rows does not depend on
    ``columns``); only ``columns`` (default all) are returned.

    Returns:
        an iterable of ``pyarrow.RecordBatch`` (at most ``batch_size`` rows each, types
        of INTERACTION_SCHEMA) with a ``stats`` attribute (:class:`ReadStats`, complete
        once iteration finished).

    Raises:
        DataError: a missing column or a column of the wrong type (always; these are
            file-level problems), or a bad row (unless ``skip_bad``).
    """
    return InteractionReader(data_dir, columns, batch_size, skip_bad)


def load_interaction_columns(
    data_dir: str,
    columns: Optional[Sequence[str]] = None,
    skip_bad: bool = False,
    sort_by_user_time: bool = False,
    stats: Optional[ReadStats] = None,
) -> Dict[str, np.ndarray]:
    """Loads interaction columns into memory as compact numpy arrays.

    This is the in-memory index the batcher uses: ``user_id``/``item_id``/``actions``/
    ``timestamp`` int64, ``duration`` float32, ``label`` int8 and ``scenario`` int16
    (index into ``meta.scenarios``); each array has shape ``[num_valid_interactions]``
    and row ``k`` of every array is the same interaction.

    Args:
        columns: columns to return (default all).
        skip_bad: drop (and count in ``stats``) invalid rows instead of raising.
        sort_by_user_time: return rows ordered by ``(user_id, timestamp)`` over the
            whole dataset (parts are only sorted individually); stable.
        stats: optional :class:`ReadStats` to fill.
    """
    meta = load_meta(data_dir)
    wanted = list(columns) if columns is not None else list(INTERACTION_COLUMNS)
    for c in wanted:
        if c not in INTERACTION_COLUMNS:
            raise KeyError(f"unknown interaction column {c!r}; columns: {INTERACTION_COLUMNS}")
    stats = stats if stats is not None else ReadStats()
    chunks: Dict[str, List[np.ndarray]] = {c: [] for c in set(wanted) | (
        {"user_id", "timestamp"} if sort_by_user_time else set())}
    for cols in _read_batches(data_dir, meta, 1 << 18, skip_bad, stats):
        for c in chunks:
            chunks[c].append(cols[c])
    stats.log_bad(data_dir)
    out = {c: (np.concatenate(v) if v else np.zeros(0, NUMPY_DTYPES[c])).astype(
        NUMPY_DTYPES[c], copy=False) for c, v in chunks.items()}
    if sort_by_user_time:
        order = np.lexsort((out["timestamp"], out["user_id"]))
        out = {c: out[c][order] for c in wanted}
    return {c: out[c] for c in wanted}


def _read_table(data_dir: str, fname: str) -> pa.Table:
    path = os.path.join(data_dir, fname)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found")
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(path, "file", None, f"not a readable parquet file: {e}") from None


def _check_id_table(table: pa.Table, path: str, id_name: str, n: int) -> None:
    for f in (ITEM_SCHEMA if id_name == "item_id" else USER_SCHEMA):
        if f.name not in table.schema.names:
            raise DataError(path, "schema", f.name, "missing column")
    t = table.schema.field(id_name).type
    if not pa.types.is_integer(t):
        raise DataError(path, "schema", id_name, f"wrong type: expected int64, got {t}")
    if len(table) != n:
        raise DataError(path, len(table), id_name,
                        f"{len(table)} rows but meta.json says {n}")
    ids = _to_numpy(table.column(id_name).fill_null(-1))
    bad = ids != np.arange(n)
    if bad.any():
        i = _first_bad(bad)
        raise DataError(path, i, id_name,
                        f"row {i} has id {ids[i]}: rows must be ordered by dense id 0..{n - 1}")


def load_items(data_dir: str, columns: Optional[Sequence[str]] = None) -> pa.Table:
    """Reads items.parquet (validated). Row ``i`` is item ``i``.

    Returns:
        a ``pyarrow.Table`` with ``item_id`` int64, ``raw_id``/``text`` string,
        ``image_path`` string (nullable) and any extra columns.
    """
    meta = load_meta(data_dir)
    path = os.path.join(data_dir, ITEMS_FILE)
    table = _read_table(data_dir, ITEMS_FILE)
    _check_id_table(table, path, "item_id", meta.num_items)
    for name in ("raw_id", "text", "image_path"):
        t = table.schema.field(name).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
            raise DataError(path, "schema", name, f"wrong type: expected string, got {t}")
    text = table.column("text")
    if text.null_count:
        raise DataError(path, _first_bad(_to_numpy(text.is_null())), "text", "null text")
    if columns is not None:
        table = table.select(list(columns))
    return table


def load_users(data_dir: str, columns: Optional[Sequence[str]] = None) -> pa.Table:
    """Reads users.parquet (validated). Row ``u`` is user ``u``; ``attr_*`` columns
    are int64 in ``[0, meta.user_attrs[name])``."""
    meta = load_meta(data_dir)
    path = os.path.join(data_dir, USERS_FILE)
    table = _read_table(data_dir, USERS_FILE)
    _check_id_table(table, path, "user_id", meta.num_users)
    for name, card in meta.user_attrs.items():
        if name not in table.schema.names:
            raise DataError(path, "schema", name, "attribute listed in meta.json is missing")
        col = table.column(name)
        if not pa.types.is_integer(col.type):
            raise DataError(path, "schema", name, f"wrong type: expected int64, got {col.type}")
        vals = _to_numpy(col.fill_null(-1))
        bad = (vals < 0) | (vals >= card)
        if bad.any():
            i = _first_bad(bad)
            raise DataError(path, i, name, f"attribute id {vals[i]} not in [0, {card})")
    if columns is not None:
        table = table.select(list(columns))
    return table


# --------------------------------------------------------------------------- stats


@dataclass
class DatasetStats:
    """Summary of a validated dataset (``validate_dataset``)."""

    name: str
    num_users: int
    num_items: int
    num_interactions: int
    read: ReadStats
    ctr: float
    scenario_counts: Dict[str, int]
    scenario_ctr: Dict[str, float]
    action_rates: Dict[str, float]
    users_with_interactions: int
    items_with_interactions: int
    time_min: int
    time_max: int
    unsorted_parts: int
    user_attrs: Dict[str, int] = field(default_factory=dict)

    def format(self) -> str:
        n = max(self.num_interactions, 1)
        lines = [
            f"dataset        {self.name}",
            f"users          {self.num_users} ({self.users_with_interactions} with interactions)",
            f"items          {self.num_items} ({self.items_with_interactions} with interactions)",
            f"interactions   {self.num_interactions}",
            f"CTR (label=1)  {self.ctr:.4f}",
        ]
        if self.read.bad_rows:
            lines.append(f"bad rows       {self.read.bad_rows} skipped {self.read.bad_by_field}")
        if self.num_interactions:
            days = (self.time_max - self.time_min) / 86400.0
            lines.append(f"time span      {self.time_min} .. {self.time_max} ({days:.1f} days)")
        lines.append("scenarios      share    CTR")
        for s, c in self.scenario_counts.items():
            lines.append(f"  {s:<12} {c / n:7.2%}  {self.scenario_ctr[s]:.4f}  ({c})")
        if self.action_rates:
            lines.append("actions        rate")
            for a, r in self.action_rates.items():
                lines.append(f"  {a:<12} {r:.4f}")
        if self.user_attrs:
            lines.append("user attrs     " + ", ".join(f"{k}({v})" for k, v in
                                                       self.user_attrs.items()))
        if self.unsorted_parts:
            lines.append(f"WARNING        {self.unsorted_parts} parts not sorted by "
                         "(user_id, timestamp)")
        return "\n".join(lines)


def validate_dataset(data_dir: str, skip_bad: bool = False) -> DatasetStats:
    """Validates every file of the dataset and returns its statistics.

    Raises:
        DataError: the first problem found (bad rows only without ``skip_bad``;
            meta/items/users problems always).
    """
    meta = load_meta(data_dir)
    load_items(data_dir, columns=["item_id"])
    load_users(data_dir, columns=["user_id"])
    stats = ReadStats()
    n_scen = len(meta.scenarios)
    scen_counts = np.zeros(n_scen, np.int64)
    scen_clicks = np.zeros(n_scen, np.int64)
    action_counts = np.zeros(len(meta.actions), np.int64)
    user_seen = np.zeros(meta.num_users, bool)
    item_seen = np.zeros(meta.num_items, bool)
    t_min, t_max = np.iinfo(np.int64).max, -1
    unsorted = 0
    rows_seen = 0
    for path in _part_files(data_dir):
        pf = pq.ParquetFile(path)
        rows_seen += pf.metadata.num_rows
    for cols in _read_batches(data_dir, meta, 1 << 18, skip_bad, stats):
        s, y = cols["scenario"], cols["label"]
        scen_counts += np.bincount(s, minlength=n_scen)
        scen_clicks += np.bincount(s, weights=y, minlength=n_scen).astype(np.int64)
        a = cols["actions"]
        for k in range(len(meta.actions)):
            action_counts[k] += int(np.count_nonzero((a >> k) & 1))
        user_seen[cols["user_id"]] = True
        item_seen[cols["item_id"]] = True
        if len(y):
            t_min = min(t_min, int(cols["timestamp"].min()))
            t_max = max(t_max, int(cols["timestamp"].max()))
    # sortedness of each part (a cheap second pass over two columns)
    if not stats.bad_rows:
        for path in _part_files(data_dir):
            t = pq.read_table(path, columns=["user_id", "timestamp"])
            u = _to_numpy(t.column("user_id"))
            ts = _to_numpy(t.column("timestamp"))
            if len(u) > 1:
                du, dt = np.diff(u), np.diff(ts)
                if ((du < 0) | ((du == 0) & (dt < 0))).any():
                    unsorted += 1
    if stats.bad_rows == 0 and rows_seen != meta.num_interactions:
        raise DataError(os.path.join(data_dir, META_FILE), 0, "num_interactions",
                        f"meta.json says {meta.num_interactions} but the parts hold {rows_seen}")
    n = int(scen_counts.sum())
    return DatasetStats(
        name=meta.name,
        num_users=meta.num_users,
        num_items=meta.num_items,
        num_interactions=n,
        read=stats,
        ctr=float(scen_clicks.sum() / n) if n else 0.0,
        scenario_counts={s: int(c) for s, c in zip(meta.scenarios, scen_counts)},
        scenario_ctr={s: float(k / c) if c else 0.0
                      for s, c, k in zip(meta.scenarios, scen_counts, scen_clicks)},
        action_rates={a: float(c / n) if n else 0.0 for a, c in zip(meta.actions, action_counts)},
        users_with_interactions=int(user_seen.sum()),
        items_with_interactions=int(item_seen.sum()),
        time_min=int(t_min) if n else 0,
        time_max=int(t_max) if n else 0,
        unsorted_parts=unsorted,
        user_attrs=dict(meta.user_attrs),
    )
