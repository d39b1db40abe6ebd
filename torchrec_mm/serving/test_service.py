"""Tests of ``serve-items``: records written from watched files and HTTP equal the
models' outputs (ProxyGenerator + project_states, AlignedRepresenter +
QARMCodes.assign_new), validation and limits (400 naming the field, 413, 503 with
Retry-After, 411, 504, 500 for internal errors, JSON too deep, watched files above
max_file_bytes), resume from the ledger (also after SIGKILL of the CLI, after an
aborted batch, with another partition), idempotence, failure isolation, a store that
is down, a clean stop (waiting requests answered, connections closed, own stores
closed also after a failed start), and the backfill from the artefacts.

Real models are tiny random Llamas trained for one epoch by ``idproxy fit`` / ``qarm
align``; queue, ledger and fault tests use a stub model (no encoder)."""

import hashlib
import json
import os
import signal
import socket
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
    Ledger,
    RecordMethod,
    RequestRejected,
    ServeConfig,
    Ticket,
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


def raw_http(address: Tuple[str, int], request: bytes, timeout: float = 10.0) -> bytes:
    """Sends raw bytes, returns everything the server answers until it closes."""
    out = b""
    with socket.create_connection(address, timeout=timeout) as s:
        s.sendall(request)
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                return out
            out += chunk


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
        lambda t: t.strip() and "\x00" not in t) | st.sampled_from(
            ["a\u2028b", "x\x85y", "p\u2029q", "\u2028x\x1c"])},
    optional={"image_path": st.none() | st.just("a.png")})


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(item_st, min_size=1, max_size=12))
def test_parse_json_and_jsonl_agree_and_last_wins(rows):
    cfg = ServeConfig(idproxy="x", idproxy_store="y", max_items_per_request=12,
                      image_root="/img")
    a = parse_request_items(json.dumps(rows).encode(), cfg)
    b = parse_request_items("\n".join(json.dumps(r) for r in rows).encode(), cfg)
    # JSONL as clients with ensure_ascii=False write it: raw non-ASCII, also U+2028,
    # U+0085 ... which are line breaks to str.splitlines but not to JSONL
    c = parse_request_items("\n".join(json.dumps(r, ensure_ascii=False)
                                      for r in rows).encode(), cfg)
    assert a == b == c
    assert [(it.item_id, it.text, it.record) for it in a] == [
        (r["item_id"], r["text"], i) for i, r in enumerate(rows)]
    last = {r["item_id"]: r["text"] for r in rows}  # a dict keeps the last value
    assert {it.item_id: it.text for it in last_wins(a)} == last
    assert len(last_wins(a)) == len(last)


def test_parse_rejects_bodies():
    cfg = ServeConfig(idproxy="x", idproxy_store="y", max_items_per_request=2)
    with pytest.raises(TooManyItems, match="^3 items in one request, at most 2$"):
        parse_request_items(json.dumps([{"item_id": i, "text": "t"} for i in range(3)]).encode(),
                            cfg)
    with pytest.raises(TooManyItems, match="^more than 2 items in one request, at most 2$"):
        parse_request_items(b"\n".join(b'{"item_id": %d, "text": "t"}' % i for i in range(5)),
                            cfg)
    # nesting too deep for the JSON decoder (a RecursionError): a 400, not a crash
    for body in (b"[" * 100_000, b'{"item_id": ' * 100_000, b"[" + b"[" * 100_000 + b"]"):
        with pytest.raises(ItemRejected, match="invalid JSON.*nested too deeply"):
            parse_request_items(body, cfg)
    with pytest.raises(ItemRejected) as e:
        parse_request_items(b"  ", cfg)
    assert str(e.value).startswith("request body: empty") and e.value.record is None
    with pytest.raises(RequestRejected) as e:
        parse_request_items(b'[{"item_id": 1, "text": "t"}, {"item_id": 2, "text": ""}]', cfg)
    assert [(x.record, x.field) for x in e.value.errors] == [(1, "text")]
    for body, msg in ((b"", "empty"), (b"[1,", "invalid JSON"), (b"\xff", "UTF-8"),
                      (b'{"item_id": NaN, "text": "t"}', "invalid JSON"), (b"[]", "no items")):
        with pytest.raises(ItemRejected, match=msg):
            parse_request_items(body, cfg)


