"""One suite over the item-store backends (mmap = embedded default, sqlite, redis; the
redis cases are skipped only when redis-server is not installed)."""

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchrec_mm.data.schema import DataError
from torchrec_mm.serving import ItemStore, SchemaMismatchError, StoreSchema
from torchrec_mm.serving.backend import last_wins
from torchrec_mm.serving.mmap_backend import decode_blocks, encode_block, merge_index
from torchrec_mm.serving.testing import (
    SHARED,
    TEST_SCHEMA,
    RedisServer,
    batch_ids,
    check_records,
    record_values,
)

SCHEMA = StoreSchema.of(p=("float32", (3,)), z=("float16", (2, 4)), b=("bfloat16", (2,)),
                        vq=("int32", (5,), -1), flag=("bool", ()))


def _values(rng: np.random.Generator, n: int) -> Dict[str, np.ndarray]:
    return {"p": rng.standard_normal((n, 3)).astype(np.float32),
            "z": rng.standard_normal((n, 2, 4)).astype(np.float32),  # cast to float16
            "b": rng.standard_normal((n, 2)).astype(np.float32),     # cast to bfloat16
            "vq": rng.integers(-5, 1000, (n, 5)),
            "flag": rng.random(n) < 0.5}


def _stored(vals: Dict[str, np.ndarray], i: int) -> Dict[str, np.ndarray]:
    """What the store must give back for row ``i`` (float32 / int64, as ``get``)."""
    b = torch.from_numpy(vals["b"][i]).to(torch.bfloat16).float().numpy()
    return {"p": vals["p"][i], "z": vals["z"][i].astype(np.float16).astype(np.float32),
            "b": b, "vq": vals["vq"][i].astype(np.int64), "flag": vals["flag"][i]}


def _check_against(store: ItemStore, ref: Dict[int, tuple], query: np.ndarray) -> None:
    vals, found = store.get(torch.from_numpy(query))
    assert found.dtype == torch.bool and found.shape == query.shape
    assert vals["p"].dtype == torch.float32 and vals["vq"].dtype == torch.int64
    for pos, i in enumerate(query.tolist()):
        if i in ref:
            assert found[pos], f"id {i} lost"
            want, _ = ref[i]
            for f, a in want.items():
                np.testing.assert_array_equal(vals[f][pos].numpy(), a, err_msg=f"{i} {f}")
        else:
            assert not found[pos], f"id {i} appeared"
            assert (vals["vq"][pos] == -1).all() and (vals["p"][pos] == 0).all()
    assert len(store) == len(ref)
    assert store.ids().tolist() == sorted(ref)
    assert store.versions(query) == [ref[i][1] if i in ref else None for i in query.tolist()]


# ------------------------------------------------------------ property: vs a dict

ID_POOL = [0, 1, 2, 3, 5, 8, 13, 99, 1000, -7, 2**40, 2**63 - 1]
_ops = st.lists(st.tuples(st.sampled_from(["put", "put", "put", "delete"]),
                          st.lists(st.sampled_from(ID_POOL), min_size=0, max_size=9),
                          st.sampled_from(["m1", "m2", "modèle-3"])),
                min_size=1, max_size=6)


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_ops, seed=st.integers(0, 2**16),
       query=st.lists(st.sampled_from(ID_POOL + [4, 77, -1]), min_size=0, max_size=12))
def test_round_trip_matches_dict_reference(stores, ops, seed, query):
    rng = np.random.default_rng(seed)
    ref: Dict[int, tuple] = {}
    with stores.open(SCHEMA) as store:
        for op, ids, version in ops:
            if op == "put":
                vals = _values(rng, len(ids))
                assert store.put(np.array(ids, dtype=np.int64), vals, version) == len(set(ids))
                for i, x in enumerate(ids):  # later rows overwrite: last wins
                    ref[x] = (_stored(vals, i), version)
            else:
                n = store.delete(ids)
                assert n == len({x for x in ids if x in ref})
                for x in ids:
                    ref.pop(x, None)
        _check_against(store, ref, np.array(query + ID_POOL, dtype=np.int64))


