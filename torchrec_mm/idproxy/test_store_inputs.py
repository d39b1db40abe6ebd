"""IDProxy reading its proxies' inputs from an online item store (``store`` option):
the same outputs as the artefact's table when the store holds the same records, the
content fallback for items missing from the store, and a new item served as soon as it
is written — no rebuild of the model."""

import pytest
import yaml
import torch

from torchrec_mm.idproxy.artifacts import group_basis, save_proxies
from torchrec_mm.idproxy.test_modules import D, N_ITEMS, _batch
from torchrec_mm.idproxy.test_modules import _proxies as _raw_proxies
from torchrec_mm.models.rankers import RankerConfig
from torchrec_mm.serving.fields import idproxy_schema, write_idproxy_records
from torchrec_mm.serving.store import ItemStore
from torchrec_mm.testing import random_samples
from torchrec_mm.training.trainer import TrainConfig, build_model



def _proxies():
    """Test proxies with the per-group basis a real stage-1 fit stores."""
    px = _raw_proxies()
    px.z_mean, px.z_basis = group_basis(px.z_groups.float(), 4)
    return px


@pytest.fixture(scope="module")
def samples():
    return random_samples(num_interactions=1500, num_users=50, num_items=N_ITEMS,
                          history_length=6, seed=2)


def _model(samples, tmp_path, kind, mode, store=None):
    opts = {"proxies": str(tmp_path / "px"), "mode": mode, "hidden_dim": 16,
            "cold_threshold": 33, "z_rank": 4}
    if store:
        opts["store"] = store
    spec = tmp_path / f"{kind}-{mode}-{bool(store)}.yaml"
    spec.write_text(yaml.safe_dump({"plugins": [{"name": "idproxy", "options": opts}]}))
    cfg = TrainConfig(data="-", out="-", ranker=RankerConfig(kind=kind, embedding_dim=D),
                      plugins=str(spec), seed=0)
    model, _ = build_model(cfg, samples.layout, samples)
    return model


@pytest.mark.parametrize("kind,mode", [("target_attention", "augment"), ("dlrm", "augment"),
                                       ("target_attention", "cold_only"), ("dlrm", "swap")])
def test_store_backed_matches_table_backed(samples, tmp_path, kind, mode):
    px = _proxies()
    save_proxies(str(tmp_path / "px"), px)
    loc = str(tmp_path / "store")
    z_width = 3 * 4  # G groups x z_rank
    with ItemStore.open(loc, idproxy_schema(D, z_width)) as st:
        written = write_idproxy_records(st, px, torch.arange(N_ITEMS).numpy(), "v1", z_rank=4)
    assert written == int(px.has_content.sum())  # items without content are not written
    table_model = _model(samples, tmp_path, kind, mode)
    store_model = _model(samples, tmp_path, kind, mode, store=loc)
    store_model.load_state_dict(table_model.state_dict(), strict=False)
    batch = _batch(samples, 64)
    with torch.no_grad():
        a = table_model(batch)[1][1]
        b = store_model(batch)[1][1]
    # the stored z were projected in another batch shape: float rounding only
    torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)
    # training works through the store path (the adaptor gets gradients)
    loss, _ = store_model(batch)
    loss.backward()
    fine = [p for n, p in store_model.named_parameters() if "adaptor.0.weight" in n][0]
    assert fine.grad is not None and fine.grad.abs().sum() > 0


def test_new_item_is_served_once_written(samples, tmp_path):
    """An item missing from the store takes the fallback (augment: zero proxy slots);
    after a put, the very next call uses its proxy."""
    px = _proxies()
    save_proxies(str(tmp_path / "px"), px)
    loc = str(tmp_path / "store")
    items = torch.arange(N_ITEMS).numpy()
    new = int(samples.make_batch(samples.rows("train")[:1])
              .sparse_features["item_id"].values()[0])
    assert bool(px.has_content[new])
    with ItemStore.open(loc, idproxy_schema(D, 12)) as st:
        write_idproxy_records(st, px, items[items != new], "v1", z_rank=4)
    model = _model(samples, tmp_path, "target_attention", "augment", store=loc)
    batch = samples.make_batch(samples.rows("train")[:1])
    ec = model.model.embedding_collection
    with torch.no_grad():
        before = ec(batch.sparse_features)["item_id"].values()[0, D:]
    assert before.abs().sum() == 0  # not in the store: no proxy
    with ItemStore.open(loc) as st:
        write_idproxy_records(st, px, [new], "v1", z_rank=4)
    with torch.no_grad():
        after = ec(batch.sparse_features)["item_id"].values()[0, D:]
    torch.testing.assert_close(after[:D], px.p_coarse[new])
    assert after[D:].abs().sum() > 0  # p_fine from the stored states


def test_store_schema_mismatch_is_a_clear_error(samples, tmp_path):
    save_proxies(str(tmp_path / "px"), _proxies())
    loc = str(tmp_path / "store")
    ItemStore.open(loc, idproxy_schema(D + 1, 12)).close()
    with pytest.raises(ValueError, match="p_coarse"):
        _model(samples, tmp_path, "dlrm", "augment", store=loc)


def test_store_backed_model_traces(samples, tmp_path):
    """TrainPipelineSparseDist fx-traces the ranker: the store read is one leaf call."""
    import torchrec.fx

    px = _proxies()
    save_proxies(str(tmp_path / "px"), px)
    loc = str(tmp_path / "store")
    with ItemStore.open(loc, idproxy_schema(D, 12)) as st:
        write_idproxy_records(st, px, torch.arange(N_ITEMS).numpy(), "v1", z_rank=4)
    ranker = _model(samples, tmp_path, "target_attention", "augment", store=loc).model
    gm = torchrec.fx.symbolic_trace(ranker)
    batch = _batch(samples)
    with torch.no_grad():
        torch.testing.assert_close(gm(batch.dense_features, batch.sparse_features),
                                   ranker(batch.dense_features, batch.sparse_features))
