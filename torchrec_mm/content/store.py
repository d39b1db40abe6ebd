"""Reading the output of the encode job (``encode_job.encode_items``).

:class:`ContentStore` maps item ids to their stored states. Chunk files are
memory-mapped (the safetensors layout is a JSON header followed by raw little-endian
arrays, so each tensor is a ``numpy.memmap`` view; nothing is unpickled) and only
the requested rows are read and converted to float32.
"""

import json
import os
import struct
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from torchrec_mm.content.encode_job import MANIFEST_FILE, MANIFEST_FORMAT

_ST_DTYPES = {"F16": (np.float16, None), "F32": (np.float32, None), "I64": (np.int64, None),
              "BF16": (np.uint16, torch.bfloat16), "F64": (np.float64, None)}
FALLBACKS = (None, "zeros", "mean")


def mmap_safetensors(path: str) -> Dict[str, Tuple[np.ndarray, Optional[torch.dtype]]]:
    """Memory-maps every tensor of a safetensors file.

    Returns:
        ``{name: (array, view_dtype)}``; ``view_dtype`` is set when the numpy array
        holds raw bits to reinterpret in torch (bfloat16).
    """
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}")
        np_dtype, view = _ST_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == begin:
            arr = np.zeros(shape, dtype=np_dtype)
        else:
            arr = np.memmap(path, dtype=np_dtype, mode="r", offset=base + begin, shape=shape)
        out[name] = (arr, view)
    return out


