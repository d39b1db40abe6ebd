"""``torchrec-mm serve-items``: the new-item generation service
(:mod:`torchrec_mm.serving.service`).

Also runnable as ``python -m torchrec_mm.serving.cli serve-items ...``.
"""

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any, Dict, List, Optional

if TYPE_CHECKING:
    from torchrec_mm.serving.service import ServeConfig


def _defaults() -> Dict[str, Any]:
    """:class:`~torchrec_mm.serving.service.ServeConfig`'s field defaults: the flags'
    defaults are read from the dataclass, not repeated here."""
    from torchrec_mm.serving.service import ServeConfig

    return {f.name: f.default for f in dataclasses.fields(ServeConfig)}


def register(subparsers: Any) -> None:
    from torchrec_mm.qarm.codes import INDEXES

    d = _defaults()
    p = subparsers.add_parser(
        "serve-items", help="encode new items and write their proxies/codes to item stores",
        description="Takes new items ({\"item_id\": int, \"text\": str, \"image_path\"?: str}) "
                    "from *.jsonl files dropped in --watch DIR and/or POST /items on "
                    "--http-port, encodes them in batches with the trained IDProxy and/or "
                    "QARM models and writes their records (torchrec_mm.serving.fields) to "
                    "the item stores, one atomic put per batch. Idempotent and resumable "
                    "(a processed-file ledger), bounded queue with back-pressure (HTTP 503). "
                    "--backfill DATA_DIR first writes every catalogue item's records from "
                    "the artefacts. Runs until SIGINT/SIGTERM.")
    m = p.add_argument_group("models and stores (IDProxy and/or QARM)")
    m.add_argument("--idproxy", metavar="PROXIES_DIR", help="output of `idproxy fit`")
    m.add_argument("--idproxy-store", metavar="LOC",
                   help="item store of the IDProxy records (directory, .db or redis://)")
    m.add_argument("--qarm-align", metavar="ALIGN_DIR", help="output of `qarm align`")
    m.add_argument("--qarm-codes", metavar="CODES_DIR", help="output of `qarm codes`")
    m.add_argument("--qarm-store", metavar="LOC", help="item store of the QARM records")
    m.add_argument("--z-rank", type=int, default=d["z_rank"],
                   help="principal components per layer group in the IDProxy 'z' field; "
                        "the ranker's idproxy z_rank (default %(default)s; 0: full states)")
    m.add_argument("--vq-index", choices=INDEXES, default=d["vq_index"],
                   help="VQ search of new items' QARM codes: flat = exact; ivf / hnsw = "
                        "approximate faiss index, built at start (minutes for millions of "
                        "codebook items); auto = flat up to the codes' exact_max_items "
                        "codebook items, else ivf (default %(default)s)")
    m.add_argument("--image-root", metavar="DIR", default=d["image_root"],
                   help="base of relative image_path values sent over HTTP (default: the "
                        "current directory; watched files: the file's directory). Only "
                        "vision-language encoders read images")
    m.add_argument("--device", default=d["device"],
                   help="torch device of the encoders (default %(default)s)")
    s = p.add_argument_group("sources")
    s.add_argument("--watch", metavar="DIR", help="directory watched for *.jsonl item files")
    s.add_argument("--ledger", metavar="PATH",
                   help="processed-file ledger (default DIR/.serve-items-ledger.json)")
    s.add_argument("--http-port", type=int, default=d["http_port"],
                   help="serve HTTP (0: any free port; default: no HTTP)")
    s.add_argument("--host", default=d["host"], help="HTTP bind address (default %(default)s)")
    s.add_argument("--backfill", metavar="DATA_DIR",
                   help="first write the records of every catalogue item of this dataset "
                        "from the artefacts (no encoding)")
    lim = p.add_argument_group("limits")
    lim.add_argument("--batch-size", type=int, default=d["batch_size"],
                     help="items per batch / put (default %(default)s)")
    lim.add_argument("--queue-items", type=int, default=d["queue_items"],
                     help="queue capacity in items; beyond, POST /items answers 503 and the "
                          "watcher waits (default %(default)s)")
    lim.add_argument("--max-body-bytes", type=int, default=d["max_body_bytes"],
                     help="largest POST /items body in bytes, else 413 (default %(default)s)")
    lim.add_argument("--max-items-per-request", type=int, default=d["max_items_per_request"],
                     help="most items in one POST /items, else 413 (default %(default)s)")
    lim.add_argument("--max-text-chars", type=int, default=d["max_text_chars"],
                     help="longest accepted item text in characters (default %(default)s)")
    lim.add_argument("--max-file-bytes", type=int, default=d["max_file_bytes"],
                     help="largest watched file read, in bytes; a larger one is marked "
                          "failed in the ledger, unread: split it (default %(default)s = "
                          f"{d['max_file_bytes'] / 2 ** 20:g} MiB)")
    lim.add_argument("--capacity", type=int, default=d["capacity"],
                     help="item ids must be below this (e.g. the ranker's table size; "
                          "default: any id below 2**63)")
    lim.add_argument("--linger-s", type=float, default=d["linger_s"],
                     help="an idle writer waits this long in seconds for more items to "
                          "batch (default %(default)s)")
    lim.add_argument("--poll-s", type=float, default=d["poll_s"],
                     help="watch interval in seconds (default %(default)s)")
    lim.add_argument("--min-file-age-s", type=float, default=d["min_file_age_s"],
                     help="read a watched file once its mtime is this old, in seconds "
                          "(default %(default)s)")
    lim.add_argument("--request-timeout-s", type=float, default=d["request_timeout_s"],
                     help="seconds POST /items waits for its records to be written before "
                          "answering 504 (the items stay queued; default %(default)s)")
    lim.add_argument("--retry-after-s", type=int, default=d["retry_after_s"],
                     help="Retry-After header of a 503, in whole seconds (default "
                          "%(default)s)")
    lim.add_argument("--retry-initial-s", type=float, default=d["retry_initial_s"],
                     help="first wait in seconds before retrying a put to a store that is "
                          "down; doubled after each failure (default %(default)s)")
    lim.add_argument("--retry-max-s", type=float, default=d["retry_max_s"],
                     help="longest wait in seconds between retries of a put to a store "
                          "that is down (default %(default)s)")
    lim.add_argument("--backfill-batch-size", type=int, default=d["backfill_batch_size"],
                     help="records per put of --backfill (default %(default)s)")
    lim.add_argument("--no-sync", dest="sync", action="store_false", default=d["sync"],
                     help="embedded stores: no fsync per put (still atomic on a kill)")
    lim.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_serve)


