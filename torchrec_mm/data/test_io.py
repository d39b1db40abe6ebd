import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from torchrec_mm.data.io import (
    DatasetWriter,
    ReadStats,
    iter_interactions,
    load_interaction_columns,
    load_items,
    load_meta,
    load_users,
    validate_dataset,
)
from torchrec_mm.data.schema import INTERACTION_SCHEMA, DataError

SCEN = ["homefeed", "search", "ads"]
ACTIONS = ["is_click", "is_like"]


def _random_batch(rng, n, num_users=40, num_items=60):
    label = rng.integers(0, 2, n)
    return {
        "user_id": rng.integers(0, num_users, n),
        "item_id": rng.integers(0, num_items, n),
        "scenario": rng.choice(SCEN, n),
        "timestamp": rng.integers(0, 10**9, n),
        "label": label,
        "actions": label | (rng.integers(0, 2, n) << 1),
        "duration": rng.random(n).astype(np.float32) * 30,
    }


def _write(out, batches, rows_per_part=1 << 20, **kw):
    with DatasetWriter(out, "test", SCEN, ACTIONS, rows_per_part=rows_per_part, **kw) as w:
        for b in batches:
            w.add_interactions(b)
        w.set_items({"raw_id": [f"i{k}" for k in range(60)],
                     "text": [f"item number {k}" for k in range(60)]})
        w.set_users({"user_id": np.arange(40)[::-1].copy(),
                     "attr_age": np.arange(40)[::-1] % 3})
    return w.meta


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    batches = [_random_batch(rng, n) for n in (500, 1, 700)]
    out = str(tmp_path / "ds")
    meta = _write(out, batches, rows_per_part=300)
    assert not os.path.exists(out + ".partial")
    assert meta.num_interactions == 1201 and meta.num_items == 60 and meta.num_users == 40
    assert meta.user_attrs == {"attr_age": 3}
    assert load_meta(out).scenarios == SCEN

    parts = sorted(os.listdir(os.path.join(out, "interactions")))
    assert parts == [f"part-{k:05d}.parquet" for k in range(5)]  # 300,300,300,300,1
    for p in parts:
        t = pq.read_table(os.path.join(out, "interactions", p))
        assert t.schema.equals(INTERACTION_SCHEMA)
        key = t.column("user_id").to_numpy() * 10**10 + t.column("timestamp").to_numpy()
        assert (np.diff(key) >= 0).all()  # each part sorted by (user, timestamp)

    ref = {k: np.concatenate([np.asarray(b[k]) for b in batches]) for k in batches[0]}
    cols = load_interaction_columns(out, sort_by_user_time=True)
    assert cols["scenario"].dtype == np.int16 and cols["label"].dtype == np.int8
    assert cols["duration"].dtype == np.float32
    order = np.lexsort((ref["timestamp"], ref["user_id"]))
    for k in ("user_id", "item_id", "timestamp", "label", "actions"):
        np.testing.assert_array_equal(cols[k], ref[k][order])
    np.testing.assert_array_equal(np.array(SCEN)[cols["scenario"]], ref["scenario"][order])
    np.testing.assert_allclose(cols["duration"], ref["duration"][order])

    reader = iter_interactions(out, columns=["item_id", "scenario"], batch_size=128)
    batches_out = list(reader)
    assert all(b.num_rows <= 128 for b in batches_out)
    assert batches_out[0].schema.names == ["item_id", "scenario"]
    assert batches_out[0].schema.field("scenario").type == pa.string()
    assert reader.stats.rows == 1201 and reader.stats.bad_rows == 0

    items = load_items(out)
    assert items.column("item_id").to_pylist() == list(range(60))
    assert items.column("text")[5].as_py() == "item number 5"
    users = load_users(out)
    assert users.column("user_id").to_pylist() == list(range(40))
    # user 0 was the last row given, with attr (39 % 3)
    assert users.column("attr_age")[0].as_py() == 39 % 3

    stats = validate_dataset(out)
    assert stats.num_interactions == 1201
    assert sum(stats.scenario_counts.values()) == 1201
    assert stats.ctr == pytest.approx(ref["label"].mean())
    assert stats.action_rates["is_like"] == pytest.approx(((ref["actions"] >> 1) & 1).mean())
    assert stats.unsorted_parts == 0


