import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from torchrec_mm.content import encode_job
from torchrec_mm.content.encode_job import encode_items, read_items
from torchrec_mm.content.store import ContentStore
from torchrec_mm.content.testing import item_texts, write_items
from torchrec_mm.data.schema import DataError

N_ITEMS = 30
JOB = dict(batch_size=4, chunk_size=4, group_sample=12, progress=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_items(str(tmp_path_factory.mktemp("data")), item_texts(N_ITEMS, seed=1))


@pytest.fixture(scope="module")
def reference(dataset, minilm, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref"))
    assert encode_items(dataset, out, encoder=minilm, **JOB) == os.path.join(out, "manifest.json")
    return out


def _chunks(out):
    return {os.path.basename(p): load_file(p)
            for p in sorted(glob.glob(os.path.join(out, "chunks", "*.safetensors")))}


def _assert_same_output(out, ref):
    a, b = _chunks(out), _chunks(ref)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)
    assert not glob.glob(os.path.join(out, "**", "*.tmp"), recursive=True)
    assert not glob.glob(os.path.join(out, "**", ".*"), recursive=True)


def test_layout_and_manifest(reference, minilm):
    manifest = json.load(open(os.path.join(reference, "manifest.json")))
    assert manifest["num_items"] == manifest["num_encoded"] == N_ITEMS
    assert len(manifest["chunks"]) == 8  # ceil(30 / 4)
    assert manifest["dim"] == 384 and manifest["num_groups"] == 3
    groups = manifest["layer_groups"]
    assert [i for g in groups for i in g] == list(range(1, 7))
    assert manifest["layer_grouping"]["sample_size"] == 12
    assert manifest["encoder"]["layer_groups"] == groups
    chunk = load_file(os.path.join(reference, manifest["chunks"][0]["file"]))
    assert chunk["pooled"].dtype == torch.float16 and chunk["pooled"].shape == (4, 384)
    assert chunk["layer_groups"].shape == (4, 3, 384)
    assert chunk["item_id"].dtype == torch.int64 and chunk["item_id"].tolist() == [0, 1, 2, 3]


def test_resume_after_injected_crash(dataset, reference, minilm, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    real_save = encode_job.save_tensors
    calls = []

    def crashing_save(path, tensors, metadata=None):
        calls.append(path)
        if len(calls) == 3:  # die while writing the 3rd chunk, leaving a temp file
            with open(os.path.join(os.path.dirname(path),
                                   f".{os.path.basename(path)}.dead.tmp"), "wb") as f:
                f.write(b"partial")
            raise RuntimeError("injected crash")
        real_save(path, tensors, metadata)

    monkeypatch.setattr(encode_job, "save_tensors", crashing_save)
    with pytest.raises(RuntimeError, match="injected"):
        encode_items(dataset, out, encoder=minilm, **JOB)
    assert len(_chunks(out)) == 1  # pooling.safetensors + 1 chunk before the crash
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    with pytest.raises(FileNotFoundError, match="resume"):
        ContentStore(out)

    calls.clear()
    monkeypatch.setattr(encode_job, "save_tensors", lambda *a, **k: (calls.append(a[0]),
                                                                   real_save(*a, **k)))
    assert encode_items(dataset, out, encoder=minilm, **JOB)
    assert len(calls) == 7  # only the missing chunks were encoded
    _assert_same_output(out, reference)
    calls.clear()
    encode_items(dataset, out, encoder=minilm, **JOB)  # complete: nothing to do
    assert calls == []


def test_resume_after_sigkill(dataset, reference, tmp_path):
    """A real `kill -9` of a running `torchrec-mm encode` (slowed down), then resume."""
    out = str(tmp_path / "out")
    script = textwrap.dedent(f"""
        import argparse, sys, time
        from torchrec_mm.content import cli, encode_job
        save = encode_job.save_tensors
        def slow_save(*a, **k):
            time.sleep(0.25)
            save(*a, **k)
        encode_job.save_tensors = slow_save
        parser = argparse.ArgumentParser()
        cli.register(parser.add_subparsers())
        args = parser.parse_args(["encode", "--data", {dataset!r}, "--out", {out!r},
            "--max-length", "40", "--batch-size", "4", "--chunk-size", "4",
            "--group-sample", "12", "--no-progress"])
        sys.exit(args.func(args))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if len(glob.glob(os.path.join(out, "chunks", "*.safetensors"))) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    done = len(glob.glob(os.path.join(out, "chunks", "*.safetensors")))
    assert 2 <= done < 8 and not os.path.exists(os.path.join(out, "manifest.json"))
    # resume in a fresh process-equivalent: a new encoder from the same config
    from torchrec_mm.content.encoder import ContentEncoderConfig

    assert encode_items(dataset, out, ContentEncoderConfig(max_length=40), **JOB)
    _assert_same_output(out, reference)


def test_two_ranks_file_protocol(dataset, reference, minilm, tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(TimeoutError):  # rank 1 waits for rank 0's job.json
        encode_items(dataset, out, encoder=minilm, rank=1, world_size=2, wait_timeout=0.2, **JOB)
    assert encode_items(dataset, out, encoder=minilm, rank=0, world_size=2, **JOB) is None
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    manifest = encode_items(dataset, out, encoder=minilm, rank=1, world_size=2, **JOB)
    assert manifest is not None
    store, ref = ContentStore(out), ContentStore(reference)
    assert store.layer_groups == ref.layer_groups
    assert len(store) == N_ITEMS and not store.missing.any()
    chunk_ids = [load_file(os.path.join(out, c["file"]))["item_id"]
                 for c in store.manifest["chunks"] if c["rank"] == 1]
    assert all((ids % 2 == 1).all() for ids in chunk_ids)  # rank 1 = odd item ids
    for field in ("pooled", "emb_token", "layer_groups"):
        torch.testing.assert_close(store.as_table(field), ref.as_table(field),
                                   atol=2e-3, rtol=2e-3)


def test_settings_mismatch_and_overwrite(dataset, minilm, tmp_path):
    out = str(tmp_path / "out")
    encode_items(dataset, out, encoder=minilm, **JOB)
    with pytest.raises(FileExistsError, match="chunk_size"):
        encode_items(dataset, out, encoder=minilm, **dict(JOB, chunk_size=8))
    encode_items(dataset, out, encoder=minilm, overwrite=True, **dict(JOB, chunk_size=8))
    assert len(ContentStore(out).manifest["chunks"]) == 4
    assert len(_chunks(out)) == 4


def test_bad_items(tmp_path, minilm):
    with pytest.raises(FileNotFoundError, match="items.parquet"):
        read_items(str(tmp_path))
    bad = write_items(str(tmp_path / "dup"), ["a", "b", "c", "d"], item_ids=[0, 1, 2, 1])
    with pytest.raises(DataError, match=r"record 3, field 'item_id'.*duplicate id 1"):
        read_items(bad)
    neg = write_items(str(tmp_path / "neg"), ["a", "b"], item_ids=[0, -5])
    with pytest.raises(DataError, match=r"record 1, field 'item_id'"):
        read_items(neg)
    items = read_items(write_items(str(tmp_path / "ok"), ["b", "a"], item_ids=[7, 2],
                                   image_paths=["img/x.png", None]))
    assert items.item_ids.tolist() == [2, 7] and items.texts == ["a", "b"]
    assert items.num_items == 8 and items.rows.tolist() == [1, 0]
    assert items.image_paths[1] == os.path.join(str(tmp_path / "ok"), "img", "x.png")


def test_cli_arguments(dataset, minilm, tmp_path, monkeypatch):
    from torchrec_mm.content import cli

    seen = {}

    def fake_encoder(config):
        seen["config"] = config
        return minilm

    monkeypatch.setattr(encode_job, "ContentEncoder", fake_encoder)
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    out = str(tmp_path / "out")
    args = parser.parse_args(["encode", "--data", dataset, "--out", out, "--max-length", "40",
                              "--no-bucket", "--chunk-size", "16", "--group-sample", "0",
                              "--store-dtype", "float32", "--no-progress"])
    assert args.bucket is False
    assert args.func(args) == 0
    assert seen["config"].max_length == 40 and seen["config"].model_path is None
    store = ContentStore(out)
    assert store.manifest["fields"]["pooled"]["dtype"] == "float32"
    assert store.manifest["layer_grouping"]["method"] == "equal-split"
    assert store.layer_groups == [[1, 2], [3, 4], [5, 6]]
