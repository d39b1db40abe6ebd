"""RED-MMU importer: the cross-scenario user-history JSON of the RED-Rec paper
(appendix C, listing 1).

The source holds one object per user, either one per line (JSON lines) or as the
elements of one top-level JSON array (streamed, never loaded whole)::

    {"user_id": "xxxx",
     "data": {"homefeed_item_lastn": [{"item_id": "684a...", "timestamp": 1749771247,
                                       "duration": 28, "is_click": 1, "is_like": 0, ...},
                                      ...],
              "ads_item_lastn": [...], "search_item_lastn": [...]}}

(the ``*_item_lastn`` lists may also sit at the top level of the user object).

* **Scenarios** come from the keys: ``<scenario>_item_lastn`` (homefeed, ads, search or
  any other). Their order in ``meta.scenarios`` is the order of first appearance, with
  the keys of one user object taken in the order homefeed, search, ads, then the others
  alphabetically (so when the first user object has the usual three lists, even
  empty ones, they get indices 0, 1, 2).
* **Actions**: every ``is_*`` flag becomes an action bit; bit 0 is ``is_click``, the
  others follow in order of first appearance (flags of one event alphabetically).
  Missing flags are 0; a flag must be 0/1 (or a boolean).
* ``label = is_click``; ``duration`` in seconds (missing → 0); ``timestamp`` required.
* **Ids**: raw string ids (users and items) are mapped to dense int64 ids in order of
  first appearance; ``raw_id`` keeps the original. Only items that occur in a history
  are kept.
* **Item content** (optional ``items_path``): JSON lines with ``item_id`` and any of
  ``title``, ``text``/``content``/``desc``, ``tags`` (list or string), ``ocr``, and
  ``image_path``/``image`` (relative paths are resolved against the items file's
  directory). Text = title, body, ``"Tags: ..."`` and OCR joined; items without
  content get an empty text.

Events are converted to columns with one ``pyarrow.array`` call per chunk of users;
only a chunk with a problem is re-checked event by event to name the bad event
(``line N, homefeed_item_lastn[j]``). Malformed JSON raises DataError with the line
number (with ``skip_bad`` a malformed *line* is skipped and counted; a malformed element
of a JSON array always raises, since the array cannot be resynchronised).
"""

import os
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from torchrec_mm.data.importers import (
    IdMap,
    ImportResult,
    finish_stats,
    first_non_ws_char,
    iter_json_array,
    iter_line_chunks,
    json_loads_lines,
    line_checker,
    truncate,
)
from torchrec_mm.data.io import DatasetWriter, ReadStats, RowChecker
from torchrec_mm.data.schema import CLICK_ACTION, DataError

LASTN_SUFFIX = "_item_lastn"
SCENARIO_ORDER = ["homefeed", "search", "ads"]
ARRAY_BATCH = 2048
TEXT_FIELDS = ("title", "text", "content", "desc")


def _scenario_rank(key: str) -> Tuple[int, str]:
    name = key[: -len(LASTN_SUFFIX)]
    return (SCENARIO_ORDER.index(name) if name in SCENARIO_ORDER else len(SCENARIO_ORDER), name)


def _iter_user_batches(path: str, skip_bad: bool, stats: ReadStats
                       ) -> Iterator[Tuple[List[Any], List[str]]]:
    """Yields (decoded user objects, record labels); malformed lines are None."""
    if first_non_ws_char(path) == "[":
        objs: List[Any] = []
        labels: List[str] = []
        for index, line, obj in iter_json_array(path):
            objs.append(obj)
            labels.append(f"element {index} (line {line})")
            if len(objs) >= ARRAY_BATCH:
                yield objs, labels
                objs, labels = [], []
        if objs:
            yield objs, labels
        return
    for chunk in iter_line_chunks(path, desc="users"):
        checker = line_checker(path, chunk, skip_bad, stats)
        objs = json_loads_lines(path, chunk, checker)
        checker.keep()
        yield objs, [f"line {n}" for n in chunk.line_no]


