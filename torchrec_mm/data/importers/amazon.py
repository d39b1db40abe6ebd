"""Amazon Reviews 2018 importer (https://nijianmo.github.io/amazon/).

Reads a reviews file (JSON lines, plain or gzip; one review per line with
``reviewerID``, ``asin``, ``overall``, ``unixReviewTime``; other keys ignored) and,
optionally, the matching metadata file (JSON lines with ``asin``, ``title``,
``brand``, ``category``, ``feature``, ``description``) for item text.

* ``label = overall >= label_threshold`` (default 4); ``actions``: bit 0 ``is_click``
  (= label), bit 1 ``rated``; ``scenario = "homefeed"``; ``duration = 0``.
* Ids: users (``reviewerID``) and items (``asin``) get dense ids in order of **first
  appearance** in the reviews file. Only reviewed items are kept.
* Item text: ``"<title>. Brand: <brand>. Category: <a> > <b>. <features>. <description>"``
  (HTML entities unescaped, tags stripped, at most ``max_text_chars`` characters).
  Items without metadata get an empty text. Image URLs are not downloaded
  (``image_path`` stays null).

The reviews are parsed with ``pyarrow.json`` per chunk; only chunks with a problem are
re-read line by line to name the bad line. From the metadata file only the lines whose
``asin`` is a reviewed item are decoded.
"""

import html
import os
import re
from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from torchrec_mm.data.importers import (
    RATING_ACTIONS,
    IdMap,
    ImportResult,
    finish_stats,
    iter_line_chunks,
    json_columns,
    json_loads_lines,
    line_checker,
    rating_actions,
    truncate,
)
from torchrec_mm.data.io import DatasetWriter, ReadStats

SCENARIO = "homefeed"
REVIEW_FIELDS = {
    "reviewerID": pa.string(),
    "asin": pa.string(),
    "overall": pa.float64(),
    "unixReviewTime": pa.int64(),
}
_ASIN_RE = r'"asin"\s*:\s*"(?P<asin>[^"\\]*)"'
_TAG_RE = re.compile(r"<[^>]{0,200}>")


def _as_text(v: Any, sep: str = " ") -> str:
    if v is None:
        return ""
    if isinstance(v, list):
        return sep.join(_as_text(x) for x in v if x)
    return _TAG_RE.sub(" ", html.unescape(str(v))).strip()


def item_text(meta: Dict[str, Any], max_chars: int = 2000) -> str:
    """Item text from an Amazon 2018 metadata record."""
    parts: List[str] = []
    title = _as_text(meta.get("title"))
    if title:
        parts.append(title.rstrip(".") + ".")
    brand = _as_text(meta.get("brand"))
    if brand:
        parts.append(f"Brand: {brand}.")
    cats = meta.get("category") or meta.get("categories")
    if cats:
        flat = cats[0] if isinstance(cats, list) and cats and isinstance(cats[0], list) else cats
        c = _as_text(flat, " > ")
        if c:
            parts.append(f"Category: {c}.")
    feats = meta.get("feature")
    if feats:
        f = _as_text(feats[:5] if isinstance(feats, list) else feats, "; ")
        if f:
            parts.append(f.rstrip(".") + ".")
    desc = _as_text(meta.get("description"))
    if desc:
        parts.append(desc)
    text = " ".join(" ".join(parts).split())
    return text[:max_chars]


def import_amazon2018(src: str, out: str, *, meta_path: Optional[str] = None,
                      skip_bad: bool = False, max_records: Optional[int] = None,
                      label_threshold: float = 4.0, overwrite: bool = False,
                      max_text_chars: int = 2000) -> ImportResult:
    """Imports an Amazon Reviews 2018 category.

    Args:
        src: reviews JSON-lines file (``.json`` or ``.json.gz``).
        out: dataset directory to create.
        meta_path: optional metadata JSON-lines file for item text.
        skip_bad: drop and count bad records instead of raising DataError.
        max_records: import at most this many reviews.
        label_threshold: ``label = overall >= label_threshold``.
        overwrite: replace an existing dataset at ``out``.
        max_text_chars: cut item texts to this length.
    """
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{src} not found (expected an Amazon 2018 reviews file)")
    stats = ReadStats()
    users, items = IdMap(), IdMap()
    with DatasetWriter(
        out, "amazon2018", scenarios=[SCENARIO], actions=RATING_ACTIONS,
        source={"importer": "amazon2018", "src": os.path.abspath(src),
                "meta": os.path.abspath(meta_path) if meta_path else None,
                "label_threshold": label_threshold, "label": f"overall >= {label_threshold}",
                "id_order": "first appearance"},
        overwrite=overwrite,
    ) as w:
        for chunk in iter_line_chunks(src, desc="reviews"):
            if max_records is not None and stats.rows >= max_records:
                break
            checker = line_checker(src, chunk, skip_bad, stats)
            cols = json_columns(src, chunk, REVIEW_FIELDS, checker)
            for name, arr in cols.items():
                checker.fail(_np(arr.is_null()) & ~checker.bad, name, "missing field")
            rating = _np(cols["overall"].fill_null(0.0)).astype(np.float64)
            ts = _np(cols["unixReviewTime"].fill_null(0)).astype(np.int64)
            checker.fail(~(np.isfinite(rating) & (rating >= 0)), "overall",
                         lambda i: f"rating must be >= 0, got {rating[i]}")
            checker.fail(ts < 0, "unixReviewTime", lambda i: f"negative timestamp {ts[i]}")
            keep = np.flatnonzero(checker.keep())
            keep = keep[: truncate(stats.rows, len(keep), max_records)]
            take = pa.array(keep)
            user = users.add(cols["reviewerID"].take(take))
            item = items.add(cols["asin"].take(take))
            label = (rating[keep] >= label_threshold).astype(np.int8)
            w.add_interactions({
                "user_id": user, "item_id": item, "scenario": SCENARIO,
                "timestamp": ts[keep], "label": label, "actions": rating_actions(label),
            })
            stats.rows += len(keep)

        texts = [""] * len(items)
        if meta_path is not None:
            _read_meta(meta_path, items, texts, skip_bad, stats, max_text_chars)
        w.set_items({"raw_id": pa.array(items.raw_ids(), pa.string()),
                     "text": pa.array(texts, pa.string())})
        w.set_users({"raw_id": pa.array(users.raw_ids(), pa.string())})
        w.source.update(items_with_text=int(sum(1 for t in texts if t)),
                        **finish_stats(stats, src))
    return ImportResult(w.meta, stats)


def _read_meta(path: str, items: IdMap, texts: List[str], skip_bad: bool, stats: ReadStats,
               max_chars: int) -> None:
    """Fills ``texts[item_id]`` from the metadata lines of reviewed items."""
    have = np.zeros(len(items), bool)
    for chunk in iter_line_chunks(path, desc="metadata"):
        asin = pc.struct_field(pc.extract_regex(chunk.lines, _ASIN_RE), "asin")
        ids = items.lookup(asin.fill_null(""))
        wanted = ids >= 0
        wanted[wanted] = ~have[ids[wanted]]
        if not wanted.any():
            continue
        sub = chunk.filter(wanted)
        sub_ids = ids[wanted]
        checker = line_checker(path, sub, skip_bad, stats)
        objs = json_loads_lines(path, sub, checker)
        keep = checker.keep()
        for k in np.flatnonzero(keep):
            i = int(sub_ids[k])
            if not have[i] and isinstance(objs[k], dict):
                texts[i] = item_text(objs[k], max_chars)
                have[i] = True


def _np(a: pa.Array) -> np.ndarray:
    return a.to_numpy(zero_copy_only=False)
