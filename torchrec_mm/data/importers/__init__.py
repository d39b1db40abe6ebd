"""Importers from public dataset formats into the canonical torchrec-mm format.

============================  ==========================================================
``--format``                  source
============================  ==========================================================
``movielens-100k``            ``ml-100k/`` (``u.data``, ``u.item``, ``u.user``)
``movielens-1m``              ``ml-1m/`` (``ratings.dat``, ``movies.dat``, ``users.dat``)
``movielens-latest``          ``ml-latest(-small)/``, ml-20m/25m/32m (``ratings.csv``,
                              ``movies.csv``, optional ``tags.csv``)
``amazon2018``                Amazon Reviews 2018 reviews JSON lines (+ ``--meta``)
``redmmu``                    RED-MMU user JSON (RED-Rec paper, appendix C) (+ ``--items``)
============================  ==========================================================

Every importer streams its source in line-aligned chunks, parses them with vectorised
pyarrow/numpy code where the format allows it, and writes through
:class:`~torchrec_mm.data.io.DatasetWriter`, so an interrupted import leaves nothing
behind. A bad record raises :class:`~torchrec_mm.data.schema.DataError` naming the
file, the line and the field; with ``skip_bad=True`` it is dropped and counted in
the returned :class:`ImportResult` (and in ``meta.source["bad_records"]``).

This module also holds the shared parsing helpers used by the importers.
"""

import codecs
import gzip
import importlib
import io
import json
import logging
import os
from dataclasses import dataclass
from typing import IO, Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
from tqdm import tqdm

from torchrec_mm.data.io import ReadStats, RowChecker
from torchrec_mm.data.schema import DataError, DatasetMeta

logger = logging.getLogger(__name__)

# format name -> (module, function)
IMPORTERS: Dict[str, Tuple[str, str]] = {
    "movielens-100k": ("torchrec_mm.data.importers.movielens", "import_movielens_100k"),
    "movielens-1m": ("torchrec_mm.data.importers.movielens", "import_movielens_1m"),
    "movielens-latest": ("torchrec_mm.data.importers.movielens", "import_movielens_latest"),
    "amazon2018": ("torchrec_mm.data.importers.amazon", "import_amazon2018"),
    "redmmu": ("torchrec_mm.data.importers.redmmu", "import_redmmu"),
}

CHUNK_BYTES = 8 << 20


@dataclass
class ImportResult:
    """What an importer produced.

    Attributes:
        meta: the written dataset's ``meta.json``.
        stats: records imported and bad records skipped.
    """

    meta: DatasetMeta
    stats: ReadStats


def import_dataset(fmt: str, src: str, out: str, **options: Any) -> ImportResult:
    """Runs the importer of format ``fmt`` (a key of :data:`IMPORTERS`).

    Args:
        fmt: source format.
        src: source path (directory for MovieLens, file otherwise).
        out: dataset directory to create.
        options: importer options (``skip_bad``, ``max_records``, ``overwrite``,
            ``label_threshold``, ``meta_path``, ``items_path``).
    """
    if fmt not in IMPORTERS:
        raise ValueError(f"unknown format {fmt!r}; choose from {sorted(IMPORTERS)}")
    module, fn = IMPORTERS[fmt]
    return getattr(importlib.import_module(module), fn)(src, out, **options)


# --------------------------------------------------------------------------- reading


