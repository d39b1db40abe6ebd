"""The ``torchrec-mm`` console script.

Each subcommand lives in the package it drives; that module exposes
``register(subparsers)`` which adds its parser and sets ``func(args) -> int``.
"""

import argparse
import importlib
import logging
import os
import sys
from typing import List, Optional

# (subcommand module, in the order `--help` lists them)
_COMMAND_MODULES = [
    "torchrec_mm.demo",
    "torchrec_mm.experiment",
    "torchrec_mm.data.cli",
    "torchrec_mm.content.cli",
    "torchrec_mm.training.cli",
    "torchrec_mm.idproxy.cli",
    "torchrec_mm.qarm.cli",
    "torchrec_mm.redrec.cli",
    "torchrec_mm.serving.cli",
]


def build_parser() -> argparse.ArgumentParser:
    from torchrec_mm import __version__

    parser = argparse.ArgumentParser(
        prog="torchrec-mm",
        description="Multimodal LLM item content for TorchRec rankers "
        "(IDProxy, QARM, RED-Rec plugins).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # DataError and friends: a clear one-line message, no traceback.
        if args.verbose:
            raise
        print(f"torchrec-mm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