def import_redmmu(src: str, out: str, *, items_path: Optional[str] = None,
                  skip_bad: bool = False, max_records: Optional[int] = None,
                  overwrite: bool = False) -> ImportResult:
    """Imports RED-MMU user histories.

    Args:
        src: JSON-lines file (one user object per line) or a JSON array of user
            objects; plain or gzip.
        out: dataset directory to create.
        items_path: optional JSON-lines item content file.
        skip_bad: drop and count bad records (users or events) instead of raising.
        max_records: import at most this many events.
        overwrite: replace an existing dataset at ``out``.
    """
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{src} not found (expected RED-MMU user JSON)")
    stats = ReadStats()
    users, items = IdMap(), IdMap()
    with DatasetWriter(
        out, "redmmu", scenarios=[], actions=[CLICK_ACTION],
        source={"importer": "redmmu", "src": os.path.abspath(src),
                "items": os.path.abspath(items_path) if items_path else None,
                "label": "is_click", "id_order": "first appearance"},
        overwrite=overwrite,
    ) as w:
        for objs, labels in _iter_user_batches(src, skip_bad, stats):
            if max_records is not None and stats.rows >= max_records:
                break
            _import_users(src, objs, labels, w, users, items, skip_bad, stats, max_records)
        if not w.scenarios:
            raise DataError(src, "line 1", None,
                            f"no '<scenario>{LASTN_SUFFIX}' lists found: not RED-MMU user JSON")
        texts = [""] * len(items)
        images: List[Optional[str]] = [None] * len(items)
        if items_path is not None:
            _read_items(items_path, items, texts, images, skip_bad, stats)
        w.set_items({"raw_id": pa.array(items.raw_ids(), pa.string()),
                     "text": pa.array(texts, pa.string()),
                     "image_path": pa.array(images, pa.string())})
        w.set_users({"raw_id": pa.array(users.raw_ids(), pa.string())})
        w.source.update(items_with_text=int(sum(1 for t in texts if t)),
                        **finish_stats(stats, src))
    return ImportResult(w.meta, stats)


def _import_users(path: str, objs: List[Any], labels: List[str], w: DatasetWriter,
                  users: IdMap, items: IdMap, skip_bad: bool, stats: ReadStats,
                  max_records: Optional[int]) -> None:
    """Converts one batch of user objects into interactions."""
    ucheck = RowChecker(path, len(objs), lambda i: labels[i], skip_bad, stats)
    problems: Dict[str, Tuple[np.ndarray, Dict[int, str]]] = {}

    def problem(field_name: str, i: int, msg: str) -> None:
        mask, msgs = problems.setdefault(field_name, (np.zeros(len(objs), bool), {}))
        mask[i] = True
        msgs[i] = msg

    events: List[Any] = []
    ev_user: List[str] = []
    ev_scen: List[int] = []
    ev_rec: List[int] = []
    ev_key: List[str] = []
    ev_pos: List[np.ndarray] = []
    for i, obj in enumerate(objs):
        if obj is None:  # malformed line, already counted
            continue
        if not isinstance(obj, dict):
            problem("json", i, f"expected a JSON object, got {type(obj).__name__}")
            continue
        uid = obj.get("user_id")
        if uid is None or isinstance(uid, bool) or not isinstance(uid, (str, int)):
            problem("user_id", i, "missing user_id" if uid is None
                    else f"user_id must be a string, got {uid!r}"[:200])
            continue
        data = obj.get("data", obj)
        if not isinstance(data, dict):
            problem("data", i, f"'data' must be an object, got {type(data).__name__}")
            continue
        keys = sorted((k for k in data if isinstance(k, str) and k.endswith(LASTN_SUFFIX)),
                      key=_scenario_rank)
        if not keys:
            problem("data", i, f"no '<scenario>{LASTN_SUFFIX}' lists")
            continue
        bad_key = next((k for k in keys if not isinstance(data[k], list)), None)
        if bad_key is not None:
            problem(bad_key, i, f"expected a list, got {type(data[bad_key]).__name__}")
            continue
        for k in keys:
            lst = data[k]
            scen_index = w.add_scenario(k[: -len(LASTN_SUFFIX)])  # declared even if empty
            if not lst:
                continue
            events.extend(lst)
            ev_user.append(str(uid))
            ev_scen.append(scen_index)
            ev_rec.append(i)
            ev_key.append(k)
            ev_pos.append(np.arange(len(lst)))
    for field_name, (mask, msgs) in problems.items():
        ucheck.fail(mask, field_name, lambda j, msgs=msgs: msgs[j])
    ucheck.keep()
    if not events:
        return

    counts = np.array([len(p) for p in ev_pos], np.int64)
    rec = np.repeat(np.array(ev_rec, np.int64), counts)
    key_idx = np.repeat(np.arange(len(ev_key)), counts)
    pos = np.concatenate(ev_pos)
    scen = np.repeat(np.array(ev_scen, np.int16), counts)
    user_raw = pa.array(ev_user, pa.string()).take(pa.array(key_idx))

    echeck = RowChecker(path, len(events),
                        lambda j: f"{labels[rec[j]]}, {ev_key[key_idx[j]]}[{pos[j]}]",
                        skip_bad, stats)
    struct = _to_struct(events, echeck)
    cols = _event_columns(struct, echeck)
    keep = np.flatnonzero(echeck.keep())
    keep = keep[: truncate(stats.rows, len(keep), max_records)]
    take = pa.array(keep)
    actions = np.zeros(len(keep), np.int64)
    for name in sorted(cols["flags"]):
        bit = w.add_action(name)
        actions |= cols["flags"][name][keep].astype(np.int64) << bit
    label = cols["flags"].get(CLICK_ACTION, np.zeros(len(events), np.int8))[keep]
    w.add_interactions({
        "user_id": users.add(user_raw.take(take)),
        "item_id": items.add(cols["item_id"].take(take)),
        "scenario": scen[keep],
        "timestamp": cols["timestamp"][keep],
        "duration": cols["duration"][keep],
        "label": label,
        "actions": actions,
    })
    stats.rows += len(keep)