class MissingItemError(KeyError):
    """An item id is not in the content store (the message names it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _to_float(arr: np.ndarray, view: Optional[torch.dtype]) -> torch.Tensor:
    """float32 copy (never a view of the read-only memory map)."""
    t = torch.from_numpy(np.array(arr, copy=True))
    if view is not None:
        t = t.view(view)
    return t.float()


class ContentStore:
    """Item id → content states written by the encode job.

    Args:
        path: the job's output directory (or its ``manifest.json``).
        in_memory: load all chunks into RAM up front (one gather per lookup instead
            of one per touched chunk).

    Example::

        store = ContentStore("out/content")
        z = store.get(torch.tensor([3, 17]), field="layer_groups")  # [2, G, D]
        table = store.as_table("pooled")                             # [num_items, D]
        store.missing                                                # bool [num_items]
    """

    def __init__(self, path: str, in_memory: bool = False) -> None:
        directory = os.path.dirname(path) if path.endswith(".json") else path
        manifest_path = os.path.join(directory, MANIFEST_FILE)
        if not os.path.exists(manifest_path):
            hint = (" (the encode job has not finished: run it again to resume)"
                    if os.path.exists(os.path.join(directory, "job.json")) else "")
            raise FileNotFoundError(f"{manifest_path} not found: no content store at "
                                    f"{directory!r}{hint}")
        with open(manifest_path) as f:
            self.manifest: Dict[str, Any] = json.load(f)
        if self.manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{manifest_path}: unsupported format "
                             f"{self.manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        self.path = directory
        self.num_items: int = int(self.manifest["num_items"])
        self.fields: Dict[str, Dict[str, Any]] = self.manifest["fields"]
        self._chunks: List[Dict[str, Tuple[np.ndarray, Optional[torch.dtype]]]] = []
        chunk_of = np.full(self.num_items, -1, dtype=np.int64)
        row_of = np.full(self.num_items, -1, dtype=np.int64)
        for c, info in enumerate(self.manifest["chunks"]):
            file = os.path.join(directory, info["file"])
            if not os.path.exists(file):
                raise FileNotFoundError(f"{file} listed in {manifest_path} is missing")
            tensors = mmap_safetensors(file)
            missing = [f for f in list(self.fields) + ["item_id"] if f not in tensors]
            if missing:
                raise ValueError(f"{file}: missing tensors {missing}")
            ids = np.asarray(tensors["item_id"][0])
            if ids.size and (ids.min() < 0 or ids.max() >= self.num_items):
                raise ValueError(f"{file}: item ids outside [0, {self.num_items})")
            chunk_of[ids] = c
            row_of[ids] = np.arange(ids.size)
            if in_memory:
                tensors = {k: (np.array(a), v) for k, (a, v) in tensors.items()}
            self._chunks.append(tensors)
        self._chunk_of = chunk_of
        self._row_of = row_of
        self.missing: torch.Tensor = torch.from_numpy(chunk_of < 0)
        """``bool [num_items]``: items without stored states."""
        self._means: Dict[str, torch.Tensor] = {}

    # ----------------------------------------------------------------- properties
    @property
    def item_ids(self) -> torch.Tensor:
        """``int64 [num_encoded]`` ids of the stored items, ascending."""
        return torch.from_numpy(np.nonzero(self._chunk_of >= 0)[0])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def num_groups(self) -> int:
        return int(self.manifest["num_groups"])

    @property
    def layer_groups(self) -> List[List[int]]:
        return self.manifest["layer_groups"]

    def __len__(self) -> int:
        return int(self.manifest["num_encoded"])

    def __contains__(self, item_id: int) -> bool:
        return 0 <= int(item_id) < self.num_items and self._chunk_of[int(item_id)] >= 0

    def contains(self, item_ids: torch.Tensor) -> torch.Tensor:
        """``bool`` tensor of ``item_ids``' shape: which ids are stored."""
        ids = np.asarray(torch.as_tensor(item_ids).cpu(), dtype=np.int64)
        ok = (ids >= 0) & (ids < self.num_items)
        out = np.zeros(ids.shape, dtype=bool)
        out[ok] = self._chunk_of[ids[ok]] >= 0
        return torch.from_numpy(out)

    def shape(self, field: str) -> Tuple[int, ...]:
        """Per-item shape of ``field`` (e.g. ``(D,)``, ``(G, D)``)."""
        self._check_field(field)
        return tuple(self.fields[field]["shape"])

    def _check_field(self, field: str) -> None:
        if field not in self.fields:
            raise KeyError(f"unknown field {field!r}; {self.path} stores {sorted(self.fields)}")

    # -------------------------------------------------------------------- lookups
    def get(self, item_ids: torch.Tensor, field: str = "pooled",
            fallback: Optional[str] = None) -> torch.Tensor:
        """States of ``item_ids``.

        Args:
            item_ids: int tensor of any shape ``S``.
            field: ``pooled``, ``emb_token``, ``layer_groups`` (or ``per_layer``).
            fallback: for ids not in the store: ``None`` raises
                :class:`MissingItemError` (a ``KeyError``) naming
                the item, ``"zeros"`` returns zeros, ``"mean"`` the mean over items.

        Returns:
            float32 ``[*S, *shape(field)]``.
        """
        self._check_field(field)
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
        ids_t = torch.as_tensor(item_ids)
        ids = np.asarray(ids_t.detach().cpu(), dtype=np.int64).reshape(-1)
        found = np.asarray(self.contains(torch.from_numpy(ids)))
        if not found.all() and fallback is None:
            bad = ids[~found]
            raise MissingItemError(f"item {int(bad[0])} is not in the content store {self.path} "
                           f"({bad.size} of {ids.size} requested ids missing; the store "
                           f"holds {len(self)} of {self.num_items} items); pass "
                           "fallback='zeros' or 'mean' to substitute")
        out = torch.zeros((ids.size,) + self.shape(field), dtype=torch.float32)
        hit = np.nonzero(found)[0]
        chunks, rows = self._chunk_of[ids[hit]], self._row_of[ids[hit]]
        order = np.lexsort((rows, chunks))  # by chunk, then row: sequential reads
        bounds = np.flatnonzero(np.diff(chunks[order])) + 1
        for part in np.split(order, bounds):
            if part.size == 0:
                continue
            arr, view = self._chunks[int(chunks[part[0]])][field]
            out[torch.from_numpy(hit[part])] = _to_float(arr[rows[part]], view)
        if fallback == "mean" and hit.size < ids.size:
            out[torch.from_numpy(np.nonzero(~found)[0])] = self.mean(field)
        return out.reshape(tuple(ids_t.shape) + self.shape(field))

    def mean(self, field: str = "pooled") -> torch.Tensor:
        """Mean over stored items, float32 ``shape(field)`` (cached)."""
        if field not in self._means:
            self._check_field(field)
            total = torch.zeros(self.shape(field), dtype=torch.float64)
            for tensors in self._chunks:
                arr, view = tensors[field]
                total += _to_float(arr, view).double().sum(0)
            self._means[field] = (total / max(1, len(self))).float()
        return self._means[field]

    def as_table(self, field: str = "pooled", fill: str = "zeros") -> torch.Tensor:
        """Dense float32 table ``[num_items, *shape(field)]`` indexed by item id; rows of
        items in :attr:`missing` are zeros (``fill="zeros"``) or the mean (``"mean"``)."""
        if fill not in ("zeros", "mean"):
            raise ValueError(f"fill must be 'zeros' or 'mean', got {fill!r}")
        self._check_field(field)
        table = torch.zeros((self.num_items,) + self.shape(field), dtype=torch.float32)
        for c, tensors in enumerate(self._chunks):
            ids = torch.from_numpy(np.array(tensors["item_id"][0], dtype=np.int64))
            arr, view = tensors[field]
            table[ids] = _to_float(arr, view)
        if fill == "mean" and bool(self.missing.any()):
            table[self.missing] = self.mean(field)
        return table

    # --------------------------------------------------------------- online side
    def encoder_config(self, **overrides: Any):  # -> ContentEncoderConfig
        """The :class:`ContentEncoderConfig` the states were computed with."""
        from torchrec_mm.content.encoder import ContentEncoderConfig

        cfg = dict(self.manifest["encoder"])
        cfg.update(overrides)
        return ContentEncoderConfig.from_dict(cfg)

    def build_encoder(self, **overrides: Any):  # -> ContentEncoder
        """The encoder of this store (same model, prompt, layer groups and pooling
        weights) to encode new items online, e.g. ``build_encoder(device="cuda")``."""
        from torchrec_mm.content.encoder import ContentEncoder
        from torchrec_mm.utils.io import load_tensors

        encoder = ContentEncoder(self.encoder_config(**overrides))
        pooling = os.path.join(self.path, self.manifest["pooling_file"])
        encoder.pooling.load_state_dict(load_tensors(pooling))
        return encoder