def test_parse_one_object_on_several_lines():
    """"One object" as the body, also pretty-printed (the module doc promises it)."""
    cfg = ServeConfig(idproxy="x", idproxy_store="y")
    obj = {"item_id": 4, "text": "a shoe\u2028for running"}
    for body in (json.dumps(obj, indent=2), json.dumps(obj, ensure_ascii=False),
                 json.dumps(obj, indent=1, ensure_ascii=False) + "\n\n"):
        assert parse_request_items(body.encode(), cfg) == [Item(4, obj["text"], None, 0)]
    # two objects, one per line, still JSONL; a broken one names its line
    two = parse_request_items(b'{"item_id": 1, "text": "a"}\n{"item_id": 2, "text": "b"}', cfg)
    assert [it.item_id for it in two] == [1, 2]
    with pytest.raises(ItemRejected, match="record 1: line 3: invalid JSON"):
        parse_request_items(b'{"item_id": 1, "text": "a"}\n\n{"item_id": 2,', cfg)


def test_ticket_and_job_end_once():
    t = Ticket(2)
    t.job_done({})
    t.job_done({3: "boom"})
    t.abort()  # e.g. the writer failed after the last on_done: changes nothing
    assert t.done.is_set() and not t.aborted and t.failures == {3: "boom"}
    t = Ticket(2)
    t.abort()
    t.job_done({})
    assert t.done.is_set() and t.aborted
    calls: List[str] = []
    job = Job([Item(1, "t")], lambda f: calls.append("done"), lambda: calls.append("abort"))
    job.finish({})
    job.cancel()
    job.finish({})
    assert calls == ["done"]


def test_ledger_counts_only_contiguous_batches(tmp_path):
    """A batch written while an earlier one is not (aborted) does not move
    ``done_batches`` past the gap: a restart resumes at the unwritten batch."""
    path = str(tmp_path / "ledger.json")
    ledger = Ledger(path, {"idproxy": "v1"})
    ledger.set("a.jsonl", {"sha256": "x", "batch_size": 2, "batches": 4, "done_batches": 0,
                           "items": 8, "status": "in_progress"})
    assert ledger.batch_done("a.jsonl", 0)[0]["done_batches"] == 1
    entry, finished = ledger.batch_done("a.jsonl", 2)  # batch 1 was aborted
    assert entry["done_batches"] == 1 and not finished
    assert ledger_entry(path, "a.jsonl")["done_batches"] == 1
    entry, finished = ledger.batch_done("a.jsonl", 3)
    assert entry["done_batches"] == 1 and entry["status"] == "in_progress" and not finished
    entry, finished = ledger.batch_done("a.jsonl", 1)  # the retried batch
    assert entry["done_batches"] == 4 and entry["status"] == "done" and finished
    assert not ledger.batch_done("a.jsonl", 3)[1]  # a late duplicate finishes nothing
    assert ledger_entry(path, "a.jsonl")["status"] == "done"
    # a new partition (content changed) forgets the batches written ahead
    ledger.set("b.jsonl", {"sha256": "1", "batch_size": 2, "batches": 3, "done_batches": 0,
                           "items": 6, "status": "in_progress"})
    ledger.batch_done("b.jsonl", 2)
    ledger.set("b.jsonl", {"sha256": "2", "batch_size": 2, "batches": 3, "done_batches": 0,
                           "items": 6, "status": "in_progress"})
    assert ledger.batch_done("b.jsonl", 0)[0]["done_batches"] == 1
    assert ledger.batch_done("b.jsonl", 1)[0]["done_batches"] == 2


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