def test_get_shapes_raw_version_and_fill(make_store):
    store = make_store(SCHEMA)
    rng = np.random.default_rng(0)
    vals = _values(rng, 4)
    store.put(torch.tensor([10, 11, 12, 10]), {k: torch.from_numpy(np.asarray(v))
                                               for k, v in vals.items()}, "a")
    out, found = store.get(torch.tensor([[10, 99], [12, 10]]), ["z", "vq"])
    assert set(out) == {"z", "vq"} and out["z"].shape == (2, 2, 2, 4)
    assert found.tolist() == [[True, False], [True, True]]
    np.testing.assert_array_equal(out["vq"][0, 0].numpy(), vals["vq"][3])  # last wins
    assert (out["vq"][0, 1] == -1).all() and (out["z"][0, 1] == 0).all()   # fills
    raw, _ = store.get([10, 12], raw=True)
    assert raw["z"].dtype == torch.float16 and raw["b"].dtype == torch.bfloat16
    assert raw["vq"].dtype == torch.int32 and raw["flag"].dtype == torch.bool
    store.put([12], {k: v[:1] for k, v in _values(rng, 1).items()}, "b")
    _, f_a = store.get([10, 11, 12, 13], ["p"], version="a")
    assert f_a.tolist() == [True, True, False, False]
    assert store.contains(torch.tensor([12, 13])).tolist() == [True, False]
    assert 12 in store and 13 not in store
    empty, f0 = store.get(torch.zeros(0, dtype=torch.long))
    assert f0.shape == (0,) and empty["z"].shape == (0, 2, 4)
    with pytest.raises(KeyError, match="unknown field 'nope'"):
        store.get([10], ["nope"])


# ------------------------------------------------------------------- schema checks

def test_schema_checked_on_open(stores):
    loc = stores.location()
    with stores.open(SCHEMA, loc) as s:
        s.put([1], {k: v for k, v in _values(np.random.default_rng(0), 1).items()}, "v")
    with stores.open(None, loc) as s:  # no schema given: the store's own
        assert s.schema == SCHEMA and len(s) == 1
    other = StoreSchema({**SCHEMA.fields, "p": SCHEMA["p"].__class__("float32", (4,))})
    with pytest.raises(SchemaMismatchError, match=r"field 'p' is float32\[3\] in the store, "
                                                  r"requested float32\[4\]"):
        stores.open(other, loc)
    with pytest.raises(SchemaMismatchError, match="field 'extra'"):
        stores.open(StoreSchema.of(**SCHEMA.fields, extra=("int8", (1,))), loc)
    missing_loc = stores.location()
    with pytest.raises(FileNotFoundError):
        stores.open(SCHEMA, missing_loc, create=False)
    with pytest.raises(ValueError, match="pass a schema"):
        stores.open(None, missing_loc)


def test_bad_puts_name_id_and_field_and_write_nothing(make_store):
    store = make_store(SCHEMA)
    rng = np.random.default_rng(1)
    ids = np.array([5, 42, 7])

    def vals(**over):
        v = _values(rng, 3)
        v.update(over)
        return v

    p = np.ones((3, 3), np.float32)
    p[1, 2] = np.nan
    with pytest.raises(DataError, match=r"record item 42, field 'p': NaN/Inf"):
        store.put(ids, vals(p=p), "v")
    z = np.zeros((3, 2, 4), np.float32)
    z[2, 0, 1] = np.inf
    with pytest.raises(DataError, match=r"item 7, field 'z': NaN/Inf"):
        store.put(ids, vals(z=torch.from_numpy(z)), "v")
    z[2, 0, 1] = 1e6  # finite in float32, overflows float16
    with pytest.raises(DataError, match=r"item 7, field 'z': value overflows float16"):
        store.put(ids, vals(z=z), "v")
    vq = np.zeros((3, 5), np.int64)
    vq[0, 0] = 2**40
    with pytest.raises(DataError, match=r"item 5, field 'vq': value outside the int32"):
        store.put(ids, vals(vq=vq), "v")
    with pytest.raises(DataError, match=r"field 'vq': expected integer values"):
        store.put(ids, vals(vq=np.zeros((3, 5), np.float32)), "v")
    with pytest.raises(DataError, match=r"field 'p': expected shape \[3, 3\]"):
        store.put(ids, vals(p=np.zeros((3, 4), np.float32)), "v")
    v = vals()
    del v["flag"]
    with pytest.raises(DataError, match=r"field 'flag': missing"):
        store.put(ids, v, "v")
    with pytest.raises(DataError, match=r"field 'bogus': unknown field"):
        store.put(ids, vals(bogus=np.zeros(3)), "v")
    with pytest.raises(ValueError, match="version must be a non-empty string"):
        store.put(ids, vals(), "")
    with pytest.raises(ValueError, match="expected integer item ids"):
        store.put(np.array([1.0, 2.0, 3.0]), vals(), "v")
    assert len(store) == 0 and not store.contains(ids).any()


