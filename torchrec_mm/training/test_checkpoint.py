import os

import pytest
import torch

from torchrec_mm.training import checkpoint as ckpt


def _state(v: float):
    return {"model": {"w": torch.full((3, 2), v), "b": torch.arange(4.0) * v},
            "optimizer": {"state": {"w": {"step": torch.tensor(7.0)}},
                          "param_groups": [{"lr": 0.1, "params": ["w", "b"]}]},
            "progress": {"step": 12, "epoch": 1, "curve": [{"step": 10, "loss": 0.5}],
                         "name": None}}


def test_round_trip(tmp_path):
    ckpt.save_checkpoint(str(tmp_path), 12, _state(2.0))
    latest = ckpt.latest_checkpoint(str(tmp_path))
    step, skeleton, tensors = ckpt.read_checkpoint(latest)
    assert step == 12
    restored = ckpt.restore(_state(0.0), skeleton, tensors)
    expected = _state(2.0)
    torch.testing.assert_close(restored["model"]["w"], expected["model"]["w"])
    torch.testing.assert_close(restored["model"]["b"], expected["model"]["b"])
    assert restored["optimizer"]["param_groups"] == expected["optimizer"]["param_groups"]
    assert restored["progress"] == expected["progress"]


def test_shape_mismatch_is_an_error(tmp_path):
    ckpt.save_checkpoint(str(tmp_path), 1, _state(1.0))
    _, skeleton, tensors = ckpt.read_checkpoint(ckpt.latest_checkpoint(str(tmp_path)))
    target = _state(0.0)
    target["model"]["w"] = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="'/model/w' has shape"):
        ckpt.restore(target, skeleton, tensors)


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(str(tmp_path), 1, _state(1.0))
    good = ckpt.latest_checkpoint(str(tmp_path))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_tensors", boom)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(str(tmp_path), 2, _state(2.0))
    assert ckpt.latest_checkpoint(str(tmp_path)) == good
    assert sorted(os.listdir(tmp_path)) == ["LATEST", "step-000000001"]


def test_keeps_the_latest_n(tmp_path):
    for s in range(1, 5):
        ckpt.save_checkpoint(str(tmp_path), s, _state(float(s)), keep=2)
    kept = sorted(d for d in os.listdir(tmp_path) if d.startswith("step-"))
    assert kept == ["step-000000003", "step-000000004"]


def test_unsupported_values_are_rejected(tmp_path):
    with pytest.raises(TypeError, match="at '/x'"):
        ckpt.save_checkpoint(str(tmp_path), 1, {"x": object()})


def test_incomplete_latest_is_reported(tmp_path):
    ckpt.save_checkpoint(str(tmp_path), 1, _state(1.0))
    latest = ckpt.latest_checkpoint(str(tmp_path))
    os.remove(os.path.join(latest, "tensors.safetensors"))
    with pytest.raises(FileNotFoundError, match="incomplete"):
        ckpt.latest_checkpoint(str(tmp_path))