def test_http_limits_protocol_errors_and_timeout(tmp_path):
    """Binds loopback by default; 411 without Content-Length or chunked, 400 for a bad
    one, 413 for an oversize body (also one above the drain limit, connection
    closed); 504 when the records are not written within request_timeout_s — the
    items stay queued and are written."""
    assert ServeConfig(idproxy="x", idproxy_store="y").host == "127.0.0.1"
    gate = threading.Event()
    method = StubRecords(gate)
    service = stub_service(tmp_path, method, http_port=0, request_timeout_s=0.3,
                           max_body_bytes=1000).start()
    base = "http://%s:%d" % service.address
    try:
        assert service.address[0] == "127.0.0.1"
        head = b"POST /items HTTP/1.1\r\nHost: x\r\n"
        for extra, status in ((b"", b"411"), (b"Transfer-Encoding: chunked\r\n", b"411"),
                              (b"Content-Length: abc\r\n", b"400"),
                              (b"Content-Length: -3\r\n", b"400"),
                              (b"Content-Length: 100000000\r\n", b"413")):
            answer = raw_http(service.address, head + extra + b"\r\n")
            assert answer.startswith(b"HTTP/1.1 " + status + b" "), (extra, answer[:80])
            assert b"Connection: close" in answer
        status, body, _ = post_items(base, [{"item_id": 1, "text": "slow"}])
        assert status == 504 and "stay queued" in body["error"] and body["item_ids"] == [1]
        gate.set()
        wait_for(lambda: bool(service.stores["idproxy"].contains([1])[0]), 10, "item 1")
    finally:
        gate.set()
        service.stop()


def test_http_unexpected_error_is_a_500(tmp_path, monkeypatch):
    """A bug in a handler is logged and answered 500 with a JSON body (not a dropped
    connection), and the server keeps serving."""
    service = stub_service(tmp_path, StubRecords(), http_port=0).start()
    base = "http://%s:%d" % service.address
    try:
        monkeypatch.setattr(service, "health", lambda: 1 / 0)
        status, body, _ = http("GET", f"{base}/health")
        assert status == 500 and "ZeroDivisionError" in body["error"]
        monkeypatch.undo()
        assert "ZeroDivisionError" in service.health()["last_error"]
        assert post_items(base, [{"item_id": 1, "text": "fine"}])[0] == 200
    finally:
        service.stop()


def test_stop_answers_waiting_requests_and_closes_connections(tmp_path):
    """stop() finishes the batch being written, answers a request waiting for queued
    items with 503 (not a 504 after request_timeout_s), ends idle keep-alive
    connections (a request on one after stop must not be served: its items would
    be acknowledged and never written) and leaves no connection thread behind."""
    import http.client

    gate = threading.Event()
    method = StubRecords(gate)
    service = stub_service(tmp_path, method, http_port=0, request_timeout_s=60).start()
    host, port = service.address
    base = f"http://{host}:{port}"
    try:
        assert post_items(base, [{"item_id": 1, "text": "a"}], "?wait=0")[0] == 202
        assert method.entered.wait(10)  # the writer holds item 1's batch
        waiting: List[Any] = []
        t = threading.Thread(target=lambda: waiting.append(
            post_items(base, [{"item_id": 2, "text": "b"}])))
        t.start()
        wait_for(lambda: len(service.queue) == 1, 10, "item 2 queued")
        idle = http.client.HTTPConnection(host, port, timeout=30)
        idle.request("GET", "/health")
        resp = idle.getresponse()
        assert resp.status == 200 and not resp.will_close
        resp.read()
        stopper = threading.Thread(target=service.stop)
        t0 = time.monotonic()
        stopper.start()
        time.sleep(0.1)
        gate.set()  # the batch being written finishes
        stopper.join(15)
        assert not stopper.is_alive() and time.monotonic() - t0 < 10
        t.join(10)
        status, body, headers = waiting[0]
        assert status == 503 and "stopping" in body["error"] and headers["Retry-After"]
        assert bool(service.stores["idproxy"].contains([1])[0])  # (stores not ours)
        assert not bool(service.stores["idproxy"].contains([2])[0])
        with pytest.raises((http.client.HTTPException, OSError)):
            idle.request("POST", "/items?wait=0", json.dumps([{"item_id": 3, "text": "c"}]))
            idle.getresponse()
        idle.close()
        assert not [th for th in threading.enumerate() if th.name == "serve-items-http-conn"]
        # after stop nothing is queued that nobody would write
        ticket = service.submit([Item(4, "d")], block=False)
        assert ticket is not None and ticket.aborted and len(service.queue) == 0
    finally:
        gate.set()
        service.stop()
        service.stores["idproxy"].close()