def open_binary(path: str) -> Tuple[IO[bytes], IO[bytes]]:
    """Opens ``path`` for reading bytes, decompressing ``.gz`` (by magic number).

    Returns:
        (stream to read, raw file whose ``tell()`` measures progress).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    raw = open(path, "rb")
    magic = raw.read(2)
    raw.seek(0)
    if magic == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    return raw, raw


def _progress(path: str, desc: Optional[str]) -> tqdm:
    return tqdm(total=os.path.getsize(path), unit="B", unit_scale=True,
                desc=desc or os.path.basename(path), leave=False,
                disable=None)  # disabled when stderr is not a terminal


@dataclass
class LineChunk:
    """A chunk of text lines.

    Attributes:
        lines: ``pa.StringArray`` [n], line terminators removed.
        line_no: ``np.int64`` [n], 1-based line numbers in the file.
        raw: the whole chunk as UTF-8 bytes, including blank/skipped lines (for
            parsers that take bytes, e.g. ``pyarrow.json``).
    """

    lines: pa.Array
    line_no: np.ndarray
    raw: bytes = b""

    def __len__(self) -> int:
        return len(self.lines)

    def filter(self, mask: np.ndarray) -> "LineChunk":
        return LineChunk(self.lines.filter(pa.array(mask)), self.line_no[mask], self.raw)


def iter_line_chunks(path: str, encoding: str = "utf-8", chunk_bytes: int = CHUNK_BYTES,
                     skip_lines: int = 0, drop_empty: bool = True,
                     desc: Optional[str] = None) -> Iterator[LineChunk]:
    """Streams a text file (plain or gzip) as chunks of whole lines.

    Lines are split in C++ (``pyarrow.compute.split_pattern``); ``\\r\\n`` endings
    are handled. Undecodable bytes raise DataError with the line number.

    Args:
        encoding: text encoding of the file (e.g. ``latin-1`` for MovieLens 100K/1M).
        skip_lines: header lines to skip.
        drop_empty: drop blank lines (line numbers stay exact).
    """
    stream, raw = open_binary(path)
    decoder_name = codecs.lookup(encoding).name
    next_line = 1
    with stream, _progress(path, desc) as bar:
        while True:
            data = stream.read(chunk_bytes)
            if not data:
                break
            if not data.endswith(b"\n"):
                data += stream.readline()
            try:
                text = data.decode(decoder_name)
            except UnicodeDecodeError as e:
                line = next_line + data[: e.start].count(b"\n")
                raise DataError(path, f"line {line}", None,
                                f"not valid {encoding} text: {e.reason}") from None
            lines = pc.split_pattern(pa.array([text], pa.string()), "\n").flatten()
            if text.endswith("\n"):
                lines = lines.slice(0, len(lines) - 1)
            lines = pc.utf8_rtrim(lines, "\r")
            line_no = np.arange(next_line, next_line + len(lines), dtype=np.int64)
            next_line += len(lines)
            bar.update(raw.tell() - bar.n)
            raw_utf8 = data if decoder_name == "utf-8" else text.encode("utf-8")
            chunk = LineChunk(lines, line_no, raw_utf8)
            if skip_lines:
                k = min(skip_lines, len(chunk))
                chunk = LineChunk(chunk.lines.slice(k), chunk.line_no[k:], raw_utf8)
                skip_lines -= k
            if drop_empty and len(chunk):
                nonempty = _np(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(chunk.lines)), 0))
                if not nonempty.all():
                    chunk = chunk.filter(nonempty)
            if len(chunk):
                yield chunk


def line_checker(path: str, chunk: LineChunk, skip_bad: bool, stats: ReadStats) -> RowChecker:
    """A :class:`RowChecker` whose records are ``"line N"`` of ``chunk``."""
    return RowChecker(path, len(chunk), lambda i: f"line {chunk.line_no[i]}", skip_bad, stats)


def split_fields(chunk: LineChunk, sep: str, names: Sequence[str],
                 checker: RowChecker, min_fields: Optional[int] = None) -> Dict[str, pa.Array]:
    """Splits delimited lines into string columns (vectorised).

    Lines with a wrong number of fields are marked bad in ``checker`` (field = the
    first missing/extra column); their values are empty strings.

    Args:
        sep: the separator (may be several characters, e.g. ``::``).
        names: column names, in order.
        min_fields: accept lines with at least this many fields (extra ignored);
            default: exactly ``len(names)``.
    """
    parts = pc.split_pattern(chunk.lines, sep)
    counts = _np(pc.list_value_length(parts))
    want = len(names)
    bad = counts != want if min_fields is None else counts < min_fields
    if bad.any():
        # name the first missing column (or the last one when there are extra fields)
        first = int(counts[np.flatnonzero(bad)[0]])
        checker.fail(bad, names[min(first, want - 1)],
                     lambda i: f"expected {want} fields separated by {sep!r}, got {counts[i]}")
        pad = pa.array([[""] * want] * int(bad.sum()), pa.list_(pa.string()))
        parts = _replace_rows(parts, np.flatnonzero(bad), pad)
    return {name: pc.list_element(parts, k) for k, name in enumerate(names)}


def _replace_rows(parts: pa.Array, idx: np.ndarray, pad: pa.Array) -> pa.Array:
    """Replaces rows ``idx`` of a list array with the rows of ``pad``."""
    n = len(parts)
    src = np.arange(n)
    combined = pa.concat_arrays([parts.cast(pad.type), pad])
    src[idx] = n + np.arange(len(idx))
    return combined.take(pa.array(src))


_INT_RE = r"^\s*[+-]?\d{1,18}\s*$"
_FLOAT_RE = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"


def parse_int(values: pa.Array, field_name: str, checker: RowChecker) -> np.ndarray:
    """Parses a string column as int64 [n]; non-integers are marked bad (value 0)."""
    ok = _np(pc.match_substring_regex(values.fill_null(""), _INT_RE))
    checker.fail(~ok, field_name, lambda i: f"expected an integer, got {values[i].as_py()!r}")
    clean = pc.if_else(pa.array(ok), pc.utf8_trim_whitespace(values.fill_null("")), "0")
    return _np(pc.cast(clean, pa.int64()))


def parse_float(values: pa.Array, field_name: str, checker: RowChecker) -> np.ndarray:
    """Parses a string column as float64 [n]; non-numbers are marked bad (value 0)."""
    ok = _np(pc.match_substring_regex(values.fill_null(""), _FLOAT_RE))
    checker.fail(~ok, field_name, lambda i: f"expected a number, got {values[i].as_py()!r}")
    clean = pc.if_else(pa.array(ok), pc.utf8_trim_whitespace(values.fill_null("")), "0")
    return _np(pc.cast(clean, pa.float64()))


def _np(values: Any) -> np.ndarray:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values.to_numpy(zero_copy_only=False)
    return np.asarray(values)


def json_loads_lines(path: str, chunk: LineChunk, checker: RowChecker
                     ) -> List[Any]:
    """``json.loads`` of every line; malformed lines are marked bad (value None)."""
    out: List[Any] = []
    bad = np.zeros(len(chunk), dtype=bool)
    errors: Dict[int, str] = {}
    for i, line in enumerate(chunk.lines.to_pylist()):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            out.append(None)
            bad[i] = True
            errors[i] = f"malformed JSON: {e.msg} (column {e.colno})"
    checker.fail(bad, "json", lambda i: errors[i])
    return out


def _json_kind_ok(v: Any, t: pa.DataType) -> bool:
    if v is None:
        return True
    if pa.types.is_string(t):
        return isinstance(v, str)
    if isinstance(v, bool):
        return pa.types.is_boolean(t)
    if pa.types.is_integer(t):
        return isinstance(v, int)
    if pa.types.is_floating(t):
        return isinstance(v, (int, float))
    return True


def json_columns(path: str, chunk: LineChunk, fields: Dict[str, pa.DataType],
                 checker: RowChecker) -> Dict[str, pa.Array]:
    """Top-level ``fields`` of a JSON-lines chunk as arrays [n] (missing keys → null).

    Fast path: ``pyarrow.json`` on the whole chunk (C++). If that fails (malformed
    line, a value of the wrong type), every line is decoded with ``json.loads`` to
    mark exactly the bad lines in ``checker`` (field ``json`` or the field name).
    """
    schema = pa.schema([(k, t) for k, t in fields.items()])
    try:
        table = pajson.read_json(
            io.BytesIO(chunk.raw),
            read_options=pajson.ReadOptions(block_size=max(len(chunk.raw) + 1, 1 << 20)),
            parse_options=pajson.ParseOptions(explicit_schema=schema,
                                              unexpected_field_behavior="ignore"))
        if table.num_rows == len(chunk):
            return {k: table.column(k).combine_chunks() for k in fields}
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    objs = json_loads_lines(path, chunk, checker)
    not_obj = np.array([o is not None and not isinstance(o, dict) for o in objs], bool)
    checker.fail(not_obj, "json", lambda i: f"expected a JSON object, got {type(objs[i]).__name__}")
    out: Dict[str, pa.Array] = {}
    for name, t in fields.items():
        vals = [o.get(name) if isinstance(o, dict) else None for o in objs]
        wrong = np.array([not _json_kind_ok(v, t) for v in vals], bool)
        checker.fail(wrong, name, lambda i: f"expected {t}, got {type(vals[i]).__name__} "
                     f"{vals[i]!r}"[:200])
        out[name] = pa.array([None if w else v for v, w in zip(vals, wrong)], type=t)
    return out


def iter_json_array(path: str, chunk_chars: int = 1 << 22
                    ) -> Iterator[Tuple[int, int, Any]]:
    """Streams the elements of a top-level JSON array without loading the file.

    Yields:
        (element index, line number where it starts, decoded value).

    Raises:
        DataError: malformed JSON (record = element index and line).
    """
    stream, _ = open_binary(path)
    decoder = json.JSONDecoder()
    with io.TextIOWrapper(stream, encoding="utf-8") as f:
        buf, pos, line, eof = "", 0, 1, False

        def fill() -> bool:
            """Appends the next block (dropping what was consumed); False at EOF."""
            nonlocal buf, pos, eof
            if eof:
                return False
            more = f.read(chunk_chars)
            if not more:
                eof = True
                return False
            buf, pos = buf[pos:] + more, 0
            return True

        def peek() -> str:
            """Skips whitespace (counting lines); the next character, '' at EOF."""
            nonlocal pos, line
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    line += buf[pos] == "\n"
                    pos += 1
                if pos < len(buf):
                    return buf[pos]
                if not fill():
                    return ""

        if peek() != "[":
            raise DataError(path, f"line {line}", None, "expected a JSON array ('[')")
        pos += 1
        if peek() == "]":
            return
        index = 0
        while True:
            if peek() == "":
                raise DataError(path, f"element {index} (line {line})", None,
                                "unexpected end of file inside the JSON array")
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as e:
                    if fill():
                        continue
                    err_line = line + buf.count("\n", pos, e.pos)
                    raise DataError(path, f"element {index} (line {err_line})", None,
                                    f"malformed JSON: {e.msg}") from None
                # a value must be followed by a delimiter; otherwise (e.g. a number cut
                # at the block end: "-1" of "-1.5") read on and decode again
                if (end == len(buf) or buf[end] not in " \t\r\n,]") and fill():
                    continue
                break
            yield index, line, value
            line += buf.count("\n", pos, end)
            pos = end
            index += 1
            ch = peek()
            if ch == "]":
                return
            if ch != ",":
                raise DataError(path, f"element {index} (line {line})", None,
                                "malformed JSON: expected ',' or ']'"
                                + (f", got {ch!r}" if ch else " before the end of file"))
            pos += 1


def first_non_ws_char(path: str) -> str:
    stream, _ = open_binary(path)
    with stream:
        while True:
            block = stream.read(4096)
            if not block:
                return ""
            s = block.lstrip()
            if s:
                return s[:1].decode("ascii", "replace")


# --------------------------------------------------------------------------- ids


class IdMap:
    """Maps raw ids to dense int64 ids in order of first appearance (vectorised per
    chunk: only the chunk's distinct values go through a Python dict)."""

    def __init__(self) -> None:
        self._index: Dict[Any, int] = {}
        self._raw: List[Any] = []
        self._value_set: Optional[pa.Array] = None

    def __len__(self) -> int:
        return len(self._raw)

    def add(self, raw: pa.Array) -> np.ndarray:
        """Dense ids [n] of ``raw`` (new raw ids get the next ids)."""
        if len(raw) == 0:
            return np.zeros(0, np.int64)
        uniq = pc.unique(raw)  # in order of first appearance
        values = uniq.to_pylist()
        if None in values:
            raise ValueError("raw ids must not be null")
        new = [r for r, i in zip(values, map(self._index.get, values)) if i is None]
        if new:
            start = len(self._raw)
            self._index.update(zip(new, range(start, start + len(new))))
            self._raw.extend(new)
            self._value_set = None
        ids = np.fromiter(map(self._index.__getitem__, values), dtype=np.int64,
                          count=len(values))
        return ids[_np(pc.index_in(raw, value_set=uniq))]

    def lookup(self, raw: pa.Array) -> np.ndarray:
        """Dense ids [n] of ``raw``; -1 where unknown (never adds)."""
        if not self._raw or len(raw) == 0:
            return np.full(len(raw), -1, np.int64)
        if self._value_set is None or self._value_set.type != raw.type:
            self._value_set = pa.array(self._raw, type=raw.type)
        idx = pc.index_in(raw, value_set=self._value_set)
        return _np(idx.fill_null(-1)).astype(np.int64)

    def raw_ids(self) -> List[str]:
        return [str(r) for r in self._raw]


def sorted_lookup(catalogue: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """Positions of ``raw`` in the sorted int array ``catalogue``; -1 where absent."""
    pos = np.searchsorted(catalogue, raw)
    pos_c = np.minimum(pos, max(len(catalogue) - 1, 0))
    found = (len(catalogue) > 0) & (catalogue[pos_c] == raw) if len(catalogue) else \
        np.zeros(len(raw), bool)
    return np.where(found, pos_c, -1).astype(np.int64)


def finish_stats(stats: ReadStats, what: str) -> Dict[str, Any]:
    """Logs skipped records; returns the summary stored in ``meta.source``."""
    stats.log_bad(what)
    return {"records": stats.rows, "bad_records": stats.bad_rows,
            "bad_by_field": dict(stats.bad_by_field)}


def rating_actions(label: np.ndarray) -> np.ndarray:
    """Action masks of rating datasets: bit 0 ``is_click`` (= label), bit 1 ``rated``."""
    return label.astype(np.int64) | 2


RATING_ACTIONS = ["is_click", "rated"]


def truncate(n_done: int, n: int, max_records: Optional[int]) -> int:
    """How many of the next ``n`` records fit under ``max_records``."""
    if max_records is None:
        return n
    return max(0, min(n, max_records - n_done))

