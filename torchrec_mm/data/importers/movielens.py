"""MovieLens importers (100K, 1M, and the ``latest``/20M/25M/32M CSV releases).

MovieLens is explicit feedback; it is turned into the click format as follows:

* ``label = rating >= label_threshold`` (default 4), one interaction per rating;
* ``actions``: bit 0 ``is_click`` (= label), bit 1 ``rated`` (always set);
* ``scenario = "homefeed"`` (a single scenario), ``duration = 0``,
  ``timestamp`` = the rating's unix time;
* item text = ``"<title>. Genres: <g1>, <g2>."`` plus, where the release has
  ``tags.csv`` (latest/20M/25M/32M), ``" Tags: <t1>, <t2>, ..."`` with the movie's
  most frequent tags (lower-cased, at most ``max_tags``);
* user attributes (100K, 1M): ``attr_age`` (7 buckets: under 18, 18-24, 25-34, 35-44,
  45-49, 50-55, 56+), ``attr_gender`` and ``attr_occupation``; the value names are
  in ``meta.source["user_attr_values"]``.

Ids: movies and (100K/1M) users are listed in the release's catalogue files; dense
ids are the ranks of the numeric raw ids in **sorted** order (for ml-100k:
``dense = raw - 1``). A rating whose user or movie is not in the catalogue is a bad
record. The latest releases have no user file: user ids are assigned in order of
first appearance in ``ratings.csv`` (which is sorted by user id, so this is the
sorted order too).
"""

import csv
import io
import os
from collections import Counter, defaultdict
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa

from torchrec_mm.data.importers import (
    RATING_ACTIONS,
    IdMap,
    ImportResult,
    LineChunk,
    finish_stats,
    iter_line_chunks,
    line_checker,
    open_binary,
    parse_float,
    parse_int,
    rating_actions,
    sorted_lookup,
    split_fields,
    truncate,
)
from torchrec_mm.data.io import DatasetWriter, ReadStats, RowChecker
from torchrec_mm.data.schema import DataError

GENRES_100K = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
]
AGE_EDGES = np.array([18, 25, 35, 45, 50, 56])
AGE_BUCKETS = ["under 18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"]
OCCUPATIONS_1M = [
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer",
    "homemaker", "K-12 student", "lawyer", "programmer", "retired", "sales/marketing",
    "scientist", "self-employed", "technician/engineer", "tradesman/craftsman",
    "unemployed", "writer",
]
SCENARIO = "homefeed"


def _require(src: str, *names: str) -> List[str]:
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src} is not a directory (expected a MovieLens release)")
    paths = [os.path.join(src, n) for n in names]
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} not found: is {src} the right MovieLens release?")
    return paths


def _movie_text(title: str, genres: List[str], tags: Optional[List[str]] = None) -> str:
    text = title.strip() + "."
    genres = [g for g in genres if g and g not in ("unknown", "(no genres listed)")]
    if genres:
        text += " Genres: " + ", ".join(genres) + "."
    if tags:
        text += " Tags: " + ", ".join(tags) + "."
    return text


def _dedup_catalogue(path: str, ids: np.ndarray, line_no: np.ndarray,
                     skip_bad: bool, stats: ReadStats, what: str
                     ) -> Tuple[np.ndarray, np.ndarray]:
    """Sorted unique catalogue ids and the source row of each (duplicates are bad)."""
    order = np.argsort(ids, kind="stable")
    dup = np.zeros(len(ids), bool)
    dup[order[1:]] = ids[order[1:]] == ids[order[:-1]]
    checker = RowChecker(path, len(ids), lambda i: f"line {line_no[i]}", skip_bad, stats)
    checker.fail(dup, what, lambda i: f"duplicate {what} {ids[i]}")
    keep = checker.keep()
    order = order[keep[order]]
    return ids[order], order


def _read_pipe_catalogue(path: str, sep: str, names: List[str], encoding: str,
                         skip_bad: bool, stats: ReadStats, int_fields: List[str]
                         ) -> Tuple[Dict[str, Any], np.ndarray]:
    """Reads a small delimited catalogue file into columns (bad lines dropped/raised)."""
    cols: Dict[str, List[Any]] = defaultdict(list)
    lines: List[np.ndarray] = []
    for chunk in iter_line_chunks(path, encoding=encoding):
        checker = line_checker(path, chunk, skip_bad, stats)
        fields = split_fields(chunk, sep, names, checker)
        parsed = {f: parse_int(fields[f], f, checker) for f in int_fields}
        keep = checker.keep()
        for name in names:
            v = parsed[name] if name in parsed else np.asarray(
                fields[name].to_pylist(), dtype=object)
            cols[name].append(v[keep])
        lines.append(chunk.line_no[keep])
    out = {k: np.concatenate(v) for k, v in cols.items()}
    if not out:
        out = {n: np.zeros(0, np.int64 if n in int_fields else object) for n in names}
    return out, (np.concatenate(lines) if lines else np.zeros(0, np.int64))