def test_default_items_users_and_integer_scenarios(tmp_path):
    out = str(tmp_path / "ds")
    with DatasetWriter(out, "t", SCEN, ["is_click"]) as w:
        w.add_interactions({"user_id": [0, 3], "item_id": [4, 1], "scenario": [2, 0],
                            "timestamp": [5, 6], "label": [True, False]})
    meta = load_meta(out)
    assert (meta.num_users, meta.num_items) == (4, 5)
    cols = load_interaction_columns(out)
    assert cols["scenario"].tolist() == [2, 0] and cols["actions"].tolist() == [0, 0]
    assert load_items(out).column("text").to_pylist() == [""] * 5


@pytest.mark.parametrize("bad, field, fragment", [
    ({"scenario": "video"}, "scenario", "unknown scenario"),
    ({"timestamp": -1}, "timestamp", "negative"),
    ({"label": 2}, "label", "0 or 1"),
    ({"actions": 4}, "actions", "bit"),
    ({"item_id": 1.5}, "item_id", "integers"),
])
def test_writer_rejects_bad_values(tmp_path, bad, field, fragment):
    out = str(tmp_path / "ds")
    row = {"user_id": [0], "item_id": [0], "scenario": ["homefeed"], "timestamp": [1],
           "label": [1], "actions": [1]}
    row.update({k: [v] for k, v in bad.items()})
    with pytest.raises(DataError) as e:
        with DatasetWriter(out, "t", SCEN, ACTIONS) as w:
            w.add_interactions(row)
    assert e.value.field == field and fragment in str(e.value)
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")


def test_crash_mid_write_leaves_nothing(tmp_path):
    rng = np.random.default_rng(1)
    out = str(tmp_path / "ds")
    with pytest.raises(RuntimeError, match="boom"):
        with DatasetWriter(out, "t", SCEN, ACTIONS, rows_per_part=100) as w:
            w.add_interactions(_random_batch(rng, 350))  # 3 parts already on disk
            assert len(os.listdir(w.path("interactions"))) == 3
            raise RuntimeError("boom")
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")

    # an existing dataset survives a failed overwrite untouched
    _write(out, [_random_batch(rng, 50)])
    before = pq.read_table(os.path.join(out, "interactions", "part-00000.parquet"))
    with pytest.raises(RuntimeError):
        with DatasetWriter(out, "t", SCEN, ACTIONS, overwrite=True) as w:
            w.add_interactions(_random_batch(rng, 80))
            raise RuntimeError("boom")
    after = pq.read_table(os.path.join(out, "interactions", "part-00000.parquet"))
    assert before.equals(after) and load_meta(out).num_interactions == 50


def test_stale_partial_is_not_a_dataset_and_is_replaced(tmp_path):
    out = str(tmp_path / "ds")
    os.makedirs(out + ".partial/interactions")  # e.g. a killed process
    with pytest.raises(FileNotFoundError):
        load_meta(out)
    _write(out, [_random_batch(np.random.default_rng(2), 10)])
    assert load_meta(out).num_interactions == 10
    assert not os.path.exists(out + ".partial")


def test_overwrite_rules(tmp_path):
    rng = np.random.default_rng(3)
    out = str(tmp_path / "ds")
    _write(out, [_random_batch(rng, 10)])
    with pytest.raises(FileExistsError, match="overwrite"):
        DatasetWriter(out, "t", SCEN, ACTIONS)
    _write(out, [_random_batch(rng, 20)], overwrite=True)
    assert load_meta(out).num_interactions == 20
    assert not [p for p in os.listdir(tmp_path) if ".old-" in p]
    other = tmp_path / "notadataset"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a torchrec-mm dataset"):
        DatasetWriter(str(other), "t", SCEN, ACTIONS, overwrite=True)
    assert (other / "precious.txt").read_text() == "keep me"


# --------------------------------------------------------------------------- bad files


