"""Tests of the ``serve-items`` flags: every :class:`ServeConfig` field has a flag that
reaches the config, the flags' defaults are the dataclass's, and an invalid value is
refused with ServeConfig's ``ValueError`` (exit status 2 from the CLI) before anything
is loaded or created."""

import argparse
import dataclasses
import os
from typing import List

import pytest

from torchrec_mm.serving.cli import config_from_args, main, register
from torchrec_mm.serving.service import ServeConfig


def _parse(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="torchrec-mm")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["serve-items", *argv])


def test_every_flag_reaches_serve_config(tmp_path):
    expected = {
        "idproxy": str(tmp_path / "proxies"), "idproxy_store": str(tmp_path / "s-idproxy"),
        "qarm_align": str(tmp_path / "align"), "qarm_codes": str(tmp_path / "codes"),
        "qarm_store": str(tmp_path / "s-qarm.db"), "watch": str(tmp_path / "in"),
        "ledger": str(tmp_path / "ledger.json"), "http_port": 8089, "host": "0.0.0.0",
        "batch_size": 8, "linger_s": 0.25, "queue_items": 600, "max_body_bytes": 4096,
        "max_items_per_request": 300, "max_text_chars": 500, "max_file_bytes": 12345,
        "capacity": 1000, "z_rank": 4, "image_root": str(tmp_path / "images"),
        "poll_s": 2.5, "min_file_age_s": 1.5, "request_timeout_s": 7.0, "retry_after_s": 3,
        "retry_initial_s": 0.05, "retry_max_s": 2.0, "sync": False, "device": "meta",
        "vq_index": "hnsw", "backfill_batch_size": 99,
    }
    defaults = {f.name: f.default for f in dataclasses.fields(ServeConfig)}
    # the test covers every field, each with a value that is not its default (a field
    # the CLI does not forward would keep its default and fail the comparison below)
    assert set(expected) == set(defaults)
    assert [k for k, v in expected.items() if v == defaults[k]] == []
    argv = ["--no-sync"]
    for name, value in expected.items():
        if name != "sync":
            argv += ["--" + name.replace("_", "-"), str(value)]
    config = config_from_args(_parse(argv))
    assert dataclasses.asdict(config) == expected
    assert config.ledger_path == expected["ledger"]


def test_flag_defaults_are_serve_config_defaults():
    config = config_from_args(_parse(["--idproxy", "p", "--idproxy-store", "s"]))
    assert config == ServeConfig(idproxy="p", idproxy_store="s")
    assert config.max_file_bytes == 256 << 20 and config.vq_index == "flat"
    assert config.image_root is None and config.sync is True


@pytest.mark.parametrize("flag, value, message", [
    ("--max-file-bytes", "0", "max_file_bytes must be >= 1, got 0"),
    ("--retry-after-s", "0", "retry_after_s must be >= 1, got 0"),
    ("--retry-initial-s", "-1", "retry_initial_s must be >= 0, got -1.0"),
    ("--retry-max-s", "-0.5", "retry_max_s must be >= 0, got -0.5"),
])
def test_invalid_value_raises_serve_config_error(flag, value, message):
    args = _parse(["--idproxy", "p", "--idproxy-store", "s", flag, value])
    with pytest.raises(ValueError, match=f"^{message}$"):
        config_from_args(args)


def test_cli_refuses_invalid_value_before_starting(tmp_path, capsys):
    watch = tmp_path / "in"
    code = main(["serve-items", "--idproxy", str(tmp_path / "p"), "--idproxy-store",
                 str(tmp_path / "s"), "--watch", str(watch), "--max-file-bytes", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "torchrec-mm serve-items: error: max_file_bytes must be >= 1, got 0" in err
    assert not os.path.exists(watch) and not os.path.exists(tmp_path / "s")


def test_unknown_vq_index_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        _parse(["--idproxy", "p", "--idproxy-store", "s", "--vq-index", "annoy"])
    assert e.value.code == 2
    assert "--vq-index: invalid choice: 'annoy'" in capsys.readouterr().err
