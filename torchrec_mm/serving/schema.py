"""Schema of an item store: named fields with a fixed dtype and per-item shape.

A record is one item's values of *every* field of the schema (written together, so a
record is always complete) plus the ``version`` string of the put that wrote it (the
model that produced the values). Typical schemas::

    proxies = StoreSchema.of(p_coarse=("float32", (64,)), z_groups=("float16", (3, 384)))
    codes = StoreSchema.of(vq=("int32", (25,)), rq=("int32", (6,)))

Values are stored little-endian in the field's dtype; :meth:`ItemStore.get` returns
them widened for the model (floats → ``float32``, integers → ``int64``, ``bool`` stays)
unless ``raw=True``.
"""

import json
import re
import sys
from dataclasses import dataclass, field
from typing import (TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence,
                    Tuple, Union)

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily: writer processes start without it
    import torch

SCHEMA_FORMAT = "torchrec-mm/item-store-v1"

# dtype name -> little-endian storage dtype in numpy (the torch dtype has the same name).
# bfloat16 has no numpy dtype: its bits are stored as uint16 and reinterpreted in torch.
DTYPES: Dict[str, np.dtype] = {
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "bool": np.dtype("?"),
}
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
MAX_VERSION_BYTES = 256


class SchemaMismatchError(ValueError):
    """A store was opened with a schema that differs from the one it was created with
    (the message names the store and every differing field)."""


class StoreUnavailableError(ConnectionError):
    """The store's server could not be reached within the retry budget (the message
    names ``host:port``, the operation, the attempts and the last error)."""


@dataclass(frozen=True)
class FieldSpec:
    """One field of a record.

    Attributes:
        dtype: storage dtype, a key of :data:`DTYPES` (``"float16"``, ``"int32"``, ...).
        shape: per-item shape, e.g. ``(64,)`` or ``(3, 384)``; ``()`` for a scalar.
        fill: value of this field returned for ids that are not in the store (the
            documented fallback; e.g. the VQ "no code" index for a code field).
    """

    dtype: str
    shape: Tuple[int, ...]
    fill: float = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {self.dtype!r}; one of {sorted(DTYPES)}")
        shape = tuple(int(s) for s in self.shape)
        if any(s < 1 for s in shape):
            raise ValueError(f"shape must have positive sizes, got {shape}")
        object.__setattr__(self, "shape", shape)
        if isinstance(self.fill, bool) or not isinstance(self.fill, (int, float)):
            raise ValueError(f"fill must be a number, got {self.fill!r}")

    @property
    def storage_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_dtype(self) -> "torch.dtype":
        """dtype of the raw (stored) values."""
        import torch

        return getattr(torch, self.dtype)

    @property
    def output_dtype(self) -> "torch.dtype":
        """dtype :meth:`ItemStore.get` returns by default: float32 for floats, int64
        for integers (index tensors), bool for bool."""
        import torch

        if self.dtype in FLOAT_DTYPES:
            return torch.float32
        return torch.bool if self.dtype == "bool" else torch.int64

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Bytes of one item's value."""
        return self.numel * self.storage_dtype.itemsize

    def describe(self) -> str:
        fill = "" if self.fill == 0 else f" fill={self.fill:g}"
        return f"{self.dtype}[{','.join(map(str, self.shape))}]{fill}"

    def to_dict(self) -> Dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "fill": self.fill}


