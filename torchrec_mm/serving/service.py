"""``torchrec-mm serve-items``: the new-item generation service of the online path
(IDProxy §3.2.4, QARM §3: new items get their proxies / codes as they arrive, written
to online storage keyed by item id, read by the ranker's plugins).

Items are JSON objects ``{"item_id": int, "text": str, "image_path"?: str}`` and come

* as ``*.jsonl`` files dropped into a watched directory (write them elsewhere and
  rename them in: hidden files and other suffixes are ignored), and/or
* in ``POST /items`` requests (a JSON list, or JSONL / one object, as the body).

A single writer thread takes items from a bounded queue in batches of up to
``batch_size``, encodes them with the trained models and writes one
:meth:`ItemStore.put` per store and batch (atomic: a reader never sees half a batch,
also when the service is killed mid-put). The records follow
:mod:`torchrec_mm.serving.fields`:

* IDProxy store (``--idproxy PROXIES_DIR``): ``p_coarse`` float32[d] and ``z``
  float32[G*r] — the stage-1 proxy and the layer-group states (rounded to float16 as
  in the artefact, then projected on its per-group basis, ``z_rank`` r, which must be
  the ranker's ``idproxy`` ``z_rank``) from
  :class:`~torchrec_mm.idproxy.generate.ProxyGenerator`;
* QARM store (``--qarm-align ALIGN_DIR --qarm-codes CODES_DIR``): ``vq`` int32[K] and
  ``rq`` int32[L] — :meth:`QARMCodes.assign_new` of the aligned representation
  (:class:`~torchrec_mm.qarm.represent.AlignedRepresenter`);

each with the ``version`` of its artefact (:func:`~torchrec_mm.serving.fields.
artifact_version`: the proxies directory, the codes directory — the alignment is
checked at start to be the one the codes were built from). The two stores are written
one atomic put each, concurrently: an item can be in one store and not yet in the
other for the duration of a put (or, after a kill between the two, until the batch is
replayed — files: from the ledger; HTTP: by the client, see below).

Guarantees:

* **Idempotent**: an item sent again is recomputed and overwritten with the same
  version and the same values — bit for bit when it is encoded in the same batch (a
  re-sent file), else up to the encoder's padding noise (~1e-6). **Duplicate ids**
  within a request, file or batch: the last one wins.
* **Resumable** (watched files): a ledger (``<watch>/.serve-items-ledger.json``,
  replaced atomically after every batch) records per file its size, mtime, SHA-256,
  batch partition and the batches written. A restarted service skips finished files
  and resumes a half-processed one at its first unwritten batch (a batch written
  just before a kill, whose ledger update was lost, is written again: idempotent).
  A file whose content changed is processed again from the start; a ledger of other
  artefact versions is started afresh (every file is processed for the new models).
* **Back-pressure**: the queue holds at most ``queue_items`` items; the watcher blocks
  while it is full, ``POST /items`` answers ``503`` with ``Retry-After``. A watched
  file larger than ``max_file_bytes`` is not read (``failed`` in the ledger).
* **Faults**: a malformed item is answered with ``400`` naming the record and field
  (in a file: logged and recorded in the ledger, the other items are processed); an
  item the models fail on (or that yields NaN/Inf) is reported as failed, its batch's
  other items are written; a store that is down (e.g. Redis stopped) is retried with
  exponential backoff, without dropping the batch (the queue fills, back-pressure
  does the rest); ``/health`` says ``degraded`` meanwhile; an unexpected error is
  answered ``500`` (logged), never a dropped connection. Nothing stops the service
  but ``SIGINT``/``SIGTERM`` (or :meth:`ItemService.stop`: the batch being written is
  finished, waiting and later requests get ``503``, connections are closed).

HTTP (standard library ``ThreadingHTTPServer``, binds ``127.0.0.1`` by default):

* ``POST /items`` — body at most ``max_body_bytes`` (else ``413``), at most
  ``max_items_per_request`` items (else ``413``); every field validated (``400``
  naming ``record`` and ``field`` of every bad item, nothing enqueued). By default the
  answer comes once the records are in the stores: ``200 {"written", "item_ids",
  "versions"}``; ``?wait=0`` answers ``202`` once queued. ``504`` when not written
  within ``request_timeout_s`` (the items stay queued), ``422`` naming items the models
  failed on.
  A ``200`` means the records are in the stores (durable with ``sync``); a ``202``'d
  item lives in memory until written (a client that needs durability waits for the
  ``200``, or drops a file).
* ``GET /health`` — status, queue fill, counters, last error, stores and versions.
* ``GET /items/<id>`` — per store: ``found``, ``version``, ``current`` (written by the
  running models); ``404`` when no store has the item.

``--backfill DATA_DIR`` (:func:`backfill`) writes the records of every catalogue item
straight from the trained artefacts (no encoding), in batches, skipping batches whose
records already carry the current version (so a re-run resumes). Items without
content (IDProxy) or without a code (QARM) get no record: readers fall back for them.

Measured (``benchmarks/bench_serve_items.py``, the demo's artefacts: MiniLM for both
methods, 1 torch thread, 2 shared cores, ``sync``): a new item is visible in both
stores 42 ms (p50; p95 73 ms) after its ``POST``, 1.11x the 38 ms of calling the
models directly (``ProxyGenerator.generate`` + ``AlignedRepresenter.represent`` +
``assign_new``), 1.6x the bare Hugging Face forwards of the two encoders; under load
(4 clients, 16 items a request) 16.3 items/s, 1.02x the models' own batches of 32
(0.95x the bare forwards).
"""

import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import (Any, Callable, Deque, Dict, Iterator, List, Mapping, Optional, Sequence,
                    Set, Tuple)
from urllib.parse import parse_qs, urlsplit

import numpy as np
import torch

from torchrec_mm.data.schema import DataError
from torchrec_mm.serving.fields import (
    artifact_version,
    idproxy_catalogue,
    idproxy_catalogue_ids,
    idproxy_projection,
    idproxy_schema,
    project_states,
    qarm_catalogue,
    qarm_catalogue_ids,
    qarm_schema,
)
from torchrec_mm.serving.schema import StoreSchema
from torchrec_mm.serving.store import ItemStore

logger = logging.getLogger(__name__)

LEDGER_FORMAT = "torchrec-mm/serve-items-ledger-v1"
LEDGER_FILE = ".serve-items-ledger.json"
ITEM_FIELDS = ("item_id", "text", "image_path")
MAX_ITEM_ID = 2 ** 63 - 1
_MAX_ERRORS_KEPT = 100
_DRAIN_LIMIT = 16 << 20  # an oversize body up to this size is read and dropped before 413
_ITEM_ID_PATH = re.compile(r"[0-9]{1,19}")  # GET /items/<id>: ASCII digits, int64 at most
_STOP_GRACE_S = 10.0  # stop(): how long open HTTP connections get to finish their answer


# ------------------------------------------------------------------------------ config