def test_readonly_refuses_writes(stores):
    loc = stores.location()
    with stores.open(SCHEMA, loc) as s:
        s.put([3], _values(np.random.default_rng(0), 1), "v")
    with stores.open(None, loc, readonly=True) as ro:
        assert ro.get([3])[1].tolist() == [True]
        with pytest.raises(ValueError, match="read-only"):
            ro.put([4], _values(np.random.default_rng(0), 1), "v")


# ----------------------------------------------------- processes: writers and kills

def _writer(location: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "torchrec_mm.serving.testing", location,
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _read_all(store: ItemStore, ids: np.ndarray) -> int:
    """Checks every record of ``ids`` (values and versions read in one atomic get)."""
    vals, found, versions = store.backend.get(ids, TEST_SCHEMA.names, with_versions=True)
    return check_records(vals, found, versions, ids)


def _all_ids(batches: int, batch_size: int, shared: int) -> np.ndarray:
    return np.unique(np.concatenate([batch_ids(k, batch_size, shared) for k in range(batches)]))


def test_concurrent_writers_and_reader(stores):
    """Two writer processes put overlapping batches while this process reads: every
    record read is whole, and at the end all batches of both writers are there."""
    loc = stores.location()
    reader = stores.open(TEST_SCHEMA, loc)
    bs, shared, batches = 200, 100, 8
    # writer 1 writes batches 0..7, writer 2 batches 4..11: ids 800..1599 and the
    # shared ids are written by both
    procs = [_writer(loc, "--writer", "1", "--batches", str(batches), "--batch-size", str(bs),
                     "--shared", str(shared), "--no-sync"),
             _writer(loc, "--writer", "2", "--first", "4", "--batches", str(batches),
                     "--batch-size", str(bs), "--shared", str(shared), "--no-sync")]
    all_ids = _all_ids(12, bs, shared)
    reads = 0
    try:
        while any(p.poll() is None for p in procs):
            reads += 1
            _read_all(reader, all_ids)  # never a torn or mixed record
            time.sleep(0.01)
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            assert out.split().count("DONE") == batches
        assert _read_all(reader, all_ids) == all_ids.size == len(reader)
        versions = reader.versions(np.arange(800, 1600))
        assert all(v is not None for v in versions)
        assert {v[:2] for v in reader.versions(SHARED + np.arange(shared))} <= {"w1", "w2"}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        reader.close()
    assert reads >= 1


def _wait_for(proc: subprocess.Popen, token: str, timeout: float = 60) -> List[str]:
    lines: List[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"writer exited before {token!r}: {proc.stderr.read()}")
        lines.append(line.strip())
        if line.strip() == token:
            return lines
    raise AssertionError(f"no {token!r} within {timeout}s")


def _assert_batches_whole(store: ItemStore, batches: int, bs: int, shared: int,
                          done: int) -> None:
    """Each batch's own ids are all present or all absent, present batches form a
    prefix covering every batch reported done, and every record is consistent."""
    ids = _all_ids(batches, bs, shared)
    _read_all(store, ids)
    present = store.contains(np.arange(batches * bs)).view(batches, bs).sum(1).tolist()
    assert all(c in (0, bs) for c in present), f"a batch is half visible: {present}"
    n_full = sum(c == bs for c in present)
    assert present == [bs] * n_full + [0] * (batches - n_full)
    assert n_full >= done


def test_killed_writer_leaves_no_half_batch(stores):
    """A writer killed (SIGKILL) after writing a batch's data but before its commit, then
    another killed at a random moment: nothing half-written is ever visible, and the
    next writer works (an embedded store drops the torn log tail)."""
    loc = stores.location()
    bs, shared = 300, 50
    # 1) deterministic: killed between the data and the commit of batch 2
    p = _writer(loc, "--batches", "4", "--batch-size", str(bs), "--shared", str(shared),
                "--hang-at", "2")
    lines = _wait_for(p, "MID")
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert lines[:2] == ["DONE 0", "DONE 1"]
    with stores.open(None, loc) as store:
        _assert_batches_whole(store, 4, bs, shared, done=2)
        assert int(store.contains(np.arange(2 * bs, 3 * bs)).sum()) == 0
    # 2) killed at a random point of a stream of puts (no fsync: puts are fast)
    rng = np.random.default_rng(int(time.time()))
    p = _writer(loc, "--batches", "400", "--batch-size", str(bs), "--shared", str(shared),
                "--no-sync")
    lines = _wait_for(p, "DONE 1")
    time.sleep(float(rng.uniform(0.0, 0.3)))
    p.send_signal(signal.SIGKILL)
    out, _ = p.communicate()
    done = out.split().count("DONE") + 2
    with stores.open(None, loc) as store:
        _assert_batches_whole(store, 400, bs, shared, done=done)
        # the store still takes writes after the crash, and they are whole
        ids = batch_ids(500, bs, shared)
        store.put(ids, record_values(ids, 9, 500), "w9b500")
        assert int(store.contains(ids).sum()) == ids.size
        _read_all(store, ids)


def test_store_object_shared_across_fork_and_threads(make_store):
    """A store opened before a fork (e.g. by a DataLoader's parent) keeps working in the
    child, writers in parent and child still exclude each other, and two threads may
    share one store object."""
    store = make_store(TEST_SCHEMA)
    bs, shared = 150, 30
    ids0 = batch_ids(0, bs, shared)
    store.put(ids0, record_values(ids0, 0, 0), "w0b0")

    def child() -> None:
        try:
            for k in range(1, 9):
                ids = batch_ids(k, bs, shared)
                store.put(ids, record_values(ids, 1, k), f"w1b{k}")
                _read_all(store, ids)
        except BaseException:
            os._exit(1)
        os._exit(0)

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    errors: List[BaseException] = []

    def thread_writer(k0: int) -> None:
        try:
            for k in range(k0, k0 + 4):
                ids = batch_ids(k, bs, shared)
                store.put(ids, record_values(ids, 2, k), f"w2b{k}")
                _read_all(store, ids)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=thread_writer, args=(k0,)) for k0 in (20, 30)]
    for t in threads:
        t.start()
    while proc.is_alive():
        _read_all(store, _all_ids(40, bs, shared))
        time.sleep(0.01)
    for t in threads:
        t.join()
    proc.join()
    assert proc.exitcode == 0 and not errors, errors
    expect = np.unique(np.concatenate([batch_ids(k, bs, shared)
                                       for k in list(range(9)) + list(range(20, 24))
                                       + list(range(30, 34))]))
    assert _read_all(store, expect) == expect.size == len(store)