def _import_ratings(path: str, sep: str, header: Optional[str], writer: DatasetWriter,
                    item_ids: np.ndarray, user_ids: Optional[np.ndarray],
                    user_map: Optional[IdMap], threshold: float, skip_bad: bool,
                    max_records: Optional[int], stats: ReadStats, catalogue: str) -> None:
    """Streams a ratings file into ``writer`` (vectorised per chunk)."""
    names = ["user_id", "item_id", "rating", "timestamp"]
    for chunk in iter_line_chunks(path, encoding="latin-1"):
        if max_records is not None and stats.rows >= max_records:
            break
        if header is not None and chunk.line_no[0] == 1:
            if chunk.lines[0].as_py().strip() != header:
                raise DataError(path, "line 1", None, f"expected the header {header!r}")
            chunk = LineChunk(chunk.lines.slice(1), chunk.line_no[1:])
        checker = line_checker(path, chunk, skip_bad, stats)
        f = split_fields(chunk, sep, names, checker)
        u_raw = parse_int(f["user_id"], "user_id", checker)
        i_raw = parse_int(f["item_id"], "item_id", checker)
        rating = parse_float(f["rating"], "rating", checker)
        ts = parse_int(f["timestamp"], "timestamp", checker)
        ok = ~checker.bad
        checker.fail(ok & (ts < 0), "timestamp", lambda i: f"negative timestamp {ts[i]}")
        checker.fail(ok & ~(np.isfinite(rating) & (rating >= 0)), "rating",
                     lambda i: f"rating must be >= 0, got {rating[i]}")
        item = sorted_lookup(item_ids, i_raw)
        checker.fail(~checker.bad & (item < 0), "item_id",
                     lambda i: f"movie id {i_raw[i]} is not in {catalogue}")
        if user_ids is not None:
            user = sorted_lookup(user_ids, u_raw)
            checker.fail(~checker.bad & (user < 0), "user_id",
                         lambda i: f"user id {u_raw[i]} is not in the users file")
        keep = np.flatnonzero(checker.keep())
        keep = keep[: truncate(stats.rows, len(keep), max_records)]
        if user_ids is None:
            assert user_map is not None
            user = user_map.add(pa.array(u_raw[keep]))
        else:
            user = user[keep]
        label = (rating[keep] >= threshold).astype(np.int8)
        writer.add_interactions({
            "user_id": user, "item_id": item[keep], "scenario": SCENARIO,
            "timestamp": ts[keep], "label": label, "actions": rating_actions(label),
            "duration": np.zeros(len(keep), np.float32),
        })
        stats.rows += len(keep)


def _user_attrs(gender: np.ndarray, age: np.ndarray, occupation: np.ndarray,
                occupation_names: Optional[List[str]] = None
                ) -> Tuple[Dict[str, np.ndarray], Dict[str, List[str]]]:
    genders = sorted(set(gender.tolist()))
    g_index = {g: k for k, g in enumerate(genders)}
    attrs = {
        "attr_age": np.searchsorted(AGE_EDGES, age, side="right").astype(np.int64),
        "attr_gender": np.array([g_index[g] for g in gender.tolist()], np.int64),
    }
    values = {"attr_age": AGE_BUCKETS, "attr_gender": genders}
    if occupation_names is None:
        occs = sorted(set(occupation.tolist()))
        o_index = {o: k for k, o in enumerate(occs)}
        attrs["attr_occupation"] = np.array([o_index[o] for o in occupation.tolist()], np.int64)
        values["attr_occupation"] = occs
    else:
        attrs["attr_occupation"] = occupation.astype(np.int64)
        values["attr_occupation"] = occupation_names
    return attrs, values


def _writer(out: str, name: str, src: str, fmt: str, threshold: float, overwrite: bool,
            user_attrs: Optional[Dict[str, int]]) -> DatasetWriter:
    return DatasetWriter(
        out, name, scenarios=[SCENARIO], actions=RATING_ACTIONS, user_attrs=user_attrs,
        source={"importer": fmt, "src": os.path.abspath(src), "label_threshold": threshold,
                "label": f"rating >= {threshold}"},
        overwrite=overwrite,
    )


# --------------------------------------------------------------------------- 100K