@dataclass(frozen=True)
class StoreSchema:
    """The fields of a store, in a fixed order.

    Example::

        StoreSchema({"p_coarse": FieldSpec("float32", (64,)),
                     "vq": FieldSpec("int32", (25,), fill=-1)})
    """

    fields: Mapping[str, FieldSpec] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.fields:
            raise ValueError("a store schema needs at least one field")
        for name, spec in self.fields.items():
            if not isinstance(name, str) or not _NAME.match(name):
                raise ValueError(f"invalid field name {name!r}: letters, digits and '_', "
                                 "not starting with a digit, at most 64 characters")
            if not isinstance(spec, FieldSpec):
                raise ValueError(f"field {name!r}: expected a FieldSpec, got {spec!r}")
        object.__setattr__(self, "fields", dict(self.fields))

    @staticmethod
    def of(**fields: Union[FieldSpec, Tuple[str, Sequence[int]],
                           Tuple[str, Sequence[int], float]]) -> "StoreSchema":
        """``StoreSchema.of(p_coarse=("float32", (64,)), vq=("int32", (25,), -1))``."""
        return StoreSchema({k: v if isinstance(v, FieldSpec) else FieldSpec(*v)
                            for k, v in fields.items()})

    @property
    def names(self) -> List[str]:
        return list(self.fields)

    def __getitem__(self, name: str) -> FieldSpec:
        return self.fields[name]

    def __contains__(self, name: object) -> bool:
        return name in self.fields

    def describe(self) -> str:
        return ", ".join(f"{k}: {v.describe()}" for k, v in self.fields.items())

    def to_dict(self) -> Dict[str, Any]:
        return {"format": SCHEMA_FORMAT,  # a list: the field order is part of the schema
                "fields": [{"name": k, **v.to_dict()} for k, v in self.fields.items()]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(raw: Mapping[str, Any], source: str = "schema") -> "StoreSchema":
        if raw.get("format") != SCHEMA_FORMAT:
            raise ValueError(f"{source}: unsupported store format {raw.get('format')!r}, "
                             f"expected {SCHEMA_FORMAT!r}")
        try:
            return StoreSchema({v["name"]: FieldSpec(v["dtype"], tuple(v["shape"]),
                                                     v.get("fill", 0))
                                for v in raw["fields"]})
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: invalid store schema: {e}") from None

    @staticmethod
    def from_json(text: Union[str, bytes], source: str = "schema") -> "StoreSchema":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: invalid schema JSON: {e.msg}") from None
        return StoreSchema.from_dict(raw, source)

    def check_same(self, stored: "StoreSchema", where: str) -> None:
        """Raises :class:`SchemaMismatchError` naming every field that differs between
        ``self`` (the schema asked for) and ``stored`` (the store's own)."""
        problems = []
        for name in list(stored.fields) + [f for f in self.fields if f not in stored.fields]:
            want, have = self.fields.get(name), stored.fields.get(name)
            if want == have:
                continue
            if want is None:
                problems.append(f"field '{name}' ({have.describe()}) is in the store but "
                                "not in the requested schema")
            elif have is None:
                problems.append(f"field '{name}' ({want.describe()}) is not in the store")
            else:
                problems.append(f"field '{name}' is {have.describe()} in the store, "
                                f"requested {want.describe()}")
        if not problems and list(self.fields) != list(stored.fields):
            problems.append(f"field order differs: store {stored.names}, requested "
                            f"{self.names}")
        if problems:
            raise SchemaMismatchError(f"{where}: schema mismatch: " + "; ".join(problems)
                                      + f" (the store holds {stored.describe()})")


def check_version(version: str) -> bytes:
    """UTF-8 bytes of a record-set version string (non-empty, at most 256 bytes)."""
    if not isinstance(version, str) or not version:
        raise ValueError(f"version must be a non-empty string (the model that produced "
                         f"the records), got {version!r}")
    raw = version.encode("utf-8")
    if len(raw) > MAX_VERSION_BYTES:
        raise ValueError(f"version is {len(raw)} bytes long, at most {MAX_VERSION_BYTES}")
    return raw


def as_id_array(ids: Any, what: str = "ids") -> np.ndarray:
    """int64 numpy array (any shape) of item ids from a tensor, array or sequence."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"{what}: expected integer item ids, got a {ids.dtype} tensor")
        return ids.detach().cpu().numpy().astype(np.int64, copy=False)
    arr = np.asarray(ids)
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{what}: expected integer item ids, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{what}: id {int(arr.max())} does not fit in int64")
    return arr.astype(np.int64, copy=False)


def iter_fields(schema: StoreSchema, fields: Optional[Iterable[str]], where: str) -> List[str]:
    """The requested field names (all by default), each checked against the schema."""
    if fields is None:
        return schema.names
    if isinstance(fields, str):
        fields = [fields]
    out = list(fields)
    for f in out:
        if f not in schema.fields:
            raise KeyError(f"{where}: unknown field {f!r}; the store has {schema.names}")
    return out