@dataclass
class ServeConfig:
    """Configuration of :class:`ItemService` and :func:`backfill` (``serve-items`` flags).

    Attributes:
        idproxy: proxies directory of ``torchrec-mm idproxy fit`` (IDProxy records).
        idproxy_store: item store location of the IDProxy records.
        qarm_align: directory of ``torchrec-mm qarm align`` (the aligned model).
        qarm_codes: directory of ``torchrec-mm qarm codes`` (the codebooks).
        qarm_store: item store location of the QARM records.
        watch: directory watched for ``*.jsonl`` item files.
        ledger: the processed-file ledger (default ``<watch>/.serve-items-ledger.json``).
        http_port: serve HTTP on this port (0: any free port; None: no HTTP).
        host: bind address (default loopback only).
        batch_size: items per encoder batch and store put.
        linger_s: after the first item of an idle writer's batch, wait at most this long
            for more (0: none — under load, items queue up while a batch is encoded,
            so batches fill without waiting; a linger only adds latency to lone items).
        queue_items: capacity of the queue in items (back-pressure beyond).
        max_body_bytes / max_items_per_request: limits of ``POST /items``.
        max_text_chars: longest accepted ``text``.
        max_file_bytes: largest watched file read (a larger one is marked ``failed`` in
            the ledger, unread: split it).
        capacity: if set, item ids must be ``< capacity`` (e.g. the ranker's table size).
        z_rank: principal components per layer group in the IDProxy ``z`` field; must
            equal the ranker's ``idproxy`` ``z_rank`` (0: the full states).
        image_root: base of relative ``image_path`` values sent over HTTP (files: the
            file's directory). Only used by vision-language encoders.
        poll_s: seconds between scans of the watched directory.
        min_file_age_s: a file is read once its mtime is this old (settled).
        request_timeout_s: how long ``POST /items`` waits for its records.
        retry_after_s: ``Retry-After`` of a 503.
        retry_initial_s / retry_max_s: backoff of puts to a store that is down.
        sync: embedded stores fsync every put.
        device: torch device of the encoders.
        vq_index: VQ search of new items (``flat`` = exact; see ``QARMCodes.vq_codebook``).
        backfill_batch_size: records per put of :func:`backfill`.
    """

    idproxy: Optional[str] = None
    idproxy_store: Optional[str] = None
    qarm_align: Optional[str] = None
    qarm_codes: Optional[str] = None
    qarm_store: Optional[str] = None
    watch: Optional[str] = None
    ledger: Optional[str] = None
    http_port: Optional[int] = None
    host: str = "127.0.0.1"
    batch_size: int = 32
    linger_s: float = 0.0
    queue_items: int = 1024
    max_body_bytes: int = 1 << 20
    max_items_per_request: int = 256
    max_text_chars: int = 20_000
    max_file_bytes: int = 256 << 20
    capacity: Optional[int] = None
    z_rank: int = 32
    image_root: Optional[str] = None
    poll_s: float = 0.5
    min_file_age_s: float = 0.0
    request_timeout_s: float = 120.0
    retry_after_s: int = 1
    retry_initial_s: float = 0.2
    retry_max_s: float = 10.0
    sync: bool = True
    device: str = "cpu"
    vq_index: str = "flat"
    backfill_batch_size: int = 4096

    def __post_init__(self) -> None:
        for name in ("batch_size", "queue_items", "max_body_bytes", "max_items_per_request",
                     "max_text_chars", "max_file_bytes", "backfill_batch_size", "retry_after_s"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("linger_s", "poll_s", "min_file_age_s", "retry_initial_s", "retry_max_s",
                     "request_timeout_s"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.z_rank < 0:
            raise ValueError(f"z_rank must be >= 0, got {self.z_rank}")
        if self.capacity is not None and self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")
        if self.queue_items < max(self.batch_size, self.max_items_per_request):
            raise ValueError(f"queue_items ({self.queue_items}) must hold a batch "
                             f"({self.batch_size}) and a request "
                             f"({self.max_items_per_request} items)")
        if self.http_port is not None and not 0 <= self.http_port < 65536:
            raise ValueError(f"http_port must be in 0..65535, got {self.http_port}")
        if self.idproxy and not self.idproxy_store:
            raise ValueError("--idproxy needs --idproxy-store (where the records go)")
        if self.idproxy_store and not self.idproxy:
            raise ValueError("--idproxy-store needs --idproxy (the proxies artefact)")
        if (self.qarm_codes or self.qarm_align) and not self.qarm_store:
            raise ValueError("--qarm-codes/--qarm-align need --qarm-store")
        if self.qarm_store and not self.qarm_codes:
            raise ValueError("--qarm-store needs --qarm-codes (the codes artefact)")
        if not self.idproxy and not self.qarm_codes:
            raise ValueError("nothing to serve: give --idproxy (with --idproxy-store) and/or "
                             "--qarm-align/--qarm-codes (with --qarm-store)")
        if self.idproxy_store and self.qarm_store and os.path.normpath(
                self.idproxy_store) == os.path.normpath(self.qarm_store):
            raise ValueError("--idproxy-store and --qarm-store must differ (one schema "
                             "per store)")

    @property
    def ledger_path(self) -> Optional[str]:
        if self.ledger:
            return self.ledger
        return os.path.join(self.watch, LEDGER_FILE) if self.watch else None


# ------------------------------------------------------------------------------- items


@dataclass(frozen=True)
class Item:
    """One new item; ``record`` is its position in the request (0-based) or its line
    in the file (1-based), for error messages."""

    item_id: int
    text: str
    image_path: Optional[str] = None
    record: int = 0


class ItemRejected(ValueError):
    """An item failed validation: ``record`` (request index / file line), ``field``
    (None for the record as a whole) and ``reason``."""

    def __init__(self, record: Any, field_name: Optional[str], reason: str) -> None:
        self.record = record
        self.field = field_name
        self.reason = reason
        where = "request body" if record is None else f"record {record}"
        where += f", field '{field_name}'" if field_name else ""
        super().__init__(f"{where}: {reason}")

    def to_json(self) -> Dict[str, Any]:
        return {"record": self.record, "field": self.field, "message": self.reason}


def validate_item(obj: Any, record: int, config: ServeConfig,
                  base_dir: Optional[str] = None, check_images: bool = False) -> Item:
    """Checks one decoded JSON value; returns the :class:`Item` or raises
    :class:`ItemRejected` naming the record and field.

    ``item_id``: an integer (not a bool or float) in ``[0, capacity)`` (``capacity``
    when configured, else ``2**63``); ``text``: a non-blank string of at most
    ``max_text_chars`` characters; ``image_path`` (optional, may be null): a non-empty
    string, relative paths resolved against ``base_dir`` (with ``check_images``: an
    existing file — for vision-language encoders; text-only ones ignore images, as
    the catalogue's encoding did); no other keys.
    """
    if not isinstance(obj, dict):
        raise ItemRejected(record, None, f"expected a JSON object, got {_json_type(obj)}")
    unknown = sorted(k for k in obj if k not in ITEM_FIELDS)
    if unknown:
        raise ItemRejected(record, unknown[0], f"unknown field; an item has {list(ITEM_FIELDS)}")
    if "item_id" not in obj:
        raise ItemRejected(record, "item_id", "missing")
    item_id = obj["item_id"]
    if isinstance(item_id, bool) or not isinstance(item_id, int):
        raise ItemRejected(record, "item_id", f"expected an integer, got {_json_type(item_id)}")
    limit = config.capacity if config.capacity is not None else MAX_ITEM_ID + 1
    if item_id < 0 or item_id >= limit:
        raise ItemRejected(record, "item_id", f"{item_id} is outside [0, {limit})"
                           + (" (the configured capacity)" if config.capacity else ""))
    if "text" not in obj:
        raise ItemRejected(record, "text", "missing")
    text = obj["text"]
    if not isinstance(text, str):
        raise ItemRejected(record, "text", f"expected a string, got {_json_type(text)}")
    if not text.strip():
        raise ItemRejected(record, "text", "empty")
    if len(text) > config.max_text_chars:
        raise ItemRejected(record, "text", f"{len(text)} characters, at most "
                           f"{config.max_text_chars}")
    if "\x00" in text:
        raise ItemRejected(record, "text", "contains a NUL character")
    image = obj.get("image_path")
    if image is not None:
        if not isinstance(image, str) or not image.strip():
            raise ItemRejected(record, "image_path",
                               f"expected a non-empty string or null, got {_json_type(image)}")
        if "\x00" in image or len(image) > 4096:
            raise ItemRejected(record, "image_path", "not a valid path")
        if base_dir and not os.path.isabs(image):
            image = os.path.normpath(os.path.join(base_dir, image))
        if check_images and not os.path.isfile(image):
            raise ItemRejected(record, "image_path", f"no such file {image!r}")
    return Item(int(item_id), text, image, record)


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return f"the number {v!r}"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _strict_json(text: str) -> Any:
    """json.loads without the NaN/Infinity extensions; any failure (also nesting too
    deep for the decoder, a RecursionError) is a ValueError."""
    def bad_constant(name: str) -> Any:
        raise ValueError(f"invalid JSON constant {name}")
    try:
        return json.loads(text, parse_constant=bad_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _jsonl_values(data: bytes) -> Iterator[Tuple[int, Any, Optional[str]]]:
    """``(line number from 1, value, None)`` or ``(line, None, reason)`` for every
    non-blank line of JSONL. Lines end at ``\\n`` only (JSON strings may hold U+2028,
    U+0085 ... unescaped, which ``str.splitlines`` would split)."""
    for n, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            value, error = _strict_json(raw.decode("utf-8")), None
        except UnicodeDecodeError as e:
            value, error = None, f"not UTF-8 (byte {e.start})"
        except ValueError as e:
            value, error = None, f"invalid JSON: {e}"
        yield n, value, error


def parse_request_items(body: bytes, config: ServeConfig,
                        check_images: bool = False) -> List[Item]:
    """Decodes and validates a ``POST /items`` body: a JSON array of items, one JSON
    object (on any number of lines), or JSONL (one item per line).

    Raises:
        ItemRejected: the first problem of a body that does not decode (``record``:
            the index of the record that does not decode, or None for the body as a
            whole; field None).
        TooManyItems: more than ``max_items_per_request`` items.
        RequestRejected: for bodies that decode, every bad item.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ItemRejected(None, None, f"the body is not UTF-8 (byte {e.start})") from None
    stripped = text.strip()
    if not stripped:
        raise ItemRejected(None, None, "empty body: send a JSON array of items or JSONL")
    records: List[Any]
    single = None
    if stripped.startswith("{"):  # one object, also over several lines (else: JSONL)
        try:
            single = _strict_json(stripped)
        except ValueError:
            pass
    if stripped.startswith("["):
        try:
            records = _strict_json(stripped)
        except ValueError as e:
            raise ItemRejected(None, None, f"invalid JSON: {e}") from None
    elif isinstance(single, dict):
        records = [single]
    else:
        records = []
        for n, value, error in _jsonl_values(body):
            if error is not None:
                raise ItemRejected(len(records), None, f"line {n}: {error}")
            records.append(value)
            if len(records) > config.max_items_per_request:
                raise TooManyItems(len(records), config.max_items_per_request, exact=False)
    if len(records) > config.max_items_per_request:
        raise TooManyItems(len(records), config.max_items_per_request)
    if not records:
        raise ItemRejected(None, None, "no items")
    items, errors = [], []
    base = config.image_root or os.getcwd()
    for i, obj in enumerate(records):
        try:
            items.append(validate_item(obj, i, config, base, check_images))
        except ItemRejected as e:
            errors.append(e)
    if errors:
        raise RequestRejected(errors)
    return items


class RequestRejected(ValueError):
    """Every invalid item of a request (``errors``: :class:`ItemRejected`)."""

    def __init__(self, errors: List[ItemRejected]) -> None:
        self.errors = errors
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(f"{errors[0]}{more}")


class TooManyItems(ValueError):
    """A request of ``count`` items (``exact=False``: reading stopped there, it has
    more than ``limit``), above ``limit``."""

    def __init__(self, count: int, limit: int, exact: bool = True) -> None:
        self.count, self.limit = count, limit
        many = f"{count}" if exact else f"more than {limit}"
        super().__init__(f"{many} items in one request, at most {limit}")


def last_wins(items: Sequence[Item]) -> List[Item]:
    """Items with duplicate ids removed, keeping each id's last occurrence (in order)."""
    last = {it.item_id: i for i, it in enumerate(items)}
    return [it for i, it in enumerate(items) if last[it.item_id] == i]


def read_item_file(path: str, config: ServeConfig, data: Optional[bytes] = None,
                   check_images: bool = False) -> Tuple[List[Item], List[DataError]]:
    """Items of a JSONL file (one object per line, blank lines skipped), in file order,
    and a :class:`DataError` (file, ``line N``, field) for every bad line."""
    if data is None:
        with open(path, "rb") as f:
            data = f.read()
    items: List[Item] = []
    errors: List[DataError] = []
    base = os.path.dirname(os.path.abspath(path))
    for n, obj, error in _jsonl_values(data):
        if error is not None:
            errors.append(DataError(path, f"line {n}", None, error))
            continue
        try:
            items.append(validate_item(obj, n, config, base, check_images))
        except ItemRejected as e:
            errors.append(DataError(path, f"line {n}", e.field, e.reason))
    return items, errors


# ----------------------------------------------------------------------------- methods


class RecordMethod:
    """One store and the trained model(s) that produce its records.

    Attributes:
        name: ``"idproxy"`` or ``"qarm"``.
        schema: the store schema (:mod:`~torchrec_mm.serving.fields`).
        version: the records' version (the artefact's :func:`artifact_version`).
    """

    name: str
    schema: StoreSchema
    version: str

    def load_models(self) -> None:
        """Loads the encoder(s) for :meth:`compute` (slow; backfill needs none)."""

    @property
    def is_multimodal(self) -> bool:
        return False

    def compute(self, texts: Sequence[str], images: Optional[Sequence[Optional[str]]]
                ) -> Dict[str, torch.Tensor]:
        """Records ``{field: [n, *shape]}`` of new items from their content."""
        raise NotImplementedError

    def catalogue_ids(self, item_ids: np.ndarray) -> np.ndarray:
        """The ids of ``item_ids`` (catalogue items) that have a record in the artefact."""
        raise NotImplementedError

    def catalogue(self, ids: np.ndarray) -> Dict[str, torch.Tensor]:
        """Records of catalogue items straight from the artefact."""
        raise NotImplementedError


class IDProxyRecords(RecordMethod):
    """``p_coarse`` / ``z`` of :func:`~torchrec_mm.serving.fields.idproxy_schema`.

    Args:
        proxies_dir: the ``idproxy fit`` output.
        z_rank: r of the ``z`` field, the ranker's ``idproxy`` ``z_rank`` (0: the full
            ``G*D`` states). The basis is chosen as the ranker's
            :class:`~torchrec_mm.idproxy.modules.FineProxy` chooses it: the artefact's
            ``z_basis`` when it has at least ``min(z_rank, D)`` columns, else the
            (deterministic) :func:`~torchrec_mm.idproxy.artifacts.group_basis` of the
            artefact's states of rank ``z_rank``.
        device / batch_size: of the encoder.
    """

    name = "idproxy"

    def __init__(self, proxies_dir: str, z_rank: int, device: str = "cpu",
                 batch_size: int = 32) -> None:
        from torchrec_mm.idproxy.artifacts import load_proxies

        self.proxies_dir = proxies_dir
        self.proxies = load_proxies(proxies_dir)
        px = self.proxies
        g, d = int(px.z_groups.shape[1]), int(px.z_groups.shape[2])
        self.projection = idproxy_projection(px, z_rank)
        self.z_rank = self.projection[2]
        width = g * (self.z_rank or d)
        self.schema = idproxy_schema(px.dim, width)
        self.version = artifact_version(proxies_dir)
        self.device, self.batch_size = device, batch_size
        self.generator: Any = None

    def load_models(self) -> None:
        if self.generator is None:
            from torchrec_mm.idproxy.coarse import load_coarse_model
            from torchrec_mm.idproxy.generate import ProxyGenerator

            self.generator = ProxyGenerator(load_coarse_model(self.proxies_dir, self.device),
                                            self.proxies, None, self.batch_size)

    @property
    def is_multimodal(self) -> bool:
        return self.generator is not None and self.generator.coarse.encoder.is_multimodal

    def project(self, z_groups: torch.Tensor) -> torch.Tensor:
        """[n, G, D] states -> [n, G*r] ``z`` (float16-rounded first, as the artefact
        stores them, so new and catalogue items go through the same numbers)."""
        return project_states(z_groups.half().float(), *self.projection)

    def compute(self, texts: Sequence[str], images: Optional[Sequence[Optional[str]]]
                ) -> Dict[str, torch.Tensor]:
        self.load_models()
        out = self.generator.generate(list(texts), images)
        return {"p_coarse": out.p_coarse.float(), "z": self.project(out.z_groups)}

    def catalogue_ids(self, item_ids: np.ndarray) -> np.ndarray:
        return idproxy_catalogue_ids(self.proxies, item_ids)

    def catalogue(self, ids: np.ndarray) -> Dict[str, torch.Tensor]:
        return idproxy_catalogue(self.proxies, ids, self.projection)


class QARMRecords(RecordMethod):
    """``vq`` / ``rq`` of :func:`~torchrec_mm.serving.fields.qarm_schema`.

    Args:
        codes_dir: the ``qarm codes`` output (codebooks, catalogue codes).
        align_dir: the ``qarm align`` output (the model of new items' representations);
            None: backfill only.
        device / batch_size: of the encoder; vq_index: VQ search of new items.
    """

    name = "qarm"

    def __init__(self, codes_dir: str, align_dir: Optional[str], device: str = "cpu",
                 batch_size: int = 32, vq_index: str = "flat") -> None:
        from torchrec_mm.qarm.codes import load_codes

        self.codes_dir, self.align_dir = codes_dir, align_dir
        self.codes = load_codes(codes_dir)
        if self.codes.num_items >= 2 ** 31:
            raise ValueError(f"{codes_dir}: {self.codes.num_items} items do not fit the "
                             "int32 vq field")
        self.schema = qarm_schema(self.codes.k, self.codes.levels)
        self.version = artifact_version(codes_dir)
        self.device, self.batch_size, self.vq_index = device, batch_size, vq_index
        self.representer: Any = None
        if align_dir is not None:
            check_align_matches_codes(align_dir, self.codes, codes_dir)

    def load_models(self) -> None:
        if self.representer is None:
            if self.align_dir is None:
                raise ValueError("qarm: new items need the aligned model (--qarm-align)")
            from torchrec_mm.qarm.represent import AlignedRepresenter

            rep = AlignedRepresenter.load(self.align_dir, self.device, self.batch_size)
            if rep.dim != self.codes.dim:
                raise ValueError(f"{self.align_dir} gives {rep.dim}-d representations, the "
                                 f"codes in {self.codes_dir} are {self.codes.dim}-d")
            self.codes.vq_codebook(self.vq_index).index  # build the search index now
            self.representer = rep

    @property
    def is_multimodal(self) -> bool:
        return self.representer is not None and self.representer.encoder.is_multimodal

    def compute(self, texts: Sequence[str], images: Optional[Sequence[Optional[str]]]
                ) -> Dict[str, torch.Tensor]:
        self.load_models()
        reps = self.representer.represent(list(texts), images)
        vq, rq = self.codes.assign_new(reps, index=self.vq_index)
        return {"vq": vq.to(torch.int32), "rq": rq.to(torch.int32)}

    def catalogue_ids(self, item_ids: np.ndarray) -> np.ndarray:
        return qarm_catalogue_ids(self.codes, item_ids)

    def catalogue(self, ids: np.ndarray) -> Dict[str, torch.Tensor]:
        return qarm_catalogue(self.codes, ids)


def check_align_matches_codes(align_dir: str, codes: Any, codes_dir: str,
                              sample: int = 256) -> None:
    """Raises ValueError unless the codes' VQ codebook rows are the (normalised)
    representations of ``align_dir/aligned.safetensors`` — i.e. the codes were built
    from this alignment, so new items are quantised in the same space."""
    from torchrec_mm.qarm.align import REPS_FILE
    from torchrec_mm.utils.io import load_tensors

    path = os.path.join(align_dir, REPS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: no finished alignment in {align_dir!r}")
    reps = load_tensors(path)["reps"].float()
    ids = codes.vq_item_ids[:sample].long()
    if reps.shape[1] != codes.dim or (ids.numel() and int(ids.max()) >= reps.shape[0]):
        raise ValueError(f"{codes_dir} was not built from {path} (dimension "
                         f"{codes.dim} vs {reps.shape[1]}, or other items)")
    want = reps[ids]
    metric = codes.meta.get("vq_config", {}).get("metric", "cosine")
    if metric == "cosine":
        want = torch.nn.functional.normalize(want, dim=1)
    if not torch.allclose(want, codes.vq_reps[:sample].float(), atol=1e-4, rtol=0):
        raise ValueError(f"the VQ codebook of {codes_dir} does not hold the representations "
                         f"of {path}: the codes were built from another alignment (rebuild "
                         "them with `torchrec-mm qarm codes --reps` of this alignment)")


def build_methods(config: ServeConfig) -> List[RecordMethod]:
    methods: List[RecordMethod] = []
    if config.idproxy:
        methods.append(IDProxyRecords(config.idproxy, config.z_rank, config.device,
                                      config.batch_size))
    if config.qarm_codes:
        methods.append(QARMRecords(config.qarm_codes, config.qarm_align, config.device,
                                   config.batch_size, config.vq_index))
    return methods


def open_stores(config: ServeConfig, methods: Sequence[RecordMethod]) -> Dict[str, ItemStore]:
    locations = {"idproxy": config.idproxy_store, "qarm": config.qarm_store}
    stores: Dict[str, ItemStore] = {}
    try:
        for m in methods:
            stores[m.name] = ItemStore.open(str(locations[m.name]), m.schema, sync=config.sync)
    except BaseException:
        for s in stores.values():
            s.close()
        raise
    return stores


# ---------------------------------------------------------------------------- backfill


def backfill(data_dir: str, config: ServeConfig, progress: bool = True,
             methods: Optional[Sequence[RecordMethod]] = None,
             stores: Optional[Mapping[str, ItemStore]] = None) -> Dict[str, Dict[str, int]]:
    """Writes the records of every catalogue item of ``data_dir`` (``items.parquet``)
    from the trained artefacts — no encoding: ``p_coarse``/``z`` from the proxies
    artefact, ``vq``/``rq`` from the codes artefact — in puts of
    ``backfill_batch_size`` records. Items without content (IDProxy) or without a code
    (QARM) get no record (readers fall back for them). A batch whose records all carry
    the current version already is skipped, so a re-run after a kill resumes.

    Returns:
        per method ``{"items", "written", "skipped"}``.
    """
    from tqdm.auto import tqdm

    from torchrec_mm.content.encode_job import read_items

    items = read_items(data_dir)
    methods = list(methods) if methods is not None else build_methods(config)
    own = stores is None
    stores = open_stores(config, methods) if stores is None else stores
    report: Dict[str, Dict[str, int]] = {}
    try:
        for m in methods:
            n_art = (m.proxies.num_items if isinstance(m, IDProxyRecords)
                     else m.codes.num_items)  # type: ignore[attr-defined]
            if items.num_items != n_art:
                raise ValueError(f"{m.name}: the artefact has {n_art} items, the dataset "
                                 f"{data_dir} {items.num_items}: they do not belong together")
            ids = m.catalogue_ids(items.item_ids)
            store = stores[m.name]
            bs = config.backfill_batch_size
            written = skipped = 0
            for start in tqdm(range(0, ids.size, bs), desc=f"backfill {m.name}",
                              unit="batch", disable=not progress):
                batch = ids[start:start + bs]
                _, current = store.get(batch, [], version=m.version)
                if bool(current.all()):
                    skipped += int(batch.size)
                    continue
                written += store.put(batch, m.catalogue(batch), version=m.version)
            report[m.name] = {"items": int(ids.size), "written": written, "skipped": skipped}
            logger.info("backfill %s: %d catalogue items (%d written, %d already current) -> "
                        "%s, version %s", m.name, ids.size, written, skipped,
                        store.location, m.version)
    finally:
        if own:
            for s in stores.values():
                s.close()
    return report


# ------------------------------------------------------------------------------- queue


@dataclass
class Job:
    """Items written together (at most one batch); ``on_done(failures)`` is called once
    they are in the stores, ``failures`` mapping an item's ``record`` to the reason it
    was not written; ``on_abort()`` if they are not written (the service stops first,
    or an unexpected error). :meth:`finish` / :meth:`cancel` call one of the two, once.
    """

    items: List[Item]
    on_done: Callable[[Dict[int, str]], None] = lambda failures: None
    on_abort: Callable[[], None] = lambda: None
    ended: bool = field(default=False, repr=False)

    def finish(self, failures: Dict[int, str]) -> None:
        if not self.ended:
            self.ended = True
            self.on_done(failures)

    def cancel(self) -> None:
        if not self.ended:
            self.ended = True
            self.on_abort()


def _chunks(items: Sequence[Item], size: int) -> List[List[Item]]:
    """``items`` in consecutive lists of at most ``size``."""
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


class JobQueue:
    """FIFO of :class:`Job`, bounded by the number of items it holds. After
    :meth:`close` it takes no more jobs (a stopping service: nobody would write them).

    Args:
        capacity: most items queued at once.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self._jobs: Deque[Job] = deque()
        self._items = 0
        self._cond = threading.Condition()
        self.closed = False

    def close(self) -> None:
        """Refuses every later :meth:`offer` / :meth:`put` (and wakes blocked ones)."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        """Items queued."""
        with self._cond:
            return self._items

    def offer(self, jobs: Sequence[Job]) -> bool:
        """Enqueues all of ``jobs`` if they fit now (and the queue is open), else none;
        never blocks."""
        n = sum(len(j.items) for j in jobs)
        with self._cond:
            if self.closed or self._items + n > self.capacity:
                return False
            self._jobs.extend(jobs)
            self._items += n
            self._cond.notify_all()
            return True

    def put(self, job: Job, stop: threading.Event, poll_s: float = 0.1) -> bool:
        """Enqueues ``job``, blocking while the queue is full (back-pressure); returns
        False if ``stop`` is set or the queue is closed first."""
        n = len(job.items)
        if n > self.capacity:
            raise ValueError(f"a job of {n} items never fits a queue of {self.capacity}")
        with self._cond:
            while self.closed or self._items + n > self.capacity:
                if stop.is_set() or self.closed:
                    return False
                self._cond.wait(poll_s)
            self._jobs.append(job)
            self._items += n
            self._cond.notify_all()
            return True

    def take(self, max_items: int, linger_s: float, timeout: float) -> List[Job]:
        """Whole jobs of at most ``max_items`` items in total (at least one job when
        any comes within ``timeout``); after the first, waits up to ``linger_s`` for
        more to fill the batch."""
        out: List[Job] = []
        total = 0
        with self._cond:
            if not self._jobs:
                self._cond.wait(timeout)
            if not self._jobs:
                return out
            deadline = time.monotonic() + linger_s
            while True:
                while self._jobs and (not out or total + len(self._jobs[0].items)
                                      <= max_items):
                    job = self._jobs.popleft()
                    out.append(job)
                    total += len(job.items)
                    self._items -= len(job.items)
                if total >= max_items or self._jobs:  # full, or the next job does not fit
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._cond.notify_all()
        return out

    def drain(self) -> List[Job]:
        """Removes and returns every queued job."""
        with self._cond:
            jobs = list(self._jobs)
            self._jobs.clear()
            self._items = 0
            self._cond.notify_all()
            return jobs


class Ticket:
    """Completion of one request's jobs: ``done`` is set once all are written
    (``failures``: record -> reason of the items that were not) or once one of them
    is aborted (``aborted``; an abort after completion changes nothing)."""

    def __init__(self, n_jobs: int) -> None:
        self._remaining = n_jobs
        self._lock = threading.Lock()
        self.done = threading.Event()
        self.failures: Dict[int, str] = {}
        self.aborted = False

    def job_done(self, failures: Dict[int, str]) -> None:
        with self._lock:
            if self.done.is_set():
                return
            self.failures.update(failures)
            self._remaining -= 1
            if self._remaining <= 0:
                self.done.set()

    def abort(self) -> None:
        with self._lock:
            if self.done.is_set():
                return
            self.aborted = True
            self.done.set()


# ------------------------------------------------------------------------------ ledger


class Ledger:
    """The processed-file ledger of the watched directory (a JSON file replaced
    atomically on every change).

    Per file (by name): ``size``, ``mtime_ns``, ``sha256``, ``batch_size`` and
    ``batches`` (its partition), ``done_batches`` (batches 0..done-1 are in the
    stores), ``items``, ``status`` (``in_progress`` / ``done`` / ``failed``) and the
    first bad lines (``errors``, ``num_errors``).

    ``done_batches`` only advances over a contiguous run of written batches: a batch
    written while an earlier one is not (that one was aborted) is remembered in
    memory and counted once the gap is filled (after a restart it is written again).
    """

    def __init__(self, path: str, versions: Mapping[str, str]) -> None:
        self.path = path
        self.versions = dict(versions)
        self._lock = threading.Lock()
        self.files: Dict[str, Dict[str, Any]] = {}
        self._ahead: Dict[str, Set[int]] = {}  # batches written beyond done_batches
        if os.path.exists(path):
            try:
                with open(path) as f:
                    raw = json.load(f)
            except (OSError, ValueError) as e:
                raise DataError(path, 0, None, f"unreadable ledger ({e}); delete it to "
                                "process every file of the watched directory again") from None
            if not isinstance(raw, dict) or raw.get("format") != LEDGER_FORMAT:
                raise DataError(path, 0, "format", f"not a serve-items ledger (expected "
                                f"{LEDGER_FORMAT!r})")
            if raw.get("versions") != self.versions:
                logger.warning("ledger %s was written for versions %s, the models are %s: "
                               "every file is processed again", path, raw.get("versions"),
                               self.versions)
            else:
                self.files = dict(raw.get("files") or {})

    def get(self, name: str) -> Optional[Dict[str, Any]]:
        with self._lock:
            e = self.files.get(name)
            return dict(e) if e is not None else None

    def set(self, name: str, entry: Dict[str, Any]) -> None:
        with self._lock:
            old = self.files.get(name) or {}
            if (old.get("sha256"), old.get("batch_size")) != (entry.get("sha256"),
                                                              entry.get("batch_size")):
                self._ahead.pop(name, None)  # another partition
            self.files[name] = dict(entry)
            self._save()

    def batch_done(self, name: str, index: int) -> Tuple[Dict[str, Any], bool]:
        """Records batch ``index`` of file ``name`` as written; returns the entry and
        whether this call finished the file."""
        with self._lock:
            e = self.files[name]
            done = int(e["done_batches"])
            finished = False
            if index >= done and e.get("status") != "done":
                ahead = self._ahead.setdefault(name, set())
                ahead.add(index)
                while done in ahead:
                    ahead.discard(done)
                    done += 1
                e["done_batches"] = done
                if done >= int(e["batches"]):
                    e["status"] = "done"
                    self._ahead.pop(name, None)
                    finished = True
                self._save()
            return dict(e), finished

    def _save(self) -> None:
        from torchrec_mm.utils.io import write_json

        write_json(self.path, {"format": LEDGER_FORMAT, "versions": self.versions,
                               "files": self.files})


# ----------------------------------------------------------------------------- service


@dataclass
class ServiceStats:
    written_items: int = 0
    batches: int = 0
    failed_items: int = 0
    rejected_requests: int = 0
    busy_responses: int = 0
    files_done: int = 0
    degraded: bool = False
    last_error: Optional[str] = None
    last_error_time: Optional[float] = None
    started: float = field(default_factory=time.time)


class ItemService:
    """The generation service: queue, writer thread, optional watcher and HTTP server.

    Args:
        config: :class:`ServeConfig`.
        methods / stores: prebuilt (tests, benchmarks); default from ``config``.

    Example::

        with ItemService(ServeConfig(idproxy="out/idproxy", idproxy_store="out/items",
                                     http_port=8080)) as service:
            service.wait()          # until stop() / SIGTERM
    """

    def __init__(self, config: ServeConfig, methods: Optional[Sequence[RecordMethod]] = None,
                 stores: Optional[Mapping[str, ItemStore]] = None) -> None:
        self.config = config
        self.methods = list(methods) if methods is not None else build_methods(config)
        self._own_stores = stores is None
        self.stores = dict(stores) if stores is not None else open_stores(config, self.methods)
        self.versions = {m.name: m.version for m in self.methods}
        self.queue = JobQueue(config.queue_items)
        self.stats = ServiceStats()
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []
        self._inflight: Dict[str, int] = {}  # watched file -> batches queued, not ended
        self._inflight_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self.ledger: Optional[Ledger] = None
        self.http: Optional["ServiceHTTPServer"] = None
        self._multimodal = False
        self._started = False
        self._pool: Optional[ThreadPoolExecutor] = None

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> "ItemService":
        """Loads the models, starts the writer, the watcher and the HTTP server. If
        that fails, the service is stopped (its own stores closed) and the error
        raised."""
        if self._started:
            return self
        try:
            for m in self.methods:
                m.load_models()
            self._multimodal = any(m.is_multimodal for m in self.methods)
            if self.config.watch:  # everything that can fail comes before the threads
                os.makedirs(self.config.watch, exist_ok=True)
                self.ledger = Ledger(str(self.config.ledger_path), self.versions)
            if self.config.http_port is not None:
                self.http = make_http_server(self)
        except BaseException:
            self.stop()
            raise
        self._started = True
        self._spawn("serve-items-writer", self._writer_loop)
        if self.ledger is not None:
            self._spawn("serve-items-watcher", self._watch_loop)
        if self.http is not None:
            http = self.http  # poll 0.1 s: stop() waits for serve_forever to notice
            self._spawn("serve-items-http", lambda: http.serve_forever(poll_interval=0.1))
            logger.info("serve-items: HTTP on http://%s:%d", *self.address)
        return self

    @property
    def address(self) -> Tuple[str, int]:
        """(host, port) the HTTP server listens on."""
        if self.http is None:
            raise RuntimeError("no HTTP server (http_port not set)")
        host, port = self.http.server_address[:2]
        return str(host), int(port)

    def _spawn(self, name: str, target: Callable[[], Any]) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        """Stops accepting (new requests, also on open connections, are answered
        ``503``), finishes the batch being written, aborts queued requests (their
        clients get ``503``; watched files resume from the ledger next time), closes
        the HTTP connections once their answers are sent, and closes the stores the
        service opened itself."""
        if self._stop.is_set():
            return
        self._stop.set()
        self.queue.close()
        if self.http is not None and any(t.name == "serve-items-http" for t in self._threads):
            self.http.shutdown()  # no new connections (waits for serve_forever: if it runs)
        for t in self._threads:
            t.join(timeout=60)
        for job in self.queue.drain():
            job.cancel()
        if self.http is not None:
            self.http.close_connections(_STOP_GRACE_S)  # after the aborts: answers first
            self.http.server_close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._own_stores:
            for s in self.stores.values():
                s.close()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Blocks until :meth:`stop` was called (or ``timeout``); True if stopped."""
        return self._stop.wait(timeout)

    def __enter__(self) -> "ItemService":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------- submit
    def submit(self, items: Sequence[Item], block: bool = True) -> Optional[Ticket]:
        """Enqueues items (duplicates: the last wins) in jobs of at most ``batch_size``.
        Blocking: waits for room (back-pressure); non-blocking: all or nothing, None
        when the queue has no room. The returned ticket's ``done`` is set once every
        item is written (or failed, see ``failures``); it is ``aborted`` at once when
        the service is stopping."""
        items = last_wins(items)
        chunks = _chunks(items, self.config.batch_size)
        ticket = Ticket(len(chunks))
        if not chunks:
            ticket.done.set()
            return ticket
        jobs = [Job(c, ticket.job_done, ticket.abort) for c in chunks]
        if not block:
            if self.queue.offer(jobs):
                return ticket
            if self.queue.closed:
                ticket.abort()
                return ticket
            return None
        for j in jobs:
            if not self.queue.put(j, self._stop):
                ticket.abort()
                break
        return ticket

    def _count(self, counter: str, n: int = 1) -> None:
        """Adds ``n`` to the :class:`ServiceStats` counter ``counter``."""
        with self._stats_lock:
            setattr(self.stats, counter, getattr(self.stats, counter) + n)

    # ------------------------------------------------------------------- writer
    def _writer_loop(self) -> None:
        while not self._stop.is_set():
            jobs = self.queue.take(self.config.batch_size, self.config.linger_s, timeout=0.2)
            if jobs:
                try:
                    self._process(jobs)
                except Exception as e:  # never let the writer die
                    logger.exception("serve-items: unexpected error; batch not written")
                    self._note_error(f"writer: {type(e).__name__}: {e}")
                    for j in jobs:  # HTTP: 503 (retry); files: taken up again
                        j.cancel()

    def _images(self, items: Sequence[Item]) -> Optional[List[Optional[str]]]:
        if not self._multimodal or not any(it.image_path for it in items):
            return None
        return [it.image_path for it in items]

    def _compute(self, items: Sequence[Item]) -> Dict[str, Dict[str, torch.Tensor]]:
        texts = [it.text for it in items]
        images = self._images(items)
        out = {}
        for m in self.methods:
            values = m.compute(texts, images)
            for f, t in values.items():
                if t.is_floating_point():
                    bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(1)
                    if bool(bad.any()):
                        raise ValueError(f"{m.name} model gave NaN/Inf '{f}' for item "
                                         f"{items[int(bad.nonzero()[0, 0])].item_id}")
            out[m.name] = values
        return out

    def _compute_isolating(self, items: List[Item]
                           ) -> Tuple[List[int], Dict[str, Dict[str, torch.Tensor]],
                                      Dict[int, str]]:
        """Records of the batch; if the models fail on it, item by item, so that one
        bad item does not sink the others. Returns (positions of the items computed,
        their values, {position: reason} of the others)."""
        try:
            return list(range(len(items))), self._compute(items), {}
        except Exception as e:
            if len(items) == 1:
                self._note_error(f"item {items[0].item_id}: {e}")
                return [], {}, {0: f"{type(e).__name__}: {e}"}
            logger.warning("serve-items: batch of %d failed (%s); retrying item by item",
                           len(items), e)
        ok: List[int] = []
        parts: List[Dict[str, Dict[str, torch.Tensor]]] = []
        failures: Dict[int, str] = {}
        for pos, it in enumerate(items):
            try:
                parts.append(self._compute([it]))
                ok.append(pos)
            except Exception as e:
                failures[pos] = f"{type(e).__name__}: {e}"
                self._note_error(f"item {it.item_id}: {e}")
        values = {m.name: {f: torch.cat([p[m.name][f] for p in parts])
                           for f in m.schema.names} for m in self.methods} if parts else {}
        return ok, values, failures

    def _put(self, ids: np.ndarray, values: Dict[str, Dict[str, torch.Tensor]]) -> bool:
        """Puts the batch in every store (concurrently when there are two), retrying a
        store that is down with exponential backoff until it succeeds (True) or the
        service stops (False). Errors other than OSError (e.g. a DataError) raise."""
        delay = self.config.retry_initial_s
        pending = list(self.methods)
        while True:
            failed = self._put_each(pending, ids, values)
            pending = [m for m in pending if m.name in failed]
            if not pending:
                break
            for m in pending:
                e = failed[m.name]
                self._note_error(f"{m.name} store {self.stores[m.name].location}: {e}",
                                 degraded=True)
                logger.error("serve-items: writing %d records to the %s store failed "
                             "(%s); retrying in %.1fs", len(ids), m.name, e, delay)
            if self._stop.wait(delay):
                return False
            delay = min(max(delay * 2, 0.01), self.config.retry_max_s)
        with self._stats_lock:
            self.stats.degraded = False
        return True

    def _put_each(self, methods: Sequence[RecordMethod], ids: np.ndarray,
                  values: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, OSError]:
        """One put per store; returns the OSErrors (store down, disk) by method."""
        def put(m: RecordMethod) -> Optional[OSError]:
            try:
                self.stores[m.name].put(ids, values[m.name], version=m.version)
                return None
            except OSError as e:  # incl. ConnectionError / StoreUnavailableError
                return e

        if len(methods) == 1:
            results = [put(methods[0])]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(len(self.methods),
                                                thread_name_prefix="serve-items-put")
            results = list(self._pool.map(put, methods))
        return {m.name: e for m, e in zip(methods, results) if e is not None}

    def _process(self, jobs: List[Job]) -> None:
        items = [it for j in jobs for it in j.items]
        ok, values, failures = self._compute_isolating(items)
        if ok:
            ids = np.array([items[i].item_id for i in ok], dtype=np.int64)
            try:
                written = self._put(ids, values)
            except Exception as e:  # e.g. a DataError of the store: not retryable
                self._note_error(f"put: {e}")
                logger.error("serve-items: batch of %d not written: %s", len(ok), e)
                failures.update({i: f"{type(e).__name__}: {e}" for i in ok})
                written, ok = True, []  # reported as failed, not pending
            if not written:  # stopping while the store is down: resumed / answered 503
                for j in jobs:
                    j.cancel()
                return
        with self._stats_lock:
            self.stats.written_items += len(ok)
            self.stats.failed_items += len(items) - len(ok)
            self.stats.batches += 1
        start = 0
        for j in jobs:
            n = len(j.items)
            j.finish({items[p].record: msg for p, msg in failures.items()
                      if start <= p < start + n})
            start += n

    def _note_error(self, message: str, degraded: bool = False) -> None:
        with self._stats_lock:
            self.stats.last_error = message
            self.stats.last_error_time = time.time()
            if degraded:
                self.stats.degraded = True

    # ------------------------------------------------------------------ watcher
    def _watch_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan_once()
            except Exception as e:
                logger.exception("serve-items: scanning %s failed", self.config.watch)
                self._note_error(f"watch: {e}")
            self._stop.wait(self.config.poll_s)

    def scan_once(self) -> int:
        """Enqueues the unwritten batches of every new, changed or unfinished
        ``*.jsonl`` file of the watched directory (oldest first); returns the number of
        files taken up. Blocks while the queue is full."""
        assert self.ledger is not None and self.config.watch is not None
        watch = self.config.watch
        names = []
        for name in os.listdir(watch):
            if name.startswith(".") or not name.endswith(".jsonl"):
                continue
            path = os.path.join(watch, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            if os.path.isfile(path):
                names.append((st.st_mtime_ns, name, st))
        taken = 0
        for _, name, st in sorted(names):
            if self._stop.is_set():
                break
            with self._inflight_lock:
                if self._inflight.get(name):
                    continue
            entry = self.ledger.get(name)
            if entry is not None and entry.get("status") in ("done", "failed") and \
                    entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
                continue
            if time.time() - st.st_mtime_ns / 1e9 < self.config.min_file_age_s:
                continue  # still settling
            if self._take_file(name, entry):
                taken += 1
        return taken

    def _take_file(self, name: str, entry: Optional[Dict[str, Any]]) -> bool:
        assert self.ledger is not None and self.config.watch is not None
        path = os.path.join(self.config.watch, name)
        limit = self.config.max_file_bytes
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read(limit + 1)
        except FileNotFoundError:
            return False
        except OSError as e:
            logger.error("serve-items: cannot read %s: %s", path, e)
            self._file_failed(name, -1, -1, str(e))
            return False
        if len(data) > limit:
            message = (f"{path}: larger than {limit} bytes (max_file_bytes): not read; "
                       "split it into smaller files")
            logger.error("serve-items: %s", message)
            self._file_failed(name, st.st_size, st.st_mtime_ns, message)
            return False
        sha = hashlib.sha256(data).hexdigest()
        same = entry is not None and entry.get("sha256") == sha
        if same and entry is not None and entry.get("status") in ("done", "failed"):
            entry.update(size=st.st_size, mtime_ns=st.st_mtime_ns)  # touched, same content
            self.ledger.set(name, entry)
            return False
        items, errors = read_item_file(path, self.config, data, self._multimodal)
        for e in errors[:10]:
            logger.warning("serve-items: skipped: %s", e)
        if len(errors) > 10:
            logger.warning("serve-items: %s: %d bad lines in all", path, len(errors))
        # resume at the ledger's first unwritten batch only if the partition is the same
        # (items read under other limits, or batches that no longer fit the queue: anew)
        resume = entry is not None and same and entry.get("items") == len(items) and \
            1 <= int(entry.get("batch_size", 0)) <= self.queue.capacity
        if same and not resume:
            logger.warning("serve-items: %s: the ledger's partition does not fit this run "
                           "(limits or queue changed); processing it from the start", name)
        bs = int(entry["batch_size"]) if resume and entry else self.config.batch_size
        batches = _chunks(items, bs)
        done = int(entry["done_batches"]) if resume and entry else 0
        new_entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha,
                     "batch_size": bs, "batches": len(batches), "done_batches": done,
                     "items": len(items), "status": "in_progress",
                     "errors": [str(e) for e in errors[:_MAX_ERRORS_KEPT]],
                     "num_errors": len(errors)}
        if done >= len(batches):
            new_entry["status"] = "done"
            self.ledger.set(name, new_entry)
            self._file_finished(name, new_entry)
            return True
        self.ledger.set(name, new_entry)
        if done:
            logger.info("serve-items: %s: resuming at batch %d of %d", name, done + 1,
                        len(batches))
        else:
            logger.info("serve-items: %s: %d items in %d batches%s", name, len(items),
                        len(batches), f" ({len(errors)} bad lines skipped)" if errors else "")
        for k in range(done, len(batches)):
            job = Job(batches[k], self._file_batch_done(name, k),
                      lambda: self._file_job_ended(name))
            with self._inflight_lock:  # counted before the writer can finish it
                self._inflight[name] = self._inflight.get(name, 0) + 1
            if not self.queue.put(job, self._stop):
                self._file_job_ended(name)  # not queued
                break
        return True

    def _file_failed(self, name: str, size: int, mtime_ns: int, message: str) -> None:
        """Marks a watched file ``failed`` (skipped until its size or mtime changes)."""
        assert self.ledger is not None
        self.ledger.set(name, {"size": size, "mtime_ns": mtime_ns, "sha256": "",
                               "status": "failed", "batches": 0, "done_batches": 0,
                               "batch_size": 0, "items": 0, "errors": [message],
                               "num_errors": 1})

    def _file_batch_done(self, name: str, index: int) -> Callable[[Dict[int, str]], None]:
        def done(failures: Dict[int, str]) -> None:
            assert self.ledger is not None
            try:
                if failures:
                    entry = self.ledger.get(name) or {}
                    errs = list(entry.get("errors", []))
                    path = os.path.join(str(self.config.watch), name)
                    for line, msg in sorted(failures.items()):
                        errs.append(str(DataError(path, f"line {line}", None, msg)))
                    entry["errors"] = errs[:_MAX_ERRORS_KEPT]
                    entry["num_errors"] = int(entry.get("num_errors", 0)) + len(failures)
                    self.ledger.set(name, entry)
                entry, finished = self.ledger.batch_done(name, index)
            finally:  # also when the ledger cannot be written: the file is taken up again
                self._file_job_ended(name)
            if finished:
                self._file_finished(name, entry)
        return done

    def _file_job_ended(self, name: str) -> None:
        """One queued batch of ``name`` was written or aborted; with none left in
        flight, the next scan may take the file up again (if it is not done)."""
        with self._inflight_lock:
            left = self._inflight.get(name, 1) - 1
            if left > 0:
                self._inflight[name] = left
            else:
                self._inflight.pop(name, None)

    def _file_finished(self, name: str, entry: Mapping[str, Any]) -> None:
        with self._stats_lock:
            self.stats.files_done += 1
        logger.info("serve-items: %s done: %d items%s", name, entry["items"],
                    f", {entry['num_errors']} bad" if entry.get("num_errors") else "")

    # --------------------------------------------------------------------- info
    def health(self) -> Dict[str, Any]:
        with self._stats_lock:
            s = dict(vars(self.stats))
        stores = {}
        for m in self.methods:
            store = self.stores[m.name]
            info: Dict[str, Any] = {"location": store.location, "version": m.version,
                                    "schema": store.schema.describe()}
            try:
                info["records"] = len(store)
            except Exception as e:  # a store that is down is reported, not fatal
                info["error"] = str(e)
                s["degraded"] = True
            stores[m.name] = info
        return {"status": "degraded" if s["degraded"] else "ok",
                "queue_items": len(self.queue), "queue_capacity": self.queue.capacity,
                "uptime_s": round(time.time() - s.pop("started"), 3), **s,
                "stores": stores, "watch": self.config.watch}

    def item_info(self, item_id: int) -> Dict[str, Any]:
        out: Dict[str, Any] = {"item_id": item_id}
        for m in self.methods:
            (version,) = self.stores[m.name].versions(np.array([item_id], dtype=np.int64))
            out[m.name] = {"found": version is not None, "version": version,
                           "current": version == m.version}
        return out


# -------------------------------------------------------------------------------- HTTP


class ServiceHTTPServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` (one daemon thread per connection) that keeps track of
    its open connections, so that :meth:`close_connections` can end them at stop —
    an idle keep-alive connection would otherwise outlive the service and have its
    next request served by a stopped service."""

    daemon_threads = True
    block_on_close = False  # server_close() does not join; close_connections() does

    def __init__(self, address: Tuple[str, int], handler: Any) -> None:
        self._conns: Dict[Any, threading.Thread] = {}
        self._conns_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        t = threading.Thread(target=self.process_request_thread,
                             args=(request, client_address), daemon=True,
                             name="serve-items-http-conn")
        with self._conns_lock:
            self._conns[request] = t
        t.start()

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.pop(request, None)
        super().shutdown_request(request)

    def close_connections(self, timeout: float) -> None:
        """Shuts the read side of every open connection (an idle one ends; an answer
        being written is finished) and waits up to ``timeout`` s for their threads."""
        with self._conns_lock:
            conns = list(self._conns.items())
        for sock, _ in conns:
            try:
                sock.shutdown(socket.SHUT_RD)
            except OSError:  # already closed by the client
                pass
        deadline = time.monotonic() + timeout
        for _, t in conns:
            t.join(max(0.0, deadline - time.monotonic()))


def make_http_server(service: ItemService) -> ServiceHTTPServer:
    """A :class:`ServiceHTTPServer` bound to ``config.host:config.http_port`` serving
    ``POST /items``, ``GET /health``, ``GET /items/<id>`` (see the module doc).
    An unexpected error answers ``500`` (logged), never a dropped connection."""
    config = service.config
    retry_after = {"Retry-After": str(config.retry_after_s)}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "torchrec-mm-serve-items"
        timeout = 60  # seconds a client may take to send its request

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            logger.debug("http %s: " + format, self.address_string(), *args)

        def _send(self, status: int, body: Mapping[str, Any],
                  headers: Optional[Mapping[str, str]] = None, close: bool = False) -> None:
            raw = (json.dumps(body) + "\n").encode()
            self._responded = True
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(raw)

        def _error(self, status: int, message: str, close: bool = False,
                   headers: Optional[Mapping[str, str]] = None, **extra: Any) -> None:
            self._send(status, {"error": message, **extra}, headers, close)

        def _guarded(self, method: Callable[[], None]) -> None:
            """Runs ``method``; an unexpected error is logged and answered ``500``
            (a client's broken connection just closes it)."""
            self._responded = False
            try:
                method()
            except (ConnectionError, TimeoutError):
                self.close_connection = True
            except Exception as e:
                logger.exception("serve-items: %s %s failed", self.command, self.path)
                service._note_error(f"http: {type(e).__name__}: {e}")
                if self._responded:
                    self.close_connection = True
                else:
                    self._error(500, f"internal error: {type(e).__name__}", close=True)

        def do_GET(self) -> None:  # noqa: N802
            self._guarded(self._get)

        def do_POST(self) -> None:  # noqa: N802
            self._guarded(self._post)

        # ------------------------------------------------------------- GET
        def _get(self) -> None:
            path = urlsplit(self.path).path.rstrip("/")
            if path == "/health":
                self._send(200, service.health())
                return
            if path.startswith("/items/"):
                raw = path[len("/items/"):]
                if not _ITEM_ID_PATH.fullmatch(raw) or int(raw) > MAX_ITEM_ID:
                    self._error(400, f"item id must be an integer in [0, 2**63), got "
                                f"{raw[:40]!r}", field="item_id")
                    return
                try:
                    info = service.item_info(int(raw))
                except Exception as e:
                    self._error(503, f"store unavailable: {e}", headers=retry_after)
                    return
                found = any(info[m.name]["found"] for m in service.methods)
                self._send(200 if found else 404, info)
                return
            self._error(404, f"no such resource {path[:200]!r}; try POST /items, "
                        "GET /health, GET /items/<id>")

        # ------------------------------------------------------------ POST
        def _post(self) -> None:
            url = urlsplit(self.path)
            if url.path.rstrip("/") != "/items":
                self._error(404, f"no such resource {url.path[:200]!r}; POST /items",
                            close=True)
                return
            query = parse_qs(url.query)
            wait = query.get("wait", ["1"])[-1].lower() not in ("0", "false", "no")
            if self.headers.get("Transfer-Encoding"):
                self._error(411, "chunked bodies are not accepted: send Content-Length",
                            close=True)
                return
            length_raw = self.headers.get("Content-Length")
            if length_raw is None:
                self._error(411, "Content-Length required", close=True)
                return
            try:
                length = int(length_raw)
                if length < 0:
                    raise ValueError
            except ValueError:
                self._error(400, f"bad Content-Length {length_raw[:40]!r}", close=True)
                return
            if length > config.max_body_bytes:
                self._drain(length)
                service._count("rejected_requests")
                self._error(413, f"body of {length} bytes, at most {config.max_body_bytes}",
                            close=True, limit=config.max_body_bytes)
                return
            body = self.rfile.read(length)
            if len(body) != length:
                self.close_connection = True
                return
            try:
                items = parse_request_items(body, config, service._multimodal)
            except TooManyItems as e:
                service._count("rejected_requests")
                self._error(413, str(e), limit=e.limit)
                return
            except (RequestRejected, ItemRejected) as e:
                service._count("rejected_requests")
                errors = e.errors if isinstance(e, RequestRejected) else [e]
                first = errors[0]
                self._error(400, str(first), record=first.record, field=first.field,
                            errors=[x.to_json() for x in errors[:_MAX_ERRORS_KEPT]])
                return
            unique = last_wins(items)
            ticket = service.submit(unique, block=False)
            if ticket is None:
                service._count("busy_responses")
                self._error(503, f"queue full ({len(service.queue)} of "
                            f"{service.queue.capacity} items); retry later",
                            headers=retry_after)
                return
            ids = [it.item_id for it in unique]
            result = {"item_ids": ids, "versions": service.versions,
                      "duplicates_dropped": len(items) - len(unique)}
            if ticket.aborted:  # refused: the service is stopping
                self._aborted(result)
                return
            if not wait:
                self._send(202, {"queued": len(ids), **result})
                return
            if not ticket.done.wait(config.request_timeout_s):
                self._error(504, f"not written within {config.request_timeout_s:g}s; the "
                            "items stay queued and will be written", **result)
                return
            if ticket.aborted:
                self._aborted(result)
                return
            if ticket.failures:
                by_record = {it.record: it for it in items}
                failed = [{"record": r, "item_id": by_record[r].item_id, "field": None,
                           "message": msg} for r, msg in sorted(ticket.failures.items())]
                self._error(422, f"{len(failed)} of {len(ids)} items could not be encoded",
                            failed=failed, written=len(ids) - len(failed), **result)
                return
            self._send(200, {"written": len(ids), **result})

        def _aborted(self, result: Mapping[str, Any]) -> None:
            why = ("the service is stopping" if service._stop.is_set() else
                   "an internal error stopped the batch (GET /health: last_error)")
            self._error(503, f"{why}; the items may not be written: send them again",
                        headers=retry_after, close=service._stop.is_set(), **result)

        def _drain(self, length: int) -> None:
            """Reads and drops a refused body (up to a limit), so that the client gets
            the answer instead of a reset connection."""
            left = length if length <= _DRAIN_LIMIT else 0
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)

    return ServiceHTTPServer((config.host, int(config.http_port or 0)), Handler)


__all__ = ["IDProxyRecords", "Item", "ItemRejected", "ItemService", "Job", "JobQueue",
           "Ledger", "QARMRecords", "RecordMethod", "RequestRejected", "ServeConfig",
           "ServiceHTTPServer", "Ticket", "TooManyItems", "backfill", "build_methods",
           "check_align_matches_codes", "last_wins", "make_http_server", "open_stores",
           "parse_request_items", "read_item_file", "validate_item"]