# ------------------------------------------------------------------- Redis faults

def test_redis_restart_mid_run_loses_nothing(tmp_path):
    pytest.importorskip("redis")
    from torchrec_mm.serving.redis_backend import RetryConfig
    from torchrec_mm.serving.schema import StoreUnavailableError
    from torchrec_mm.serving.testing import redis_server_binary

    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    bs, shared = 100, 10
    with RedisServer(str(tmp_path / "redis")) as server:
        store = ItemStore.open(server.url("restart"), TEST_SCHEMA,
                               retry=RetryConfig(attempts=12, base_delay=0.02, max_delay=0.5))
        for k in range(3):
            ids = batch_ids(k, bs, shared)
            store.put(ids, record_values(ids, 0, k), f"w0b{k}")
        server.stop(kill=True)  # a crash mid-run; restarted 0.4 s later
        restarter = threading.Timer(0.4, server.start)
        restarter.start()
        t0 = time.monotonic()
        for k in range(3, 6):  # the first put hits the dead server and retries
            ids = batch_ids(k, bs, shared)
            store.put(ids, record_values(ids, 0, k), f"w0b{k}")
        restarter.join()
        assert time.monotonic() - t0 >= 0.3
        all_ids = _all_ids(6, bs, shared)
        assert _read_all(store, all_ids) == all_ids.size == len(store)
        # once more, reads across a restart (data from the AOF)
        server.stop(kill=True)
        threading.Timer(0.3, server.start).start()
        assert store.get(all_ids, ["codes"])[1].all()
        # down for good: a bounded wait, then a clear error naming host:port
        server.stop()
        store.backend.retry = RetryConfig(attempts=3, base_delay=0.05, max_delay=0.1)
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailableError,
                           match=rf"redis at 127\.0\.0\.1:{server.port} unreachable: get "
                                 r"failed after 3 attempts"):
            store.get([1], ["p"])
        assert time.monotonic() - t0 < 5
        store.close()


