"""Tests of ``serve-items``: records written from watched files and HTTP equal the
models' outputs (ProxyGenerator + project_states, AlignedRepresenter +
QARMCodes.assign_new), validation and limits (400 naming the field, 413, 503 with
Retry-After), resume from the ledger (also after SIGKILL of the CLI), idempotence,
failure isolation, a store that is down, and the backfill from the artefacts.

Real models are tiny random Llamas trained for one epoch by ``idproxy fit`` / ``qarm
align``; queue, ledger and fault tests use a stub model (no encoder)."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrec_mm.serving.fields import artifact_version, project_states
from torchrec_mm.serving.schema import StoreSchema, StoreUnavailableError
from torchrec_mm.serving.service import (
    LEDGER_FORMAT,
    Item,
    ItemRejected,
    ItemService,
    Job,
    JobQueue,
    RecordMethod,
    RequestRejected,
    ServeConfig,
    TooManyItems,
    backfill,
    last_wins,
    parse_request_items,
    read_item_file,
    validate_item,
)
from torchrec_mm.serving.store import ItemStore

os.environ.setdefault("HF_HUB_OFFLINE", "1")
NUM_ITEMS = 48
Z_RANK = 3
BATCH = 4
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------------ helpers


def http(method: str, url: str, body: Optional[bytes] = None,
         headers: Optional[Dict[str, str]] = None) -> Tuple[int, Dict[str, Any], Any]:
    """(status, JSON body, headers) of one request."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"{}"), r.headers
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, json.loads(raw) if raw else {}, e.headers


def post_items(base: str, items: Any, query: str = "") -> Tuple[int, Dict[str, Any], Any]:
    body = items if isinstance(items, bytes) else json.dumps(items).encode()
    return http("POST", f"{base}/items{query}", body, {"Content-Type": "application/json"})