def config_from_args(args: argparse.Namespace) -> "ServeConfig":
    """The :class:`~torchrec_mm.serving.service.ServeConfig` of parsed ``serve-items``
    flags (raises its ``ValueError`` on an invalid value or combination)."""
    from torchrec_mm.serving.service import ServeConfig

    return ServeConfig(
        idproxy=args.idproxy, idproxy_store=args.idproxy_store, qarm_align=args.qarm_align,
        qarm_codes=args.qarm_codes, qarm_store=args.qarm_store, watch=args.watch,
        ledger=args.ledger, http_port=args.http_port, host=args.host,
        batch_size=args.batch_size, linger_s=args.linger_s, queue_items=args.queue_items,
        max_body_bytes=args.max_body_bytes, max_items_per_request=args.max_items_per_request,
        max_text_chars=args.max_text_chars, max_file_bytes=args.max_file_bytes,
        capacity=args.capacity, z_rank=args.z_rank, image_root=args.image_root,
        poll_s=args.poll_s, min_file_age_s=args.min_file_age_s,
        request_timeout_s=args.request_timeout_s, retry_after_s=args.retry_after_s,
        retry_initial_s=args.retry_initial_s, retry_max_s=args.retry_max_s,
        sync=args.sync, device=args.device, vq_index=args.vq_index,
        backfill_batch_size=args.backfill_batch_size)


def _serve(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from torchrec_mm.serving.service import ItemService, backfill, build_methods, open_stores

    config = config_from_args(args)
    serving = config.watch is not None or config.http_port is not None
    if not serving and not args.backfill:
        raise ValueError("nothing to do: give --watch DIR and/or --http-port N "
                         "(and/or --backfill DATA_DIR)")
    if serving and config.qarm_codes and not config.qarm_align:
        raise ValueError("new items need the aligned model: give --qarm-align "
                         "(--qarm-codes alone only backfills)")
    methods = build_methods(config)
    stores = open_stores(config, methods)
    try:
        if args.backfill:
            report = backfill(args.backfill, config, progress=not args.no_progress,
                              methods=methods, stores=stores)
            print(json.dumps({"backfill": report}), flush=True)
        if not serving:
            return 0
        stop = threading.Event()

        def on_signal(signum: int, frame: Any) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        service = ItemService(config, methods, stores)
        try:
            service.start()
            if service.http is not None:
                host, port = service.address
                print(f"serve-items: listening on http://{host}:{port}", flush=True)
            if config.watch:
                print(f"serve-items: watching {config.watch}", flush=True)
            print(f"serve-items: ready; versions {json.dumps(service.versions)}", flush=True)
            while not stop.wait(0.5):
                pass
        finally:
            service.stop()
        print("serve-items: stopped", flush=True)
        return 0
    finally:
        for s in stores.values():
            s.close()


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m torchrec_mm.serving.cli serve-items ...`` (same as the console script)."""
    parser = argparse.ArgumentParser(prog="torchrec-mm")
    parser.add_argument("-v", "--verbose", action="store_true")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"torchrec-mm serve-items: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