def import_movielens_100k(src: str, out: str, *, skip_bad: bool = False,
                          max_records: Optional[int] = None, label_threshold: float = 4.0,
                          overwrite: bool = False) -> ImportResult:
    """Imports MovieLens 100K (``u.data``, ``u.item``, ``u.user``; ``u.genre`` optional).

    Args:
        src: the ``ml-100k`` directory.
        out: dataset directory to create.
        skip_bad: drop and count bad records instead of raising DataError.
        max_records: import at most this many ratings.
        label_threshold: ``label = rating >= label_threshold``.
        overwrite: replace an existing dataset at ``out``.
    """
    data_p, item_p, user_p = _require(src, "u.data", "u.item", "u.user")
    stats = ReadStats()
    genres = GENRES_100K
    genre_p = os.path.join(src, "u.genre")
    if os.path.isfile(genre_p):
        with open(genre_p, encoding="latin-1") as f:
            genres = [ln.split("|")[0] for ln in f.read().splitlines() if ln.strip()]
    base = ["movie_id", "title", "release_date", "video_release_date", "imdb_url"]
    gcols = [f"genre:{g}" for g in genres]
    items, item_lines = _read_pipe_catalogue(item_p, "|", base + gcols, "latin-1", skip_bad,
                                             stats, ["movie_id"] + gcols)
    item_ids, item_rows = _dedup_catalogue(item_p, items["movie_id"], item_lines,
                                           skip_bad, stats, "movie_id")
    flags = np.stack([items[g] for g in gcols], 1) if gcols else np.zeros((0, 0))
    texts = [_movie_text(items["title"][r], [g for g, b in zip(genres, flags[r]) if b])
             for r in item_rows]

    users, user_lines = _read_pipe_catalogue(
        user_p, "|", ["user_id", "age", "gender", "occupation", "zip"], "latin-1", skip_bad,
        stats, ["user_id", "age"])
    user_ids, user_rows = _dedup_catalogue(user_p, users["user_id"], user_lines,
                                           skip_bad, stats, "user_id")
    attrs, values = _user_attrs(users["gender"][user_rows], users["age"][user_rows],
                                users["occupation"][user_rows])

    with _writer(out, "movielens-100k", src, "movielens-100k", label_threshold, overwrite,
                 {k: len(values[k]) for k in attrs}) as w:
        _import_ratings(data_p, "\t", None, w, item_ids, user_ids, None, label_threshold,
                        skip_bad, max_records, stats, "u.item")
        w.set_items({"raw_id": item_ids.astype(str), "text": pa.array(texts, pa.string())})
        w.set_users({"raw_id": user_ids.astype(str), **attrs})
        w.source.update(user_attr_values=values, id_order="sorted raw ids",
                        **finish_stats(stats, src))
    return ImportResult(w.meta, stats)


# --------------------------------------------------------------------------- 1M


def import_movielens_1m(src: str, out: str, *, skip_bad: bool = False,
                        max_records: Optional[int] = None, label_threshold: float = 4.0,
                        overwrite: bool = False) -> ImportResult:
    """Imports MovieLens 1M (``ratings.dat``, ``movies.dat``, ``users.dat``; ``::``
    separated, latin-1). Arguments as :func:`import_movielens_100k`."""
    rat_p, mov_p, usr_p = _require(src, "ratings.dat", "movies.dat", "users.dat")
    stats = ReadStats()
    movies, mlines = _read_pipe_catalogue(mov_p, "::", ["movie_id", "title", "genres"],
                                          "latin-1", skip_bad, stats, ["movie_id"])
    item_ids, item_rows = _dedup_catalogue(mov_p, movies["movie_id"], mlines, skip_bad,
                                           stats, "movie_id")
    texts = [_movie_text(movies["title"][r], movies["genres"][r].split("|"))
             for r in item_rows]
    users, ulines = _read_pipe_catalogue(
        usr_p, "::", ["user_id", "gender", "age", "occupation", "zip"], "latin-1", skip_bad,
        stats, ["user_id", "age", "occupation"])
    checker = RowChecker(usr_p, len(ulines), lambda i: f"line {ulines[i]}", skip_bad, stats)
    occ = users["occupation"]
    checker.fail((occ < 0) | (occ >= len(OCCUPATIONS_1M)), "occupation",
                 lambda i: f"occupation code {occ[i]} not in 0..{len(OCCUPATIONS_1M) - 1}")
    keep = checker.keep()
    users = {k: v[keep] for k, v in users.items()}
    user_ids, user_rows = _dedup_catalogue(usr_p, users["user_id"], ulines[keep],
                                           skip_bad, stats, "user_id")
    attrs, values = _user_attrs(users["gender"][user_rows], users["age"][user_rows],
                                users["occupation"][user_rows], OCCUPATIONS_1M)
    with _writer(out, "movielens-1m", src, "movielens-1m", label_threshold, overwrite,
                 {k: len(values[k]) for k in attrs}) as w:
        _import_ratings(rat_p, "::", None, w, item_ids, user_ids, None, label_threshold,
                        skip_bad, max_records, stats, "movies.dat")
        w.set_items({"raw_id": item_ids.astype(str), "text": pa.array(texts, pa.string())})
        w.set_users({"raw_id": user_ids.astype(str), **attrs})
        w.source.update(user_attr_values=values, id_order="sorted raw ids",
                        **finish_stats(stats, src))
    return ImportResult(w.meta, stats)


