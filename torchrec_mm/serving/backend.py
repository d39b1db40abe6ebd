"""The contract between :class:`~torchrec_mm.serving.store.ItemStore` and its storage
backends, and the checks every put goes through before it reaches one.

Backends work on numpy arrays only (torch is not imported here), so writer processes
start fast. :func:`prepare_put` turns the caller's values into the storage layout:

* every schema field present (a record is written whole), none unknown;
* shape ``[n, *field.shape]``; floats finite (NaN/Inf rejected, also values that
  overflow a narrower storage dtype such as float16); integers in the storage range;
* duplicate ids: the **last** occurrence wins; the batch reaches the backend with unique
  ids in ascending order.
"""

import abc
import sys
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from torchrec_mm.data.schema import DataError
from torchrec_mm.serving.schema import FieldSpec, StoreSchema, as_id_array, check_version


class StoreBackend(abc.ABC):
    """Storage of fixed-width records keyed by int64 item id.

    Attributes:
        location: where the store lives, for messages (path or ``redis://host:port/db``).
        schema: the store's own schema (read from the store on open).
    """

    location: str
    schema: StoreSchema

    @abc.abstractmethod
    def put(self, ids: np.ndarray, values: Dict[str, np.ndarray], version: bytes) -> None:
        """Writes one batch atomically: a reader sees all of it or none of it.

        Args:
            ids: int64 ``[n]``, unique, ascending.
            values: ``{field: [n, *shape]}`` in the field's storage dtype, every field.
            version: UTF-8 version string of the batch.
        """

    @abc.abstractmethod
    def get(self, ids: np.ndarray, fields: List[str], with_versions: bool = False
            ) -> Tuple[Dict[str, np.ndarray], np.ndarray, Optional[np.ndarray]]:
        """Reads records; ids may repeat and be missing.

        Args:
            ids: int64 ``[m]``.
            fields: names to read (may be empty: only ``found``).
            with_versions: also return each record's version.

        Returns:
            ``(values, found, versions)``: ``values[f]`` ``[m, *shape]`` in the storage
            dtype, writable, zeros in rows of missing ids; ``found`` bool ``[m]``;
            ``versions`` object ``[m]`` (``str`` or ``None``) when asked for.
        """

    @abc.abstractmethod
    def delete(self, ids: np.ndarray) -> int:
        """Removes the records of ``ids`` (int64 ``[n]``, unique) atomically; returns how
        many existed."""

    @abc.abstractmethod
    def count(self) -> int:
        """Number of records."""

    @abc.abstractmethod
    def ids(self) -> np.ndarray:
        """int64 ids of all records, ascending."""

    @abc.abstractmethod
    def close(self) -> None:
        """Releases files / connections (idempotent)."""


_FLOAT_MAX = {"float16": 65504.0, "bfloat16": 3.3895e38, "float32": 3.4028e38,
              "float64": 1.7977e308}


def _as_numpy(value: Any) -> np.ndarray:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()  # exact: every bfloat16 is a float32
        return t.numpy()
    return np.asarray(value)


def _first_bad(bad_rows: np.ndarray, ids: np.ndarray) -> int:
    return int(ids[int(np.flatnonzero(bad_rows)[0])])


def _to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 → bfloat16 bits (uint16), like torch's cast."""
    f = np.ascontiguousarray(x, dtype=np.float32)
    bits = f.view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    out = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(f)
    if nan.any():
        out[nan] = 0x7FC0
    return out.astype("<u2", copy=False)


