import argparse
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from torchrec_mm.data import cli
from torchrec_mm.data.io import load_meta
from torchrec_mm.data.schema import DataError
from torchrec_mm.data.split import load_split


def run(*argv):
    parser = argparse.ArgumentParser(prog="torchrec-mm")
    sub = parser.add_subparsers(dest="command")
    cli.register(sub)
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_synth_split_stats_validate(tmp_path, capsys):
    out = str(tmp_path / "synth")
    assert run("data", "synth", "--out", out, "--users", "50", "--items", "80",
               "--interactions", "3000", "--seed", "3", "--topics", "6") == 0
    meta = load_meta(out)
    assert meta.num_interactions == 3000 and meta.source["config"]["num_topics"] == 6
    # --scenario-shares reaches the generator: homefeed dominates when asked to
    skew = str(tmp_path / "skew")
    assert run("data", "synth", "--out", skew, "--users", "50", "--items", "80",
               "--interactions", "3000", "--scenario-shares", "0.96,0.02,0.02") == 0
    assert load_meta(skew).source["config"]["scenario_shares"] == [0.96, 0.02, 0.02]
    def homefeed_share(path):
        scen = pq.read_table(os.path.join(path, "interactions")).column("scenario")
        return (scen.to_numpy(zero_copy_only=False) == "homefeed").mean()

    assert homefeed_share(skew) > 0.9 > homefeed_share(out)
    # so do the intent shares
    quiet = str(tmp_path / "quiet")
    assert run("data", "synth", "--out", quiet, "--users", "50", "--items", "80",
               "--interactions", "3000", "--intent-share-homefeed", "0",
               "--intent-share-sparse", "0.9") == 0
    config = load_meta(quiet).source["config"]
    assert (config["intent_share_homefeed"], config["intent_share_sparse"]) == (0.0, 0.9)
    for flag in ("--intent-share-homefeed", "--intent-share-sparse"):
        with pytest.raises(SystemExit):
            run("data", "synth", "--out", str(tmp_path / "bad"), flag, "1.5")
    # and the popularity knobs
    flat = str(tmp_path / "flat")
    assert run("data", "synth", "--out", flat, "--users", "50", "--items", "80",
               "--interactions", "3000", "--zipf-exponent", "0", "--pop-shares", "0,0,0.5",
               "--quality-std", "0") == 0
    config = load_meta(flat).source["config"]
    assert (config["zipf_exponent"], config["pop_share"], config["quality_std"]) == \
        (0.0, [0.0, 0.0, 0.5], 0.0)
    for flag, bad in (("--zipf-exponent", "-1"), ("--quality-std", "nan"),
                      ("--pop-shares", "0,0"), ("--pop-shares", "0,1.5,0")):
        with pytest.raises(SystemExit):
            run("data", "synth", "--out", str(tmp_path / "bad"), flag, bad)
    for bad in ("0.5,0.5", "0.9,0.2,0.1", "1,0,0", "a,b,c"):
        with pytest.raises(SystemExit):
            run("data", "synth", "--out", str(tmp_path / "bad"), "--scenario-shares", bad)
    with pytest.raises(FileExistsError):
        run("data", "synth", "--out", out, "--users", "50", "--items", "80",
            "--interactions", "3000")
    assert run("data", "split", "--data", out, "--cold-item-frac", "0.2") == 0
    assert load_split(out).info["cold_item_frac"] == 0.2
    capsys.readouterr()
    assert run("data", "stats", "--data", out) == 0
    text = capsys.readouterr().out
    for fragment in ("interactions   3000", "CTR", "homefeed", "search", "ads", "cold items"):
        assert fragment in text
    assert run("data", "validate", "--data", out) == 0
    assert "OK" in capsys.readouterr().out

    # corrupt one row: validate names it, --skip-bad counts it (exit 1)
    part = os.path.join(out, "interactions", "part-00000.parquet")
    t = pq.read_table(part)
    ts = t.column("timestamp").to_pylist()
    ts[5] = -1
    pq.write_table(t.set_column(t.schema.get_field_index("timestamp"), "timestamp",
                                pa.array(ts, pa.int64())), part)
    with pytest.raises(DataError, match="record 5, field 'timestamp'"):
        run("data", "validate", "--data", out)
    assert run("data", "validate", "--data", out, "--skip-bad") == 1
    assert "1 bad rows" in capsys.readouterr().out


def test_import_cli(tmp_path, capsys):
    src = tmp_path / "reviews.json"
    src.write_text('{"reviewerID": "A", "asin": "B", "overall": 5, "unixReviewTime": 1}\n'
                   'not json\n')
    out = str(tmp_path / "ds")
    with pytest.raises(DataError, match="line 2"):
        run("data", "import", "--format", "amazon2018", "--src", str(src), "--out", out)
    assert run("data", "import", "--format", "amazon2018", "--src", str(src), "--out", out,
               "--skip-bad") == 0
    assert "skipped 1 bad records" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--items"):
        run("data", "import", "--format", "amazon2018", "--src", str(src), "--out", out,
            "--items", "x", "--overwrite")


def test_help_texts(capsys):
    for sub in ("import", "synth", "split", "stats", "validate"):
        with pytest.raises(SystemExit) as e:
            run("data", sub, "--help")
        assert e.value.code == 0
        assert "--" in capsys.readouterr().out
