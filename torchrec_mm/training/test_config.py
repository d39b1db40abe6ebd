import pytest

from torchrec_mm.training.trainer import TrainConfig, load_train_config


@pytest.mark.parametrize("field,value,message", [
    ("embedding_optimizer", "lamb", "unknown embedding optimizer 'lamb'"),
    ("dense_optimizer", "rmsprop", "unknown dense optimizer"),
    ("sharding_type", "diagonal", "unknown sharding type"),
    ("batch_size", 0, "batch_size must be >= 1"),
    ("max_steps", 0, "max_steps must be >= 1"),
])
def test_invalid_config_is_rejected(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(data="d", out="o", **{field: value})


def test_yaml_config_with_overrides(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("batch_size: 64\nranker: {kind: dlrm_dcn, embedding_dim: 8}\n")
    cfg = load_train_config(str(path), data="d", out="o", epochs=3, seed=None)
    assert (cfg.batch_size, cfg.epochs, cfg.seed) == (64, 3, 0)
    assert (cfg.ranker.kind, cfg.ranker.embedding_dim) == ("dlrm_dcn", 8)
    path.write_text("batch: 64\n")
    with pytest.raises(ValueError, match="unknown option"):
        load_train_config(str(path), data="d", out="o")


def test_run_config_of_an_older_version_compares_equal():
    """A config.json written before options were added (here the ranker's multi-task
    fields) is the same run as today's config with those options at their defaults, so
    it resumes and experiments reuse it; a real difference still shows."""
    import json

    from torchrec_mm.models.rankers import RankerConfig
    from torchrec_mm.training.trainer import TrainConfig, normalized_config

    cfg = TrainConfig(data="d", out="o", ranker=RankerConfig(kind="dlrm"))
    now = json.loads(json.dumps(cfg.to_dict()))
    old = json.loads(json.dumps(cfg.to_dict()))
    for k in ("tasks", "num_experts", "task_weights"):
        del old["ranker"][k]
    assert old != now and normalized_config(old) == now
    old["ranker"]["kind"] = "dlrm_dcn"
    assert normalized_config(old) != now
    assert normalized_config({"no_such_option": 1}) == {"no_such_option": 1}