# --------------------------------------------------------------------------- latest


def _read_csv_rows(path: str, header: List[str], skip_bad: bool, stats: ReadStats):
    """Yields (line number, row) of a quoted CSV file with the given header
    (Python's csv module: exact line numbers; used for the catalogue-sized files)."""
    stream, _ = open_binary(path)
    with io.TextIOWrapper(stream, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        first = next(reader, None)
        if first is None or [h.strip() for h in first[: len(header)]] != header:
            raise DataError(path, "line 1", None, f"expected the header {','.join(header)}")
        start = reader.line_num + 1
        for row in reader:
            line = start
            start = reader.line_num + 1
            if not row:
                continue
            if len(row) != len(header):
                err = DataError(path, f"line {line}", header[min(len(row), len(header) - 1)],
                                f"expected {len(header)} fields, got {len(row)}")
                if not skip_bad:
                    raise err
                stats.add_bad(err, 1)
                stats.bad_rows += 1
                continue
            yield line, row


def _csv_int(path: str, line: int, field: str, value: str, skip_bad: bool,
             stats: ReadStats) -> Optional[int]:
    try:
        return int(value)
    except ValueError:
        err = DataError(path, f"line {line}", field, f"expected an integer, got {value!r}")
        if not skip_bad:
            raise err from None
        stats.add_bad(err, 1)
        stats.bad_rows += 1
        return None


def import_movielens_latest(src: str, out: str, *, skip_bad: bool = False,
                            max_records: Optional[int] = None, label_threshold: float = 4.0,
                            overwrite: bool = False, max_tags: int = 10) -> ImportResult:
    """Imports the CSV MovieLens releases (ml-latest, ml-latest-small, ml-20m/25m/32m):
    ``ratings.csv``, ``movies.csv`` and, if present, ``tags.csv``.

    Args:
        max_tags: most frequent tags per movie added to its text.
        others: as :func:`import_movielens_100k`.
    """
    rat_p, mov_p = _require(src, "ratings.csv", "movies.csv")
    tag_p = os.path.join(src, "tags.csv")
    stats = ReadStats()
    raw_ids: List[int] = []
    titles: List[str] = []
    genres: List[str] = []
    lines: List[int] = []
    for line, (mid, title, g) in _read_csv_rows(mov_p, ["movieId", "title", "genres"],
                                                 skip_bad, stats):
        m = _csv_int(mov_p, line, "movieId", mid, skip_bad, stats)
        if m is None:
            continue
        raw_ids.append(m)
        titles.append(title)
        genres.append(g)
        lines.append(line)
    item_ids, item_rows = _dedup_catalogue(mov_p, np.array(raw_ids, np.int64),
                                           np.array(lines, np.int64), skip_bad, stats,
                                           "movieId")
    tags: Dict[int, Counter] = defaultdict(Counter)
    if os.path.isfile(tag_p):
        for line, (_, mid, tag, _) in _read_csv_rows(
                tag_p, ["userId", "movieId", "tag", "timestamp"], skip_bad, stats):
            m = _csv_int(tag_p, line, "movieId", mid, skip_bad, stats)
            if m is not None and tag.strip():
                tags[m][tag.strip().lower()] += 1
    texts = []
    for r in item_rows:
        top = [t for t, _ in sorted(tags[raw_ids[r]].items(), key=lambda kv: (-kv[1], kv[0]))]
        texts.append(_movie_text(titles[r], genres[r].split("|"), top[:max_tags]))
    user_map = IdMap()
    with _writer(out, "movielens-latest", src, "movielens-latest", label_threshold,
                 overwrite, None) as w:
        _import_ratings(rat_p, ",", "userId,movieId,rating,timestamp", w, item_ids, None,
                        user_map, label_threshold, skip_bad, max_records, stats, "movies.csv")
        w.set_items({"raw_id": item_ids.astype(str), "text": pa.array(texts, pa.string())})
        w.set_users({"raw_id": pa.array(user_map.raw_ids(), pa.string())})
        w.source.update(id_order="items: sorted raw ids; users: first appearance",
                        tags=os.path.isfile(tag_p), **finish_stats(stats, src))
    return ImportResult(w.meta, stats)