def _good_dataset(tmp_path, n=200):
    out = str(tmp_path / "ds")
    _write(out, [_random_batch(np.random.default_rng(4), n)])
    return out


def _rewrite_part(out, fn):
    path = os.path.join(out, "interactions", "part-00000.parquet")
    table = pq.read_table(path)
    pq.write_table(fn(table), path)
    return path


def _set(table, name, values, type_=None):
    i = table.schema.get_field_index(name)
    arr = pa.array(values, type_ or table.schema.field(name).type)
    return table.set_column(i, pa.field(name, arr.type), arr)


def _with_value(name, row, value, type_=None):
    def fn(table):
        vals = table.column(name).to_pylist()
        vals[row] = value
        return _set(table, name, vals, type_)
    return fn


@pytest.mark.parametrize("name, value, fragment", [
    ("scenario", "video", "unknown scenario 'video'"),
    ("timestamp", -5, "negative timestamp"),
    ("item_id", 60, "out of range [0, 60)"),
    ("user_id", -1, "negative user id"),
    ("label", 3, "label must be 0 or 1"),
    ("actions", 8, "sets a bit"),
    ("duration", float("nan"), "duration"),
    ("item_id", None, "null value"),
])
def test_bad_rows_raise_or_are_counted(tmp_path, name, value, fragment):
    out = _good_dataset(tmp_path)
    path = _rewrite_part(out, _with_value(name, 17, value))
    with pytest.raises(DataError) as e:
        load_interaction_columns(out)
    err = e.value
    assert err.path == path and err.record == 17 and err.field == name
    assert fragment in str(err)
    assert "part-00000.parquet: record 17, field" in str(err)

    stats = ReadStats()
    cols = load_interaction_columns(out, skip_bad=True, stats=stats)
    assert len(cols["user_id"]) == 199
    assert stats.bad_rows == 1 and stats.bad_by_field == {name: 1}
    reader = iter_interactions(out, skip_bad=True, batch_size=50)
    assert sum(b.num_rows for b in reader) == 199 and reader.stats.bad_rows == 1
    v = validate_dataset(out, skip_bad=True)
    assert v.num_interactions == 199 and v.read.bad_rows == 1


def test_missing_column_and_wrong_type(tmp_path):
    out = _good_dataset(tmp_path)
    path = _rewrite_part(out, lambda t: t.drop_columns(["timestamp"]))
    for skip_bad in (False, True):  # file-level problems always raise
        with pytest.raises(DataError) as e:
            load_interaction_columns(out, skip_bad=skip_bad)
        assert e.value.path == path and e.value.field == "timestamp"
        assert "missing column" in str(e.value)

    out2 = _good_dataset(tmp_path / "b")
    _rewrite_part(out2, lambda t: _set(t, "item_id", [str(x) for x in t.column("item_id")
                                                      .to_pylist()], pa.string()))
    with pytest.raises(DataError) as e:
        list(iter_interactions(out2))
    assert e.value.field == "item_id" and "expected int64, got string" in str(e.value)

    # narrower integer types are fine
    out3 = _good_dataset(tmp_path / "c")
    _rewrite_part(out3, lambda t: _set(t, "item_id", t.column("item_id").to_pylist(),
                                       pa.int32()))
    assert load_interaction_columns(out3)["item_id"].dtype == np.int64


def test_meta_and_items_validation(tmp_path):
    out = _good_dataset(tmp_path)
    meta_path = os.path.join(out, "meta.json")
    raw = json.load(open(meta_path))
    raw["num_interactions"] = 999
    json.dump(raw, open(meta_path, "w"))
    with pytest.raises(DataError, match="num_interactions"):
        validate_dataset(out)

    out2 = _good_dataset(tmp_path / "b")
    items_path = os.path.join(out2, "items.parquet")
    t = pq.read_table(items_path)
    pq.write_table(t.take(pa.array([1, 0] + list(range(2, 60)))), items_path)
    with pytest.raises(DataError) as e:
        load_items(out2)
    assert e.value.record == 0 and e.value.field == "item_id"

    with pytest.raises(FileNotFoundError, match="not a torchrec-mm dataset"):
        load_meta(str(tmp_path / "nothing"))