def to_storage(name: str, spec: FieldSpec, value: Any, ids: np.ndarray,
               where: str) -> np.ndarray:
    """Checks one field of a put batch and converts it to the storage dtype.

    Raises:
        DataError: naming ``where``, the item id (or ``batch``) and the field.
    """
    n = ids.shape[0]
    arr = _as_numpy(value)
    if arr.shape != (n,) + spec.shape:
        raise DataError(where, "batch", name,
                        f"expected shape [{', '.join(map(str, (n,) + spec.shape))}] "
                        f"({n} ids x {spec.describe()}), got {list(arr.shape)}")
    kind = arr.dtype.kind
    rows = arr.reshape(n, spec.numel)
    if spec.is_float:
        if kind not in "fiub":
            raise DataError(where, "batch", name, f"expected numbers, got dtype {arr.dtype}")
        if kind == "f":
            bad = ~np.isfinite(rows).all(axis=1)
            if bad.any():
                raise DataError(where, f"item {_first_bad(bad, ids)}", name,
                                f"NaN/Inf value ({int(bad.sum())} of {n} items in this "
                                "batch); nothing of the batch was written")
        if spec.dtype == "bfloat16":
            out = _to_bfloat16_bits(arr)
            stored = (out.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            with np.errstate(over="ignore"):
                out = arr.astype(spec.storage_dtype)
            stored = out
        if spec.storage_dtype.itemsize < arr.dtype.itemsize or kind in "iu":
            bad = ~np.isfinite(stored.reshape(n, spec.numel)).all(axis=1)
            if bad.any():
                raise DataError(where, f"item {_first_bad(bad, ids)}", name,
                                f"value overflows {spec.dtype} (largest finite "
                                f"{_FLOAT_MAX[spec.dtype]:.4g}); nothing of the batch "
                                "was written")
        return np.ascontiguousarray(out)
    if spec.dtype == "bool":
        if kind == "b":
            return np.ascontiguousarray(arr, dtype=np.bool_)
        if kind not in "iu":
            raise DataError(where, "batch", name, f"expected bool values, got dtype {arr.dtype}")
        bad = ((rows != 0) & (rows != 1)).any(axis=1)
        if bad.any():
            raise DataError(where, f"item {_first_bad(bad, ids)}", name,
                            "expected bool (0/1) values")
        return np.ascontiguousarray(arr != 0)
    if kind not in "iub":
        raise DataError(where, "batch", name,
                        f"expected integer values for {spec.describe()}, got dtype {arr.dtype}")
    info = np.iinfo(spec.storage_dtype)
    if rows.size and kind != "b":
        bad = (rows < info.min).any(axis=1) | (rows > info.max).any(axis=1)
        if bad.any():
            raise DataError(where, f"item {_first_bad(bad, ids)}", name,
                            f"value outside the {spec.dtype} range [{info.min}, {info.max}]")
    return np.ascontiguousarray(arr.astype(spec.storage_dtype, copy=False))


def last_wins(ids: np.ndarray) -> np.ndarray:
    """Positions of the last occurrence of each distinct id, in ascending id order."""
    n = ids.shape[0]
    order = np.lexsort((np.arange(n), ids))
    s = ids[order]
    last = np.ones(n, dtype=bool)
    last[:-1] = s[1:] != s[:-1]
    return order[last]


def prepare_put(schema: StoreSchema, ids: Any, values: Mapping[str, Any], version: str,
                where: str) -> Tuple[np.ndarray, Dict[str, np.ndarray], bytes]:
    """Validates a put batch; returns ``(unique ascending ids, storage arrays, version)``.

    Duplicate ids: the last occurrence wins.
    """
    v = check_version(version)
    ids_arr = as_id_array(ids)
    if ids_arr.ndim != 1:
        raise DataError(where, "batch", "ids", f"expected a 1-D [n] id tensor, got shape "
                        f"{list(ids_arr.shape)}")
    if not isinstance(values, Mapping):
        raise ValueError(f"{where}: values must be a mapping {{field: tensor}}, got "
                         f"{type(values).__name__}")
    unknown = [k for k in values if k not in schema.fields]
    if unknown:
        raise DataError(where, "batch", unknown[0], f"unknown field; the store has "
                        f"{schema.names}")
    missing = [k for k in schema.names if k not in values]
    if missing:
        raise DataError(where, "batch", missing[0],
                        "missing: a put writes whole records, every field of "
                        f"{schema.names} is needed")
    arrays = {k: to_storage(k, schema[k], values[k], ids_arr, where) for k in schema.names}
    keep = last_wins(ids_arr)
    if keep.shape[0] != ids_arr.shape[0] or not np.array_equal(keep, np.arange(keep.shape[0])):
        ids_arr = ids_arr[keep]
        arrays = {k: a[keep] for k, a in arrays.items()}
    return np.ascontiguousarray(ids_arr, dtype=np.int64), arrays, v


def unique_ids(ids: Any) -> np.ndarray:
    """Distinct ids (any shape in), int64 ascending."""
    return np.unique(as_id_array(ids).reshape(-1))