def test_failed_start_closes_own_stores(tmp_path):
    """A start that fails (port taken) stops the service: the stores it opened are
    closed, no thread is left."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        cfg = ServeConfig(idproxy="stub", idproxy_store=str(tmp_path / "store"), sync=False,
                          http_port=taken.getsockname()[1])
        service = ItemService(cfg, [StubRecords()])  # opens its own store
        with pytest.raises(OSError):
            service.start()
    assert not service._threads and service.wait(0)
    with pytest.raises(ValueError, match="closed"):
        service.stores["idproxy"].get([1])


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


def test_writer_error_mid_file_is_retried_not_skipped(tmp_path, monkeypatch):
    """An unexpected writer error on one batch of a file (e.g. the ledger cannot be
    written) aborts that batch only; the later batches are written, but the ledger
    must not count the aborted one as done: the file is taken up again at it and
    every item ends up in the store. Over HTTP the same error is a 503 naming it."""
    method = StubRecords()
    watch = tmp_path / "watch"
    watch.mkdir()
    service = stub_service(tmp_path, method, watch=str(watch), http_port=0)
    process = service._process
    failed: List[int] = []

    def flaky_process(jobs):
        ids = {it.item_id for j in jobs for it in j.items}
        if ids & {102, 900} and len(failed) < 2 and not (ids & set(failed)):
            failed.extend(sorted(ids))
            raise RuntimeError("disk on fire")
        return process(jobs)

    monkeypatch.setattr(service, "_process", flaky_process)
    service.start()
    ledger = str(watch / ".serve-items-ledger.json")
    try:
        status, body, _ = post_items("http://%s:%d" % service.address,
                                     [{"item_id": 900, "text": "x"}])
        assert status == 503 and "internal error" in body["error"]
        assert "disk on fire" in service.health()["last_error"]
        rows = _write_items(str(watch / "a.jsonl"), 10)  # batches of 2: 102 is in batch 1
        wait_for(lambda: (ledger_entry(ledger, "a.jsonl") or {}).get("status") == "done",
                 20, "a.jsonl done")
        assert failed == [900, 102, 103]
        _, found = service.stores["idproxy"].get([r["item_id"] for r in rows])
        assert found.all(), found
        assert service.health()["files_done"] == 1
    finally:
        service.stop()
        service.stores["idproxy"].close()


def test_watched_file_above_max_file_bytes_is_not_read(tmp_path):
    """A file larger than max_file_bytes is marked failed in the ledger (naming the
    limit), not read into memory; the other files are processed; it is taken up
    again once it changes."""
    method = StubRecords()
    watch = tmp_path / "watch"
    watch.mkdir()
    big = _write_items(str(watch / "big.jsonl"), 20)
    small = [{"item_id": 7, "text": "s"}, {"item_id": 8, "text": "t"}]
    write_jsonl(str(watch / "small.jsonl"), small)
    assert os.path.getsize(watch / "small.jsonl") < 200 < os.path.getsize(watch / "big.jsonl")
    service = stub_service(tmp_path, method, watch=str(watch), max_file_bytes=200).start()
    ledger = str(watch / ".serve-items-ledger.json")
    try:
        wait_for(lambda: (ledger_entry(ledger, "small.jsonl") or {}).get("status") == "done"
                 and ledger_entry(ledger, "big.jsonl") is not None, 20, "both files seen")
        entry = ledger_entry(ledger, "big.jsonl")
        assert entry["status"] == "failed" and "max_file_bytes" in entry["errors"][0]
        assert entry["size"] == os.path.getsize(watch / "big.jsonl")
        _, found = service.stores["idproxy"].get([r["item_id"] for r in big])
        assert not found.any() and method.calls == 1  # only small.jsonl's batch
        time.sleep(0.15)
        assert method.calls == 1  # not retried while unchanged
        write_jsonl(str(watch / "big.jsonl"), big[:2])  # split: now small enough
        wait_for(lambda: ledger_entry(ledger, "big.jsonl")["status"] == "done", 20, "big")
        assert service.stores["idproxy"].contains([r["item_id"] for r in big[:2] + small]).all()
    finally:
        service.stop()
        service.stores["idproxy"].close()


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
    # a ledger whose partition does not match what this run reads (other limits: here
    # 9 items recorded, 10 read; or batches larger than the queue): from the start
    store = ItemStore.open(str(tmp_path / "store"), StubRecords().schema)
    store.delete(store.ids())
    store.close()
    path_b = str(watch / "b.jsonl")
    rows_b = [{"item_id": 200 + i, "text": f"b {i}"} for i in range(10)]
    write_jsonl(path_b, rows_b)
    data_b, st_b = open(path_b, "rb").read(), os.stat(path_b)
    path_c = str(watch / "c.jsonl")
    rows_c = [{"item_id": 300 + i, "text": f"c {i}"} for i in range(10)]
    write_jsonl(path_c, rows_c)
    data_c, st_c = open(path_c, "rb").read(), os.stat(path_c)
    files = json.load(open(ledger))["files"]
    files["b.jsonl"] = {**entry, "size": st_b.st_size, "mtime_ns": st_b.st_mtime_ns,
                        "sha256": hashlib.sha256(data_b).hexdigest(), "items": 9}
    files["c.jsonl"] = {**entry, "size": st_c.st_size, "mtime_ns": st_c.st_mtime_ns,
                        "sha256": hashlib.sha256(data_c).hexdigest(), "batch_size": 5,
                        "batches": 2, "done_batches": 1}
    with open(ledger, "w") as f:
        json.dump({"format": LEDGER_FORMAT, "versions": {"idproxy": "stub-v1"},
                   "files": files}, f)
    service = stub_service(tmp_path, StubRecords(), watch=str(watch), queue_items=4,
                           max_items_per_request=4).start()
    try:
        wait_for(lambda: all((ledger_entry(ledger, n) or {}).get("status") == "done"
                             for n in ("b.jsonl", "c.jsonl")), 20, "b and c done")
        _, found = service.stores["idproxy"].get([r["item_id"] for r in rows_b + rows_c])
        assert found.all(), found
        assert ledger_entry(ledger, "c.jsonl")["batch_size"] == 2
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
        wait_for(lambda: all((ledger_entry(ledger, n) or {}).get("status") == "done"
                             for n in ("a.jsonl", "b.jsonl", "c.jsonl")) and
                 service.health()["batches"] == 2 + 5 + 5, 20, "reprocessed for v2")
        assert service.stores["idproxy"].versions([100, 103, 200, 309]) == ["stub-v2"] * 4
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
    status, body, _ = post_items(base, b"[" * 4000)  # too deep for the JSON decoder
    assert status == 400 and "nested too deeply" in body["error"]
    # ids that are digits to str.isdigit but not to int(), or too long for int()
    for raw in (b"\xb2", b"1" * 5000, b"-1", b"%31", str(2 ** 63).encode()):
        answer = raw_http(service.address, b"GET /items/" + raw + b" HTTP/1.1\r\n"
                          b"Host: x\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 ") and b'"field": "item_id"' in answer, raw
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
        log1.close()
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
    log2.close()
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
