"""Importers on small generated files in the real formats (never the real data, except
the optional check on a local MovieLens 100K copy at the end)."""

import gzip
import json
import os

import numpy as np
import pytest

from torchrec_mm.data.importers import import_dataset
from torchrec_mm.data.io import load_interaction_columns, load_items, load_users, validate_dataset
from torchrec_mm.data.schema import DataError

# --------------------------------------------------------------------------- MovieLens


def _ml100k(d, ratings=None, extra_data_lines=()):
    d.mkdir(parents=True, exist_ok=True)
    genres = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
              "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
              "Romance", "Sci-Fi", "Thriller", "War", "Western"]
    (d / "u.genre").write_text("".join(f"{g}|{k}\n" for k, g in enumerate(genres)) + "\n")
    titles = {1: "Toy Story (1995)", 2: "GoldenEye (1995)", 5: "Café Society (1995)"}
    flags = {1: [3, 4, 5], 2: [1, 2, 16], 5: [0]}
    lines = []
    for mid, title in titles.items():
        g = ["1" if k in flags[mid] else "0" for k in range(19)]
        lines.append(f"{mid}|{title}|01-Jan-1995||http://x|" + "|".join(g))
    (d / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    (d / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n"
                              "7|17|M|student|55105\n")
    ratings = ratings if ratings is not None else [
        (2, 5, 4, 881250950), (1, 1, 5, 881250949), (1, 2, 3, 881250900),
        (7, 1, 1, 881250999), (2, 1, 4, 881250800),
    ]
    text = "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ratings)
    text += "".join(x + "\n" for x in extra_data_lines)
    (d / "u.data").write_text(text)
    return d


def test_movielens_100k(tmp_path):
    src = _ml100k(tmp_path / "ml-100k")
    out = str(tmp_path / "ds")
    res = import_dataset("movielens-100k", str(src), out)
    m = res.meta
    assert (m.num_users, m.num_items, m.num_interactions) == (3, 3, 5)
    assert m.scenarios == ["homefeed"] and m.actions == ["is_click", "rated"]
    assert m.user_attrs == {"attr_age": 7, "attr_gender": 2, "attr_occupation": 3}
    items = load_items(out)
    assert items.column("raw_id").to_pylist() == ["1", "2", "5"]  # sorted raw ids
    assert items.column("text")[0].as_py() == \
        "Toy Story (1995). Genres: Animation, Children's, Comedy."
    assert items.column("text")[2].as_py() == "Café Society (1995)."  # latin-1, 'unknown'
    users = load_users(out)
    assert users.column("raw_id").to_pylist() == ["1", "2", "7"]
    assert users.column("attr_age").to_pylist() == [1, 5, 0]  # 18-24, 50-55, under 18
    assert users.column("attr_gender").to_pylist() == [1, 0, 1]  # F=0, M=1
    assert users.column("attr_occupation").to_pylist() == [2, 0, 1]  # other, student, tech.
    cols = load_interaction_columns(out, sort_by_user_time=True)
    # user 1 (dense 0): (item 2, r3, t900), (item 1, r5, t949)
    assert cols["user_id"].tolist() == [0, 0, 1, 1, 2]
    assert cols["item_id"].tolist() == [1, 0, 0, 2, 0]
    assert cols["label"].tolist() == [0, 1, 1, 1, 0]
    assert cols["actions"].tolist() == [2, 3, 3, 3, 2]
    assert (cols["duration"] == 0).all() and (cols["scenario"] == 0).all()
    assert cols["timestamp"].tolist() == [881250900, 881250949, 881250800, 881250950, 881250999]
    assert validate_dataset(out).ctr == pytest.approx(3 / 5)

    out2 = str(tmp_path / "ds2")
    m2 = import_dataset("movielens-100k", str(src), out2, label_threshold=5,
                        max_records=3).meta
    assert m2.num_interactions == 3
    assert load_interaction_columns(out2)["label"].sum() == 1


@pytest.mark.parametrize("line, field, fragment", [
    ("1\t1\tfive\t881250949", "rating", "expected a number, got 'five'"),
    ("1\t1\t4", "timestamp", "expected 4 fields"),
    ("1\t99\t4\t881250949", "item_id", "movie id 99 is not in u.item"),
    ("3\t1\t4\t881250949", "user_id", "user id 3 is not in the users file"),
    ("1\t1\t4\t-5", "timestamp", "negative timestamp"),
])
def test_movielens_bad_records(tmp_path, line, field, fragment):
    src = _ml100k(tmp_path / "ml", extra_data_lines=["", line, "2\t2\t4\t881250950"])
    out = str(tmp_path / "ds")
    with pytest.raises(DataError) as e:
        import_dataset("movielens-100k", str(src), out)
    err = e.value
    assert err.path.endswith("u.data") and err.record == "line 7" and err.field == field
    assert fragment in str(err)
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")

    res = import_dataset("movielens-100k", str(src), out, skip_bad=True)
    assert res.meta.num_interactions == 6 and res.stats.bad_rows == 1
    assert res.stats.bad_by_field == {field: 1}
    assert res.meta.source["bad_records"] == 1


def test_movielens_1m(tmp_path):
    d = tmp_path / "ml-1m"
    d.mkdir()
    (d / "movies.dat").write_bytes(
        "1::Toy Story (1995)::Animation|Children's|Comedy\n"
        "10::Amélie (2001)::Comedy|Romance\n".encode("latin-1"))
    (d / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    (d / "ratings.dat").write_text("1::10::5::978300760\n1::1::3::978302109\n"
                                   "2::1::4::978301968\n")
    out = str(tmp_path / "ds")
    m = import_dataset("movielens-1m", str(d), out).meta
    assert (m.num_users, m.num_items, m.num_interactions) == (2, 2, 3)
    items = load_items(out)
    assert items.column("text")[1].as_py() == "Amélie (2001). Genres: Comedy, Romance."
    users = load_users(out)
    assert users.column("attr_age").to_pylist() == [0, 6]
    assert users.column("attr_occupation").to_pylist() == [10, 16]
    assert m.source["user_attr_values"]["attr_occupation"][10] == "K-12 student"
    cols = load_interaction_columns(out, sort_by_user_time=True)
    assert cols["item_id"].tolist() == [1, 0, 0] and cols["label"].tolist() == [1, 0, 1]


def test_movielens_latest_with_tags(tmp_path):
    d = tmp_path / "ml-latest-small"
    d.mkdir()
    (d / "movies.csv").write_text(
        'movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n'
        '11,"American President, The (1995)",Comedy|Drama|Romance\n'
        '20,Unrated (2000),(no genres listed)\n')
    (d / "tags.csv").write_text(
        "userId,movieId,tag,timestamp\n1,1,pixar,1\n2,1,Pixar,2\n3,1,fun,3\n"
        '4,11,"politics, romance",4\n')
    (d / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n5,1,4.5,964982703\n5,11,3.5,964981247\n"
        "9,1,4.0,964982224\n")
    out = str(tmp_path / "ds")
    m = import_dataset("movielens-latest", str(d), out).meta
    assert (m.num_users, m.num_items, m.num_interactions) == (2, 3, 3)
    texts = load_items(out).column("text").to_pylist()
    assert texts[0] == "Toy Story (1995). Genres: Adventure, Animation. Tags: pixar, fun."
    assert texts[1] == ("American President, The (1995). Genres: Comedy, Drama, Romance. "
                        "Tags: politics, romance.")
    assert texts[2] == "Unrated (2000)."
    assert load_users(out).column("raw_id").to_pylist() == ["5", "9"]
    assert load_interaction_columns(out, sort_by_user_time=True)["label"].tolist() == [0, 1, 1]

    (d / "ratings.csv").write_text("user,movie,rating,time\n5,1,4.5,964982703\n")
    with pytest.raises(DataError, match="line 1.*header"):
        import_dataset("movielens-latest", str(d), str(tmp_path / "ds2"))


# --------------------------------------------------------------------------- Amazon


def _reviews(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


REVIEWS = [
    {"overall": 5.0, "verified": True, "reviewerID": "A2", "asin": "B01",
     "unixReviewTime": 1500000000, "style": {"Format:": " Paperback"}, "reviewText": "great"},
    {"overall": 2.0, "reviewerID": "A1", "asin": "B02", "unixReviewTime": 1500000100},
    {"overall": 4, "reviewerID": "A2", "asin": "B02", "unixReviewTime": 1400000000},
]


def test_amazon2018(tmp_path):
    src = tmp_path / "Books_5.json.gz"
    with gzip.open(src, "wt") as f:
        f.write(_reviews(REVIEWS))
    meta = tmp_path / "meta_Books.json"
    meta.write_text(_reviews([
        {"asin": "B99", "title": "Not reviewed"},
        {"asin": "B02", "title": "Salt &amp; Pepper", "brand": "Acme",
         "category": ["Books", "Cooking"], "description": ["<b>Tasty</b> recipes", "for all"],
         "feature": ["hardcover"]},
    ]) + "{broken json for an unreviewed item B77\n")
    out = str(tmp_path / "ds")
    m = import_dataset("amazon2018", str(src), out, meta_path=str(meta)).meta
    assert (m.num_users, m.num_items, m.num_interactions) == (2, 2, 3)
    items = load_items(out)
    assert items.column("raw_id").to_pylist() == ["B01", "B02"]  # first appearance
    assert items.column("text").to_pylist() == [
        "", "Salt & Pepper. Brand: Acme. Category: Books > Cooking. hardcover. "
        "Tasty recipes for all"]
    assert load_users(out).column("raw_id").to_pylist() == ["A2", "A1"]
    cols = load_interaction_columns(out, sort_by_user_time=True)
    assert cols["user_id"].tolist() == [0, 0, 1]
    assert cols["item_id"].tolist() == [1, 0, 1]
    assert cols["label"].tolist() == [1, 1, 0]
    assert m.source["items_with_text"] == 1


@pytest.mark.parametrize("line, field, fragment", [
    ('{"reviewerID": "A3", "asin": "B03", "overall": 5.0, "unixReviewTime": 1', "json",
     "malformed JSON"),
    ('{"reviewerID": "A3", "asin": "B03", "unixReviewTime": 1500000000}', "overall",
     "missing field"),
    ('{"reviewerID": "A3", "asin": "B03", "overall": "five", "unixReviewTime": 1}', "overall",
     "got str 'five'"),
    ('{"reviewerID": "A3", "asin": "B03", "overall": 3.0, "unixReviewTime": -7}',
     "unixReviewTime", "negative timestamp"),
    ('["not", "an", "object"]', "json", "expected a JSON object"),
])
def test_amazon_bad_records(tmp_path, line, field, fragment):
    src = tmp_path / "reviews.json"
    src.write_text(_reviews(REVIEWS[:2]) + line + "\n" + _reviews(REVIEWS[2:]))
    out = str(tmp_path / "ds")
    with pytest.raises(DataError) as e:
        import_dataset("amazon2018", str(src), out)
    assert e.value.record == "line 3" and e.value.field == field
    assert fragment in str(e.value) and str(src) in str(e.value)
    assert not os.path.exists(out)
    res = import_dataset("amazon2018", str(src), out, skip_bad=True)
    assert res.meta.num_interactions == 3 and res.stats.bad_rows == 1


# --------------------------------------------------------------------------- RED-MMU


def _event(item, ts, click=1, **kw):
    e = {"duration": 12, "is_click": click, "is_click_profile": 0, "is_collect": 0,
         "is_like": 0, "item_id": item, "page_key": 0, "timestamp": ts, "type": "note"}
    e.update(kw)
    return e


USERS = [
    {"user_id": "u-b", "data": {
        "homefeed_item_lastn": [_event("n2", 300, is_like=1), _event("n1", 100, click=0)],
        "ads_item_lastn": [_event("ad1", 200, is_collect=1)],
        "search_item_lastn": []}},
    {"user_id": "u-a",  # lists at the top level, a new scenario and a new flag
     "search_item_lastn": [_event("n1", 50, is_share=True)],
     "live_item_lastn": [_event("n3", 60, duration=1.5)]},
]


def test_redmmu_json_lines_and_items(tmp_path):
    src = tmp_path / "users.jsonl"
    src.write_text("".join(json.dumps(u) + "\n" for u in USERS))
    (tmp_path / "img").mkdir()
    items = tmp_path / "items.jsonl"
    items.write_text(
        json.dumps({"item_id": "n1", "title": "Pasta night", "text": "garlic and basil",
                    "tags": ["cooking", "dinner"], "image_path": "img/n1.jpg"}) + "\n"
        + json.dumps({"item_id": "zz", "title": "never seen"}) + "\n")
    out = str(tmp_path / "ds")
    m = import_dataset("redmmu", str(src), out, items_path=str(items)).meta
    assert m.scenarios == ["homefeed", "search", "ads", "live"]
    assert m.actions == ["is_click", "is_click_profile", "is_collect", "is_like", "is_share"]
    assert (m.num_users, m.num_items, m.num_interactions) == (2, 4, 5)
    it = load_items(out)
    assert it.column("raw_id").to_pylist() == ["n2", "n1", "ad1", "n3"]
    assert it.column("text")[1].as_py() == \
        "Pasta night. garlic and basil. Tags: cooking, dinner."
    assert it.column("image_path")[1].as_py() == str(tmp_path / "img" / "n1.jpg")
    assert it.column("text")[0].as_py() == "" and it.column("image_path")[0].as_py() is None
    assert load_users(out).column("raw_id").to_pylist() == ["u-b", "u-a"]
    c = load_interaction_columns(out, sort_by_user_time=True)
    # user u-b (0): n1@100 (no click), ad1@200 (collect), n2@300 (like); u-a (1): n1@50, n3@60
    assert c["user_id"].tolist() == [0, 0, 0, 1, 1]
    assert c["item_id"].tolist() == [1, 2, 0, 1, 3]
    assert c["scenario"].tolist() == [0, 2, 0, 1, 3]
    assert c["label"].tolist() == [0, 1, 1, 1, 1]
    bit = {a: 1 << k for k, a in enumerate(m.actions)}
    assert c["actions"].tolist() == [0, 1 | bit["is_collect"], 1 | bit["is_like"],
                                     1 | bit["is_share"], 1]
    assert c["duration"].tolist() == [12, 12, 12, 12, 1.5]


def test_redmmu_json_array_gz_matches_lines(tmp_path):
    lines = tmp_path / "users.jsonl"
    lines.write_text("".join(json.dumps(u) + "\n" for u in USERS))
    arr = tmp_path / "users.json.gz"
    with gzip.open(arr, "wt") as f:
        json.dump(USERS, f, indent=2)
    a = load_interaction_columns(import_dataset("redmmu", str(lines), str(tmp_path / "a"))
                                 and str(tmp_path / "a"))
    b = load_interaction_columns(import_dataset("redmmu", str(arr), str(tmp_path / "b"))
                                 and str(tmp_path / "b"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("bad_line, record, field, fragment", [
    ('{"user_id": "u-c", "data": {"homefeed_item_lastn": [', "line 2", "json",
     "malformed JSON"),
    (json.dumps({"user_id": "u-c", "data": {"homefeed_item_lastn": [
        _event("n5", 10), _event("n6", -3)]}}), "line 2, homefeed_item_lastn[1]", "timestamp",
     "negative timestamp"),
    (json.dumps({"user_id": "u-c", "data": {"ads_item_lastn": [_event("n5", 10, is_like=2)]}}),
     "line 2, ads_item_lastn[0]", "is_like", "must be 0 or 1"),
    (json.dumps({"user_id": "u-c", "data": {"ads_item_lastn": [{"timestamp": 5}]}}),
     "line 2, ads_item_lastn[0]", "item_id", "missing item_id"),
    (json.dumps({"user_id": "u-c", "data": {"ads_item_lastn": [_event("n5", "yesterday")]}}),
     "line 2, ads_item_lastn[0]", "timestamp", "expected an integer"),
    (json.dumps({"data": {"ads_item_lastn": []}}), "line 2", "user_id", "missing user_id"),
    (json.dumps({"user_id": "u-c", "data": {"homefeed": []}}), "line 2", "data",
     "no '<scenario>_item_lastn' lists"),
])
def test_redmmu_bad_records(tmp_path, bad_line, record, field, fragment):
    src = tmp_path / "users.jsonl"
    src.write_text(json.dumps(USERS[0]) + "\n" + bad_line + "\n" + json.dumps(USERS[1]) + "\n")
    out = str(tmp_path / "ds")
    with pytest.raises(DataError) as e:
        import_dataset("redmmu", str(src), out)
    assert e.value.record == record and e.value.field == field
    assert fragment in str(e.value)
    assert not os.path.exists(out)
    res = import_dataset("redmmu", str(src), out, skip_bad=True)
    assert res.stats.bad_rows == 1 and res.stats.bad_by_field == {field: 1}
    good_in_bad_line = 1 if "negative" in fragment else 0
    assert res.meta.num_interactions == 5 + good_in_bad_line


def test_redmmu_malformed_array_element(tmp_path):
    src = tmp_path / "users.json"
    src.write_text('[\n' + json.dumps(USERS[0]) + ',\n{"user_id": "x", "data": }\n]\n')
    with pytest.raises(DataError) as e:
        import_dataset("redmmu", str(src), str(tmp_path / "ds"))
    assert e.value.record == "element 1 (line 3)" and "malformed JSON" in str(e.value)


def test_max_records_and_unknown_format(tmp_path):
    src = tmp_path / "users.jsonl"
    src.write_text("".join(json.dumps(u) + "\n" for u in USERS))
    m = import_dataset("redmmu", str(src), str(tmp_path / "ds"), max_records=2).meta
    assert m.num_interactions == 2
    with pytest.raises(ValueError, match="unknown format"):
        import_dataset("netflix", str(src), str(tmp_path / "x"))


# --------------------------------------------------------------------------- real data

ML100K = "/work/shared/data/ml-100k"


@pytest.mark.skipif(not os.path.isfile(os.path.join(ML100K, "u.data")),
                    reason="local MovieLens 100K copy not present")
def test_real_movielens_100k(tmp_path):
    out = str(tmp_path / "ml100k")
    m = import_dataset("movielens-100k", ML100K, out).meta
    assert (m.num_users, m.num_items, m.num_interactions) == (943, 1682, 100000)
    stats = validate_dataset(out)
    assert stats.ctr == pytest.approx(55375 / 100000)  # ratings 4 and 5


def test_json_fast_path_is_used_for_clean_chunks(tmp_path, monkeypatch):
    import torchrec_mm.data.importers as imp

    def fail(*a, **k):
        raise AssertionError("slow path used")

    monkeypatch.setattr(imp, "json_loads_lines", fail)
    src = tmp_path / "reviews.json"
    src.write_text(_reviews(REVIEWS) + "\n")
    assert import_dataset("amazon2018", str(src), str(tmp_path / "ds")).meta \
        .num_interactions == 3


@pytest.mark.parametrize("chunk_chars", [1, 3, 7, 64, 1 << 20])
def test_json_array_streaming_across_blocks(tmp_path, chunk_chars):
    from torchrec_mm.data.importers import iter_json_array

    objs = [{"a": i, "s": "x" * i + '\n"]'} for i in range(20)] + [12345678, -1.5e10, "s",
                                                                    [1, [2]], None, True]
    path = tmp_path / "a.json"
    path.write_text("  [\n" + ",\n  ".join(json.dumps(o) for o in objs) + "\n]\n")
    got = list(iter_json_array(str(path), chunk_chars=chunk_chars))
    assert [g[2] for g in got] == objs
    assert [g[0] for g in got] == list(range(len(objs)))
    assert [g[1] for g in got] == list(range(2, 2 + len(objs)))  # line of each element
    path.write_text("[1,\n2,\n{\"a\": }]")
    with pytest.raises(DataError, match=r"element 2 \(line 3\).*malformed JSON"):
        list(iter_json_array(str(path), chunk_chars=chunk_chars))