def wait_for(cond, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def ledger_entry(path: str, name: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as f:
            return json.load(f)["files"].get(name)
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def write_jsonl(path: str, rows: Sequence[Any]) -> None:
    """Written aside and renamed in, as the watcher expects."""
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    os.replace(tmp, path)


NEW_WORDS = ("red running shoes for a marathon", "a soft cake recipe with sugar",
             "my kitten and puppy play football", "best cheap phone camera review",
             "black dress and white shirt", "old team coach wins the match")


def new_text(i: int) -> str:
    return f"{NEW_WORDS[i % len(NEW_WORDS)]} number {i} {'video ' * (i % 5)}"


# ---------------------------------------------------------------- real artefacts


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """Dataset of 48 items, a tiny Llama, the IDProxy proxies (1 epoch of `idproxy fit`),
    the QARM alignment (1 epoch) and codes (VQ over the first 40 items)."""
    from torchrec_mm.content.testing import build_tiny_llama
    from torchrec_mm.data.synth import SynthConfig, generate
    from torchrec_mm.idproxy.coarse import CoarseFitConfig, fit_coarse
    from torchrec_mm.idproxy.targets import make_targets
    from torchrec_mm.qarm.align import AlignConfig, align_items
    from torchrec_mm.qarm.codes import (RQConfig, VQConfig, build_codes,
                                        load_representations, save_codes)

    root = tmp_path_factory.mktemp("serve_items")
    data = str(root / "data")
    generate(SynthConfig(num_users=20, num_items=NUM_ITEMS, num_interactions=400), data)
    llama = build_tiny_llama(str(root / "llama"), num_layers=2)
    g = torch.Generator().manual_seed(0)
    targets = make_targets(torch.randn(NUM_ITEMS, 8, generator=g), np.full(NUM_ITEMS, 10),
                           tau=5, name="random")
    px = str(root / "idproxy")
    fit_coarse(data, None, px, CoarseFitConfig(
        model_path=llama, trainable_layers=1, epochs=1, batch_size=16, max_length=32,
        hidden=16, group_sample=8, basis_rank=4), progress=False, targets=targets)
    rng = np.random.default_rng(0)
    al = str(root / "aligned")
    align_items(data, al, AlignConfig(model_path=llama, trainable_layers=1, dim=8, hidden=16,
                                      epochs=1, batch_size=32, max_length=32,
                                      recall_ks=(5,)),
                pairs={"a": rng.integers(0, NUM_ITEMS, 96), "b": rng.integers(0, NUM_ITEMS, 96)},
                progress=False)
    reps, has = load_representations(os.path.join(al, "aligned.safetensors"))
    has[-3:] = False  # three items without a code
    mask = np.arange(NUM_ITEMS) < 40
    codes = str(root / "codes")
    save_codes(build_codes(reps, has, VQConfig(k=4), RQConfig(levels=3, codebook_size=4),
                           codebook_mask=mask, progress=False), codes)
    return {"root": root, "data": data, "idproxy": px, "align": al, "codes": codes}


class Reference:
    """The models called directly, as a client of the library would."""

    def __init__(self, art: Dict[str, Any]) -> None:
        from torchrec_mm.idproxy.generate import ProxyGenerator
        from torchrec_mm.qarm.codes import load_codes
        from torchrec_mm.qarm.represent import AlignedRepresenter

        self.gen = ProxyGenerator.load(art["idproxy"], batch_size=BATCH)
        self.rep = AlignedRepresenter.load(art["align"], batch_size=BATCH)
        self.codes = load_codes(art["codes"])

    def records(self, texts: List[str]) -> Dict[str, torch.Tensor]:
        out = self.gen.generate(texts)
        px = self.gen.proxies
        z = project_states(out.z_groups.half().float(), px.z_mean, px.z_basis, Z_RANK)
        vq, rq = self.codes.assign_new(self.rep.represent(texts))
        return {"p_coarse": out.p_coarse, "z": z, "vq": vq, "rq": rq}

    def batched(self, texts: List[str], batch: int = BATCH) -> Dict[str, torch.Tensor]:
        """Records computed in the service's batches (same padding, same numbers)."""
        parts = [self.records(texts[i:i + batch]) for i in range(0, len(texts), batch)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@pytest.fixture(scope="module")
def ref(art):
    return Reference(art)


def serve_config(art: Dict[str, Any], root: str, **kw: Any) -> ServeConfig:
    base = dict(idproxy=art["idproxy"], idproxy_store=os.path.join(root, "px_store"),
                qarm_align=art["align"], qarm_codes=art["codes"],
                qarm_store=os.path.join(root, "qarm_store"), z_rank=Z_RANK,
                batch_size=BATCH, linger_s=0.0, poll_s=0.05, sync=False, capacity=100_000,
                queue_items=64, max_items_per_request=16, max_body_bytes=4096)
    base.update(kw)
    return ServeConfig(**base)


@pytest.fixture(scope="module")
def served(art, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("served"))
    cfg = serve_config(art, root, watch=os.path.join(root, "watch"), http_port=0)
    service = ItemService(cfg).start()
    host, port = service.address
    yield service, f"http://{host}:{port}"
    service.stop()


def store_values(service: ItemService, ids: Sequence[int]
                 ) -> Tuple[Dict[str, torch.Tensor], List[Optional[str]], List[Optional[str]]]:
    p, fp = service.stores["idproxy"].get(list(ids), raw=True)
    q, fq = service.stores["qarm"].get(list(ids), raw=True)
    assert bool(fp.all()) and bool(fq.all())
    return ({**p, **q}, service.stores["idproxy"].versions(list(ids)),
            service.stores["qarm"].versions(list(ids)))


def assert_records(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor]) -> None:
    torch.testing.assert_close(got["p_coarse"], want["p_coarse"], atol=1e-6, rtol=0)
    torch.testing.assert_close(got["z"], want["z"], atol=1e-5, rtol=0)
    assert torch.equal(got["vq"].long(), want["vq"]) and torch.equal(got["rq"].long(), want["rq"])


# ------------------------------------------------------------------------ units


def test_validate_item_names_the_field():
    cfg = ServeConfig(idproxy="x", idproxy_store="y", capacity=100, max_text_chars=20)
    ok = validate_item({"item_id": 7, "text": "a shoe", "image_path": "im/a.png"}, 3, cfg,
                       base_dir="/data")
    assert ok == Item(7, "a shoe", "/data/im/a.png", 3)
    cases = [
        ({"text": "x"}, "item_id", "missing"),
        ({"item_id": "7", "text": "x"}, "item_id", "integer"),
        ({"item_id": True, "text": "x"}, "item_id", "integer"),
        ({"item_id": 7.0, "text": "x"}, "item_id", "integer"),
        ({"item_id": -1, "text": "x"}, "item_id", "outside"),
        ({"item_id": 100, "text": "x"}, "item_id", "capacity"),
        ({"item_id": 1}, "text", "missing"),
        ({"item_id": 1, "text": "  "}, "text", "empty"),
        ({"item_id": 1, "text": 5}, "text", "string"),
        ({"item_id": 1, "text": "x" * 21}, "text", "at most 20"),
        ({"item_id": 1, "text": "x", "image_path": 3}, "image_path", "string"),
        ({"item_id": 1, "text": "x", "price": 3}, "price", "unknown"),
        ([1, 2], None, "object"),
    ]
    for obj, fld, msg in cases:
        with pytest.raises(ItemRejected, match=msg) as e:
            validate_item(obj, 5, cfg)
        assert e.value.record == 5 and e.value.field == fld, obj
    with pytest.raises(ItemRejected, match="no such file"):
        validate_item({"item_id": 1, "text": "x", "image_path": "/nope.png"}, 0, cfg,
                      check_images=True)


item_st = st.fixed_dictionaries(
    {"item_id": st.integers(0, 30), "text": st.text(min_size=1, max_size=12).filter(
        lambda t: t.strip() and "\x00" not in t)},
    optional={"image_path": st.none() | st.just("a.png")})


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(item_st, min_size=1, max_size=12))
def test_parse_json_and_jsonl_agree_and_last_wins(rows):
    cfg = ServeConfig(idproxy="x", idproxy_store="y", max_items_per_request=12,
                      image_root="/img")
    a = parse_request_items(json.dumps(rows).encode(), cfg)
    b = parse_request_items("\n".join(json.dumps(r) for r in rows).encode(), cfg)
    assert a == b
    assert [(it.item_id, it.text, it.record) for it in a] == [
        (r["item_id"], r["text"], i) for i, r in enumerate(rows)]
    last = {r["item_id"]: r["text"] for r in rows}  # a dict keeps the last value
    assert {it.item_id: it.text for it in last_wins(a)} == last
    assert len(last_wins(a)) == len(last)


def test_parse_rejects_bodies():
    cfg = ServeConfig(idproxy="x", idproxy_store="y", max_items_per_request=2)
    with pytest.raises(TooManyItems):
        parse_request_items(json.dumps([{"item_id": i, "text": "t"} for i in range(3)]).encode(),
                            cfg)
    with pytest.raises(RequestRejected) as e:
        parse_request_items(b'[{"item_id": 1, "text": "t"}, {"item_id": 2, "text": ""}]', cfg)
    assert [(x.record, x.field) for x in e.value.errors] == [(1, "text")]
    for body, msg in ((b"", "empty"), (b"[1,", "invalid JSON"), (b"\xff", "UTF-8"),
                      (b'{"item_id": NaN, "text": "t"}', "invalid JSON"), (b"[]", "no items")):
        with pytest.raises(ItemRejected, match=msg):
            parse_request_items(body, cfg)


def test_read_item_file_reports_lines(tmp_path):
    path = str(tmp_path / "a.jsonl")
    write_jsonl(path, [{"item_id": 1, "text": "a"}, "not json", "",
                       {"item_id": 2, "text": ""},
                       {"item_id": 3, "text": "c", "image_path": "i.png"}])
    items, errors = read_item_file(path, ServeConfig(idproxy="x", idproxy_store="y"))
    assert [(it.item_id, it.record) for it in items] == [(1, 1), (3, 5)]
    assert items[1].image_path == str(tmp_path / "i.png")
    assert [(e.record, e.field) for e in errors] == [("line 2", None), ("line 4", "text")]
    assert path in str(errors[1]) and "line 4" in str(errors[1])


def test_config_checks():
    with pytest.raises(ValueError, match="nothing to serve"):
        ServeConfig()
    with pytest.raises(ValueError, match="idproxy-store"):
        ServeConfig(idproxy="x")
    with pytest.raises(ValueError, match="must differ"):
        ServeConfig(idproxy="x", idproxy_store="s", qarm_codes="c", qarm_store="s/")
    with pytest.raises(ValueError, match="queue_items"):
        ServeConfig(idproxy="x", idproxy_store="y", queue_items=8, max_items_per_request=16)


def test_job_queue_batches_and_blocks():
    q = JobQueue(capacity=5)
    job = lambda n: Job([Item(i, "t") for i in range(n)])  # noqa: E731
    assert q.offer([job(2), job(2)]) and len(q) == 4
    assert not q.offer([job(1), job(1)]) and len(q) == 4  # all or nothing
    assert q.offer([job(1)])
    got = q.take(3, linger_s=0, timeout=0)  # whole jobs only: 2 (+2 would be 4 > 3)
    assert [len(j.items) for j in got] == [2]
    got = q.take(4, linger_s=0, timeout=0)
    assert [len(j.items) for j in got] == [2, 1] and len(q) == 0
    # put blocks while full, until a take makes room
    stop = threading.Event()
    assert q.offer([job(5)])
    done = threading.Event()
    t = threading.Thread(target=lambda: (q.put(job(2), stop), done.set()))
    t.start()
    assert not done.wait(0.2)
    assert [len(j.items) for j in q.take(5, 0, 0)] == [5]
    assert done.wait(5) and len(q) == 2
    # a blocked put gives up when the service stops
    assert q.offer([job(3)])
    res: List[bool] = []
    t = threading.Thread(target=lambda: res.append(q.put(job(1), stop)))
    t.start()
    time.sleep(0.1)
    stop.set()
    t.join(5)
    assert res == [False] and len(q) == 5


# -------------------------------------------------------------- stub model tests


class StubRecords(RecordMethod):
    """Record v = [item text length, hash] without an encoder; ``gate`` (if given)
    blocks compute until set; texts containing "boom" fail, "nan" gives NaN."""

    name = "idproxy"

    def __init__(self, gate: Optional[threading.Event] = None) -> None:
        self.schema = StoreSchema.of(v=("float32", (2,)))
        self.version = "stub-v1"
        self.gate = gate
        self.entered = threading.Event()
        self.calls = 0

    def compute(self, texts, images):
        self.calls += 1
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(30)
        if any("boom" in t for t in texts):
            raise RuntimeError("the encoder exploded")
        v = torch.tensor([[len(t), int(hashlib.md5(t.encode()).hexdigest()[:6], 16)]
                          for t in texts], dtype=torch.float32)
        v[[i for i, t in enumerate(texts) if "nan" in t]] = float("nan")
        return {"v": v}

    @staticmethod
    def expected(text: str) -> List[float]:
        return [float(len(text)), float(int(hashlib.md5(text.encode()).hexdigest()[:6], 16))]


def stub_service(tmp_path, method: RecordMethod, store: Any = None, **kw: Any) -> ItemService:
    cfg = ServeConfig(idproxy="stub", idproxy_store=str(tmp_path / "store"),
                      **{"batch_size": 2, "linger_s": 0.0, "poll_s": 0.02, "sync": False, **kw})
    if store is None:
        store = ItemStore.open(cfg.idproxy_store, method.schema, sync=False)
    return ItemService(cfg, [method], {"idproxy": store})


def test_queue_full_answers_503_then_recovers(tmp_path):
    gate = threading.Event()
    method = StubRecords(gate)
    service = stub_service(tmp_path, method, queue_items=4, max_items_per_request=4,
                           http_port=0).start()
    base = "http://%s:%d" % service.address
    try:
        status, body, _ = post_items(base, [{"item_id": 1, "text": "a"},
                                            {"item_id": 2, "text": "b"}], "?wait=0")
        assert status == 202 and body["queued"] == 2
        assert method.entered.wait(10)  # the writer holds that batch, the queue is empty
        status, _, _ = post_items(base, [{"item_id": i, "text": "c"} for i in range(3, 7)],
                                  "?wait=0")
        assert status == 202 and len(service.queue) == 4
        status, body, headers = post_items(base, [{"item_id": 9, "text": "d"}])
        assert status == 503 and headers["Retry-After"] == "1" and "queue full" in body["error"]
        assert http("GET", f"{base}/health")[1]["busy_responses"] == 1
        gate.set()
        wait_for(lambda: len(service.queue) < 4, 10, "room in the queue")
        status, body, _ = post_items(base, [{"item_id": 9, "text": "d"}])
        assert status == 200 and body["written"] == 1
        vals, found = service.stores["idproxy"].get(list(range(1, 10)))
        assert found.tolist() == [True] * 6 + [False, False, True]
        assert vals["v"][8].tolist() == StubRecords.expected("d")
    finally:
        gate.set()
        service.stop()


def test_failing_items_are_isolated(tmp_path):
    method = StubRecords()
    service = stub_service(tmp_path, method, http_port=0, batch_size=4).start()
    base = "http://%s:%d" % service.address
    try:
        status, body, _ = post_items(base, [{"item_id": 1, "text": "fine"},
                                            {"item_id": 2, "text": "boom"},
                                            {"item_id": 3, "text": "a nan"},
                                            {"item_id": 4, "text": "also fine"}])
        assert status == 422 and body["written"] == 2
        assert [(f["record"], f["item_id"]) for f in body["failed"]] == [(1, 2), (2, 3)]
        assert "exploded" in body["failed"][0]["message"]
        assert "NaN" in body["failed"][1]["message"]
        _, found = service.stores["idproxy"].get([1, 2, 3, 4])
        assert found.tolist() == [True, False, False, True]
        # the service keeps serving
        assert post_items(base, [{"item_id": 5, "text": "next"}])[0] == 200
    finally:
        service.stop()


class FlakyStore:
    """An ItemStore whose first ``fail`` puts raise StoreUnavailableError."""

    def __init__(self, store: ItemStore, fail: int) -> None:
        self._store, self.fail, self.attempts = store, fail, 0

    def put(self, ids, values, version):
        self.attempts += 1
        if self.attempts <= self.fail:
            raise StoreUnavailableError("127.0.0.1:6379: put failed after 3 attempts "
                                        "(Connection refused)")
        return self._store.put(ids, values, version)

    def __getattr__(self, name):
        return getattr(self._store, name)

    def __len__(self):
        return len(self._store)


def test_store_down_is_retried_with_backoff(tmp_path):
    method = StubRecords()
    inner = ItemStore.open(str(tmp_path / "store"), method.schema, sync=False)
    flaky = FlakyStore(inner, fail=3)
    service = stub_service(tmp_path, method, flaky, retry_initial_s=0.1, retry_max_s=0.2)
    service.start()
    try:
        ticket = service.submit([Item(1, "x"), Item(2, "y")])
        wait_for(lambda: service.health()["status"] == "degraded", 10, "degraded")
        assert "Connection refused" in service.health()["last_error"]
        assert ticket.done.wait(20) and not ticket.failures and not ticket.aborted
        assert flaky.attempts == 4 and service.health()["status"] == "ok"
        assert inner.get([1, 2])[1].all()
        assert method.calls == 1  # the batch was encoded once, only the put retried
    finally:
        service.stop()
        inner.close()


def test_redis_stopped_mid_run_loses_nothing(tmp_path):
    """Redis killed while items arrive: the put fails after the backend's retries
    (StoreUnavailableError naming host:port), the service reports degraded and keeps
    retrying the batch with backoff; after the restart every item is in the store."""
    pytest.importorskip("redis")
    from torchrec_mm.serving.redis_backend import RetryConfig
    from torchrec_mm.serving.testing import RedisServer, redis_server_binary

    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    method = StubRecords()
    with RedisServer(str(tmp_path / "redis")) as server:
        store = ItemStore.open(server.url("serve"), method.schema,
                               retry=RetryConfig(attempts=2, base_delay=0.02, max_delay=0.05,
                                                 connect_timeout=0.5))
        service = stub_service(tmp_path, method, store, retry_initial_s=0.05,
                               retry_max_s=0.2).start()
        try:
            assert service.submit([Item(1, "before")]).done.wait(10)
            server.stop(kill=True)
            ticket = service.submit([Item(2, "during"), Item(3, "during too")])
            wait_for(lambda: service.stats.degraded, 20, "degraded")
            assert f"127.0.0.1:{server.port}" in service.stats.last_error
            assert not ticket.done.is_set()
            server.start()
            assert ticket.done.wait(20) and not ticket.failures and not ticket.aborted
            vals, found = store.get([1, 2, 3])
            assert found.all() and vals["v"][2].tolist() == StubRecords.expected("during too")
            assert not service.stats.degraded
        finally:
            service.stop()
            store.close()


def _write_items(path: str, n: int) -> List[Dict[str, Any]]:
    rows = [{"item_id": 100 + i, "text": f"text {i}"} for i in range(n)]
    write_jsonl(path, rows)
    return rows


def test_watcher_blocks_on_a_full_queue(tmp_path):
    """Back-pressure on files: with the writer stalled the watcher fills the queue and
    waits (nothing dropped, nothing marked written); released, every item is written."""
    gate = threading.Event()
    method = StubRecords(gate)
    watch = tmp_path / "watch"
    watch.mkdir()
    rows = _write_items(str(watch / "big.jsonl"), 12)  # 6 batches of 2
    service = stub_service(tmp_path, method, watch=str(watch), queue_items=4,
                           max_items_per_request=4).start()
    ledger = str(watch / ".serve-items-ledger.json")
    try:
        wait_for(lambda: len(service.queue) == 4 and method.entered.is_set(), 10, "full queue")
        time.sleep(0.2)
        assert len(service.queue) == 4  # the watcher waits for room
        assert ledger_entry(ledger, "big.jsonl")["done_batches"] == 0
        gate.set()
        wait_for(lambda: ledger_entry(ledger, "big.jsonl")["status"] == "done", 20, "done")
        vals, found = service.stores["idproxy"].get([r["item_id"] for r in rows])
        assert found.all()
        assert vals["v"][:, 0].tolist() == [float(len(r["text"])) for r in rows]
    finally:
        gate.set()
        service.stop()


def test_corrupt_ledger_is_a_clear_error(tmp_path):
    from torchrec_mm.data.schema import DataError

    watch = tmp_path / "watch"
    watch.mkdir()
    (watch / ".serve-items-ledger.json").write_text("{not json")
    service = stub_service(tmp_path, StubRecords(), watch=str(watch), http_port=0)
    with pytest.raises(DataError, match=r"serve-items-ledger.json.*delete it"):
        service.start()
    t = time.monotonic()
    service.stop()  # nothing was started: returns at once
    assert time.monotonic() - t < 5 and not service._threads


def test_restart_resumes_from_the_ledger(tmp_path):
    """A ledger saying 2 of 5 batches are written: only batches 3-5 are written now.
    A file whose content changed, or a ledger of other versions: from the start."""
    watch = tmp_path / "watch"
    watch.mkdir()
    path = str(watch / "a.jsonl")
    rows = _write_items(path, 10)  # batch_size 2 -> 5 batches
    data = open(path, "rb").read()
    st_ = os.stat(path)
    ledger = str(watch / ".serve-items-ledger.json")
    entry = {"size": st_.st_size, "mtime_ns": st_.st_mtime_ns,
             "sha256": hashlib.sha256(data).hexdigest(), "batch_size": 2, "batches": 5,
             "done_batches": 2, "items": 10, "status": "in_progress", "errors": [],
             "num_errors": 0}
    with open(ledger, "w") as f:
        json.dump({"format": LEDGER_FORMAT, "versions": {"idproxy": "stub-v1"},
                   "files": {"a.jsonl": entry}}, f)
    service = stub_service(tmp_path, StubRecords(), watch=str(watch)).start()
    try:
        wait_for(lambda: (ledger_entry(ledger, "a.jsonl") or {}).get("status") == "done",
                 20, "a.jsonl done")
        ids = [r["item_id"] for r in rows]
        _, found = service.stores["idproxy"].get(ids)
        assert found.tolist() == [False] * 4 + [True] * 6
        assert ledger_entry(ledger, "a.jsonl")["done_batches"] == 5
        # a finished file is not read again; a changed one is, from its first batch
        time.sleep(0.2)
        assert service.health()["batches"] == 3
        rows = _write_items(path, 4)
        wait_for(lambda: ledger_entry(ledger, "a.jsonl")["items"] == 4 and
                 ledger_entry(ledger, "a.jsonl")["status"] == "done", 20, "rewritten file")
        assert service.health()["batches"] == 5
    finally:
        service.stop()
    # other model versions: every file again
    store = ItemStore.open(str(tmp_path / "store"), StubRecords().schema)
    store.delete(store.ids())
    store.close()
    method = StubRecords()
    method.version = "stub-v2"
    service = stub_service(tmp_path, method, watch=str(watch)).start()
    try:
        wait_for(lambda: (ledger_entry(ledger, "a.jsonl") or {}).get("status") == "done" and
                 service.health()["batches"] == 2, 20, "reprocessed for v2")
        assert service.stores["idproxy"].versions([100, 103]) == ["stub-v2"] * 2
    finally:
        service.stop()


# -------------------------------------------------------------- real model tests


def test_watched_file_records_equal_the_models(served, ref, art):
    service, _ = served
    watch = service.config.watch
    rows: List[Any] = [{"item_id": 1000 + i, "text": new_text(i)} for i in range(9)]
    rows.insert(3, "{broken")
    rows.append({"item_id": 1002, "text": new_text(42)})  # duplicate id: the last wins
    write_jsonl(os.path.join(watch, "new.jsonl"), rows)
    ledger = service.config.ledger_path
    wait_for(lambda: (ledger_entry(ledger, "new.jsonl") or {}).get("status") == "done", 60,
             "new.jsonl")
    entry = ledger_entry(ledger, "new.jsonl")
    assert entry["items"] == 10 and entry["batches"] == 3 and entry["num_errors"] == 1
    assert "line 4" in entry["errors"][0]
    texts = [r["text"] for r in rows if isinstance(r, dict)]
    ids = [r["item_id"] for r in rows if isinstance(r, dict)]
    want = ref.batched(texts)
    last = {i: k for k, i in enumerate(ids)}
    uniq = sorted(last)
    got, vp, vq = store_values(service, uniq)
    assert_records(got, {k: v[[last[i] for i in uniq]] for k, v in want.items()})
    assert set(vp) == {artifact_version(art["idproxy"])}
    assert set(vq) == {artifact_version(art["codes"])}
    # idempotent: the same items again (another file) -> identical values, same version
    n_before = len(service.stores["idproxy"])
    write_jsonl(os.path.join(watch, "again.jsonl"), rows)
    wait_for(lambda: (ledger_entry(ledger, "again.jsonl") or {}).get("status") == "done", 60,
             "again.jsonl")
    again, vp2, _ = store_values(service, uniq)
    assert len(service.stores["idproxy"]) == n_before and vp2 == vp
    for k in got:
        assert torch.equal(got[k], again[k]), k


def test_http_happy_path_and_item_info(served, ref, art):
    service, base = served
    items = [{"item_id": 2000 + i, "text": new_text(10 + i)} for i in range(3)]
    status, body, _ = post_items(base, items)
    assert status == 200 and body["written"] == 3 and body["item_ids"] == [2000, 2001, 2002]
    assert body["versions"] == {"idproxy": artifact_version(art["idproxy"]),
                                "qarm": artifact_version(art["codes"])}
    got, _, _ = store_values(service, [2000, 2001, 2002])
    assert_records(got, ref.records([it["text"] for it in items]))
    status, info, _ = http("GET", f"{base}/items/2001")
    assert status == 200 and info["idproxy"]["found"] and info["qarm"]["current"]
    assert info["qarm"]["version"] == body["versions"]["qarm"]
    status, info, _ = http("GET", f"{base}/items/77777")
    assert status == 404 and not info["idproxy"]["found"]
    # JSONL body, no wait: 202, then the record shows up
    jsonl = b'{"item_id": 2010, "text": "a new camera"}\n{"item_id": 2011, "text": "cake"}\n'
    status, body, _ = http("POST", f"{base}/items?wait=0", jsonl)
    assert status == 202 and body["queued"] == 2
    wait_for(lambda: http("GET", f"{base}/items/2011")[0] == 200, 30, "item 2011")
    status, health, _ = http("GET", f"{base}/health")
    assert status == 200 and health["status"] == "ok" and health["written_items"] >= 5
    assert set(health["stores"]) == {"idproxy", "qarm"}


def test_http_rejects_bad_input_and_keeps_serving(served):
    service, base = served
    bad = [
        ([{"item_id": 1, "text": "ok"}, {"item_id": "x", "text": "t"}], 1, "item_id"),
        ([{"item_id": 1, "text": ""}], 0, "text"),
        ([{"item_id": 100_000, "text": "t"}], 0, "item_id"),  # capacity
        ([{"item_id": 1, "text": "t", "image_path": 5}], 0, "image_path"),
        ([{"item_id": 1, "text": "t", "extra": 1}], 0, "extra"),
        ([{"item_id": 1, "text": "t"}, 7], 1, None),
    ]
    for items, record, fld in bad:
        status, body, _ = post_items(base, items)
        assert status == 400, items
        assert body["record"] == record and body["field"] == fld, body
        assert f"record {record}" in body["error"]
    status, body, _ = post_items(base, b"[{not json")
    assert status == 400 and "invalid JSON" in body["error"]
    status, body, _ = post_items(base, b"x" * (service.config.max_body_bytes + 1))
    assert status == 413 and body["limit"] == service.config.max_body_bytes
    many = [{"item_id": i, "text": "t"} for i in range(service.config.max_items_per_request + 1)]
    status, body, _ = post_items(base, many)
    assert status == 413 and "at most 16" in body["error"]
    assert http("GET", f"{base}/items/abc")[0] == 400
    assert http("GET", f"{base}/nothing")[0] == 404
    _, found = service.stores["idproxy"].get([1])
    assert not bool(found[0])  # nothing of the rejected requests was written
    status, body, _ = post_items(base, [{"item_id": 3000, "text": "still serving"},
                                        {"item_id": 3000, "text": "the last wins"}])
    assert status == 200 and body["written"] == 1 and body["duplicates_dropped"] == 1
    assert service.health()["rejected_requests"] >= len(bad) + 3


def test_backfill_equals_the_artefacts(art, tmp_path):
    from torchrec_mm.idproxy.artifacts import load_proxies
    from torchrec_mm.qarm.codes import load_codes

    cfg = serve_config(art, str(tmp_path), qarm_align=None, backfill_batch_size=16)
    report = backfill(art["data"], cfg, progress=False)
    assert report["idproxy"] == {"items": NUM_ITEMS, "written": NUM_ITEMS, "skipped": 0}
    assert report["qarm"] == {"items": NUM_ITEMS - 3, "written": NUM_ITEMS - 3, "skipped": 0}
    px, codes = load_proxies(art["idproxy"]), load_codes(art["codes"])
    ids = list(range(NUM_ITEMS))
    with ItemStore.open(cfg.idproxy_store) as s:
        vals, found = s.get(ids)
        assert found.all() and set(s.versions(ids)) == {artifact_version(art["idproxy"])}
        torch.testing.assert_close(vals["p_coarse"], px.p_coarse, atol=0, rtol=0)
        want_z = project_states(px.z_groups, px.z_mean, px.z_basis, Z_RANK)
        assert vals["z"].shape == (NUM_ITEMS, px.z_groups.shape[1] * Z_RANK)
        torch.testing.assert_close(vals["z"], want_z, atol=1e-6, rtol=0)
    with ItemStore.open(cfg.qarm_store) as s:
        vals, found = s.get(ids)
        assert found.tolist() == [True] * (NUM_ITEMS - 3) + [False] * 3  # no code: no record
        assert torch.equal(vals["vq"][:-3], codes.vq[:-3])
        assert torch.equal(vals["rq"][:-3], codes.rq[:-3])
        assert (vals["vq"][-3:] == -1).all()  # the store's "no code" fill
    again = backfill(art["data"], cfg, progress=False)
    assert again["idproxy"]["written"] == 0 and again["idproxy"]["skipped"] == NUM_ITEMS


@pytest.mark.parametrize("z_rank", [Z_RANK, 6, 0])
def test_idproxy_records_are_the_rankers_fine_proxy_inputs(art, z_rank):
    """The ``z`` field is what the ranker's FineProxy feeds φ̃ for the same z_rank —
    the artefact's basis (r <= its rank 4), a basis of rank z_rank computed as
    FineProxy does (6 > 4), or the full states (0)."""
    from torchrec_mm.idproxy.artifacts import load_proxies
    from torchrec_mm.idproxy.modules import FineProxy
    from torchrec_mm.serving.service import IDProxyRecords

    px = load_proxies(art["idproxy"])
    rec = IDProxyRecords(art["idproxy"], z_rank)
    fine = FineProxy(px.p_coarse, px.z_groups, 4, z_rank=z_rank, z_mean=px.z_mean,
                     z_basis=px.z_basis)
    assert rec.schema["z"].shape == (fine.z_width,)
    ids = np.arange(NUM_ITEMS)
    got = rec.catalogue(ids)
    torch.testing.assert_close(got["z"], fine.z_in, atol=1e-5, rtol=0)
    torch.testing.assert_close(got["p_coarse"], fine.p_coarse, atol=0, rtol=0)


def test_new_item_encoding_matches_catalogue_record(served, art):
    """A catalogue item sent as a new item gets (up to the encoder's float noise) the
    record the backfill writes from the artefact: the same numbers reach the ranker."""
    from torchrec_mm.content.encode_job import read_items
    from torchrec_mm.idproxy.artifacts import load_proxies

    service, base = served
    items = read_items(art["data"])
    rows = [0, 5, 11]
    status, _, _ = post_items(base, [{"item_id": 4000 + i, "text": items.texts[i]}
                                     for i in rows])
    assert status == 200
    got, _, _ = store_values(service, [4000 + i for i in rows])
    px = load_proxies(art["idproxy"])
    torch.testing.assert_close(got["p_coarse"], px.p_coarse[rows], atol=1e-4, rtol=0)
    want_z = project_states(px.z_groups[rows], px.z_mean, px.z_basis, Z_RANK)
    torch.testing.assert_close(got["z"], want_z, atol=5e-3, rtol=0)


# ------------------------------------------------------------------------------ CLI


def test_cli_killed_mid_file_resumes(art, tmp_path):
    """SIGKILL while a file is half written; the restarted CLI resumes at the first
    unwritten batch, every record is complete and equals the models' (batches of 1),
    and SIGTERM stops it cleanly."""
    watch = tmp_path / "watch"
    watch.mkdir()
    n = 24
    rows = [{"item_id": 500 + i, "text": new_text(i)} for i in range(n)]
    write_jsonl(str(watch / "items.jsonl"), rows)
    ledger = str(watch / ".serve-items-ledger.json")
    cmd = [sys.executable, "-m", "torchrec_mm.serving.cli", "serve-items",
           "--idproxy", art["idproxy"], "--idproxy-store", str(tmp_path / "px_store"),
           "--qarm-align", art["align"], "--qarm-codes", art["codes"],
           "--qarm-store", str(tmp_path / "qarm_store"), "--z-rank", str(Z_RANK),
           "--watch", str(watch), "--batch-size", "1", "--poll-s", "0.05", "--no-sync"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO}
    log1 = open(tmp_path / "run1.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log1, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: (ledger_entry(ledger, "items.jsonl") or {}).get("done_batches", 0) >= 3
                 or proc.poll() is not None, 120, "first batches")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    at_kill = ledger_entry(ledger, "items.jsonl")
    assert at_kill is not None and at_kill["status"] == "in_progress", at_kill
    k = at_kill["done_batches"]
    assert 3 <= k < n
    log2 = open(tmp_path / "run2.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log2, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: (ledger_entry(ledger, "items.jsonl") or {}).get("status") == "done"
                 or proc.poll() is not None, 120, "file done after restart")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log2.seek(0)
    out = log2.read()
    assert f"resuming at batch {k + 1} of {n}" in out and "serve-items: stopped" in out, out
    ref = Reference(art)
    want = ref.batched([r["text"] for r in rows], batch=1)
    ids = [r["item_id"] for r in rows]
    with ItemStore.open(str(tmp_path / "px_store")) as sp, \
            ItemStore.open(str(tmp_path / "qarm_store")) as sq:
        p, fp = sp.get(ids, raw=True)
        q, fq = sq.get(ids, raw=True)
        assert fp.all() and fq.all()
        assert_records({**p, **q}, want)