def _to_struct(events: List[Any], checker: RowChecker) -> pa.StructArray:
    """Events as one StructArray; a batch with a bad event is sanitised event by event."""
    try:
        arr = pa.array(events)
        if pa.types.is_struct(arr.type):
            return arr
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
        pass
    clean: List[Dict[str, Any]] = []
    problems: Dict[str, Tuple[np.ndarray, Dict[int, str]]] = {}
    for j, e in enumerate(events):
        out: Dict[str, Any] = {}
        bad = None
        if not isinstance(e, dict):
            bad = ("event", f"expected an object, got {type(e).__name__}")
        else:
            for k, v in e.items():
                if k == "item_id":
                    if isinstance(v, bool) or not isinstance(v, (str, int)):
                        bad = (k, f"item_id must be a string, got {v!r}")
                        break
                    out[k] = str(v)
                elif k == "timestamp":
                    if isinstance(v, bool) or not isinstance(v, int):
                        bad = (k, f"expected an integer, got {v!r}")
                        break
                    out[k] = v
                elif k == "duration":
                    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                        bad = (k, f"expected a number, got {v!r}")
                        break
                    out[k] = None if v is None else float(v)
                elif k.startswith("is_"):
                    if v is not None and v not in (0, 1):
                        bad = (k, f"action flag must be 0 or 1, got {v!r}")
                        break
                    out[k] = None if v is None else int(v)
        if bad is not None:
            mask, msgs = problems.setdefault(bad[0], (np.zeros(len(events), bool), {}))
            mask[j] = True
            msgs[j] = bad[1][:200]
            out = {}
        clean.append(out)
    for field_name, (mask, msgs) in problems.items():
        checker.fail(mask, field_name, lambda j, msgs=msgs: msgs[j])
    fields = sorted({k for e in clean for k in e})
    types = {k: (pa.string() if k == "item_id" else pa.int64() if k == "timestamp"
                 else pa.float64() if k == "duration" else pa.int8()) for k in fields}
    return pa.array(clean, type=pa.struct([(k, types[k]) for k in fields])) if fields else \
        pa.array([{}] * len(events), type=pa.struct([]))