# ------------------------------------------------------------ mmap internals

def test_mmap_log_blocks_roundtrip_and_torn_tail():
    ids = np.array([5, 1, 9], dtype=np.int64)
    blk = encode_block(1, ids, np.array([0, 1, 2]), b"ver")
    blk2 = encode_block(2, np.array([1], dtype=np.int64), None, b"")
    blocks, used = decode_blocks(blk + blk2)
    assert used == len(blk) + len(blk2) and [b[0] for b in blocks] == [1, 2]
    np.testing.assert_array_equal(blocks[0][1], ids)
    assert blocks[0][3] == b"ver"
    for cut in (1, len(blk2) // 2, len(blk2) - 1):  # torn second block: ignored
        blocks, used = decode_blocks(blk + blk2[:cut])
        assert len(blocks) == 1 and used == len(blk)
    bad = bytearray(blk + blk2)
    bad[len(blk) + 30] ^= 0xFF  # corrupt payload byte: CRC mismatch
    assert decode_blocks(bytes(bad))[1] == len(blk)


def test_mmap_merge_index_vs_dict():
    rng = np.random.default_rng(0)
    keys = np.zeros(0, np.int64)
    slots = np.zeros(0, np.int64)
    vers = np.zeros(0, np.int32)
    ref: Dict[int, tuple] = {}
    for step in range(30):
        n = int(rng.integers(1, 40))
        new = rng.integers(0, 60, n)
        ns = np.where(rng.random(n) < 0.25, -1, rng.integers(0, 1000, n))
        nv = np.where(ns < 0, -1, step).astype(np.int32)
        keys, slots, vers = merge_index(keys, slots, vers, new, ns, nv)
        for i, s, v in zip(new.tolist(), ns.tolist(), nv.tolist()):
            if s < 0:
                ref.pop(i, None)
            else:
                ref[i] = (s, v)
        assert keys.tolist() == sorted(ref)
        assert [(int(s), int(v)) for s, v in zip(slots, vers)] == [ref[k] for k in sorted(ref)]


def test_last_wins_positions():
    ids = np.array([4, 2, 4, 9, 2, 4])
    assert last_wins(ids).tolist() == [4, 5, 3]


def test_mmap_compaction_seen_by_other_handles(tmp_path):
    loc = str(tmp_path / "store")
    writer = ItemStore.open(loc, TEST_SCHEMA, sync=False)
    reader = ItemStore.open(loc, readonly=True)
    ids = np.arange(50)
    for k in range(5):
        writer.put(ids, record_values(ids, 0, k), f"w0b{k}")
    writer.delete(np.arange(40, 50))
    assert len(reader) == 40
    size_before = os.path.getsize(os.path.join(loc, "index.log"))
    writer.backend.compact()
    assert os.path.getsize(os.path.join(loc, "index.log")) < size_before
    assert _read_all(reader, np.arange(60)) == 40 and reader.versions([0]) == ["w0b4"]
    writer.put(np.arange(45, 47), record_values(np.arange(45, 47), 0, 9), "w0b9")
    assert len(reader) == 42 and _read_all(reader, np.arange(60)) == 42
    reopened = ItemStore.open(loc)
    assert reopened.ids().tolist() == list(range(40)) + [45, 46]
    for s in (writer, reader, reopened):
        s.close()


def test_mmap_refuses_foreign_directory(tmp_path):
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        ItemStore.open(str(tmp_path), TEST_SCHEMA)