def _event_columns(struct: pa.StructArray, checker: RowChecker) -> Dict[str, Any]:
    """Validated columns of the events (vectorised)."""
    n = len(struct)
    names = [struct.type.field(k).name for k in range(struct.type.num_fields)]

    def col(name: str) -> Optional[pa.Array]:
        return struct.field(name) if name in names else None

    ok = ~checker.bad
    item = col("item_id")
    if item is None:
        item = pa.nulls(n, pa.string())
    if pa.types.is_integer(item.type):
        item = pc.cast(item, pa.string())
    if not pa.types.is_string(item.type) and not pa.types.is_null(item.type):
        checker.fail(ok & ~_np(item.is_null()), "item_id",
                     f"item_id must be a string, got {item.type}")
        item = pa.nulls(n, pa.string())
    item = item.cast(pa.string())
    checker.fail(ok & _np(item.is_null()), "item_id", "missing item_id")

    ts_col = col("timestamp")
    if ts_col is None or pa.types.is_null(ts_col.type):
        ts_col = pa.nulls(n, pa.int64())
    if pa.types.is_floating(ts_col.type):
        f = _np(ts_col.fill_null(0.0))
        checker.fail(ok & (f != np.floor(f)), "timestamp",
                     lambda j: f"expected an integer timestamp, got {f[j]}")
        ts_col = pa.array(np.where(np.isfinite(f), f, 0).astype(np.int64),
                          mask=_np(ts_col.is_null()))
    elif not pa.types.is_integer(ts_col.type):
        checker.fail(ok & ~_np(ts_col.is_null()), "timestamp",
                     f"expected an integer timestamp, got {ts_col.type}")
        ts_col = pa.nulls(n, pa.int64())
    checker.fail(ok & _np(ts_col.is_null()), "timestamp", "missing timestamp")
    ts = _np(ts_col.cast(pa.int64()).fill_null(0)).astype(np.int64)
    checker.fail(ok & (ts < 0), "timestamp", lambda j: f"negative timestamp {ts[j]}")

    dur_col = col("duration")
    duration = np.zeros(n, np.float32)
    if dur_col is not None and not pa.types.is_null(dur_col.type):
        if pa.types.is_integer(dur_col.type) or pa.types.is_floating(dur_col.type):
            duration = _np(dur_col.cast(pa.float64()).fill_null(0.0)).astype(np.float32)
            checker.fail(ok & ~(np.isfinite(duration) & (duration >= 0)), "duration",
                         lambda j: f"duration must be >= 0, got {duration[j]}")
        else:
            checker.fail(ok & ~_np(dur_col.is_null()), "duration",
                         f"expected a number, got {dur_col.type}")

    flags: Dict[str, np.ndarray] = {}
    for name in names:
        if not name.startswith("is_"):
            continue
        c = struct.field(name)
        if pa.types.is_null(c.type):
            flags[name] = np.zeros(n, np.int8)
            continue
        if pa.types.is_boolean(c.type):
            c = c.cast(pa.int8())
        if not pa.types.is_integer(c.type):
            checker.fail(ok & ~_np(c.is_null()), name, f"action flag must be 0 or 1, got {c.type}")
            flags[name] = np.zeros(n, np.int8)
            continue
        v = _np(c.fill_null(0)).astype(np.int64)
        checker.fail(ok & (v != 0) & (v != 1), name,
                     lambda j, v=v, name=name: f"action flag must be 0 or 1, got {v[j]}")
        flags[name] = (v == 1).astype(np.int8)
    return {"item_id": item, "timestamp": ts, "duration": duration, "flags": flags}


def _read_items(path: str, items: IdMap, texts: List[str], images: List[Optional[str]],
                skip_bad: bool, stats: ReadStats) -> None:
    base = os.path.dirname(os.path.abspath(path))
    for chunk in iter_line_chunks(path, desc="items"):
        checker = line_checker(path, chunk, skip_bad, stats)
        objs = json_loads_lines(path, chunk, checker)
        raw = [str(o["item_id"]) if isinstance(o, dict) and isinstance(o.get("item_id"), (str, int))
               and not isinstance(o.get("item_id"), bool) else None for o in objs]
        missing = np.array([o is not None and r is None for o, r in zip(objs, raw)], bool)
        checker.fail(missing, "item_id", "missing item_id (or not an object)")
        checker.keep()
        ids = items.lookup(pa.array(raw, pa.string()).fill_null(""))
        for k in np.flatnonzero(ids >= 0):
            obj = objs[k]
            texts[ids[k]] = item_text(obj)
            img = obj.get("image_path", obj.get("image"))
            if isinstance(img, str) and img:
                images[ids[k]] = img if os.path.isabs(img) or "://" in img \
                    else os.path.join(base, img)


def item_text(obj: Dict[str, Any]) -> str:
    """Item text from a RED-MMU items record: title, body, tags and OCR."""
    parts: List[str] = []
    for k in TEXT_FIELDS:
        v = obj.get(k)
        if isinstance(v, str) and v.strip():
            parts.append(v.strip())
    tags = obj.get("tags")
    if isinstance(tags, list):
        tags = ", ".join(str(t) for t in tags if t)
    if isinstance(tags, str) and tags.strip():
        parts.append(f"Tags: {tags.strip()}")
    ocr = obj.get("ocr")
    if isinstance(ocr, str) and ocr.strip():
        parts.append(ocr.strip())
    return " ".join(p if p.endswith((".", "!", "?")) else p + "." for p in parts)


def _np(a: Any) -> np.ndarray:
    return a.to_numpy(zero_copy_only=False)
