"""The online path end to end (issue 6): artefacts -> backfilled item stores -> a
ranker trained with IDProxy and QARM reading the stores -> `serve-items` over HTTP ->
the scorer. A catalogue item removed from the stores is scored with the fallback; once
its text is POSTed to the service, the very next scoring call uses its new proxy and
codes (equal, up to the float16 rounding of the states, to the backfilled ones)."""

import os

import numpy as np
import pytest
import yaml

from torchrec_mm.data.io import load_items
from torchrec_mm.data.split import make_split
from torchrec_mm.idproxy.artifacts import load_proxies
from torchrec_mm.models.rankers import RankerConfig
from torchrec_mm.serving.scoring import RankerScorer, ScoreRequest
from torchrec_mm.serving.service import ItemService, backfill
from torchrec_mm.serving.store import ItemStore
from torchrec_mm.serving.test_service import Z_RANK, art, post_items, serve_config  # noqa: F401
from torchrec_mm.training.trainer import TrainConfig, train


@pytest.fixture(scope="module")
def online(art, tmp_path_factory):  # noqa: F811
    root = str(tmp_path_factory.mktemp("online"))
    make_split(art["data"], cold_item_frac=0.1, test_time_frac=0.2, seed=0)
    cfg = serve_config(art, root, http_port=0)
    backfill(art["data"], cfg, progress=False)
    dim = load_proxies(art["idproxy"]).dim
    spec = os.path.join(root, "spec.yaml")
    with open(spec, "w") as f:
        yaml.safe_dump({"plugins": [
            {"name": "idproxy", "options": {"proxies": art["idproxy"], "z_rank": Z_RANK,
                                            "hidden_dim": 8, "store": cfg.idproxy_store}},
            {"name": "qarm", "options": {"codes": art["codes"], "store": cfg.qarm_store,
                                         "match_len": 2, "user_len": 4}}]}, f)
    run = os.path.join(root, "run")
    train(TrainConfig(data=art["data"], out=run, plugins=spec, max_steps=4, batch_size=32,
                      ranker=RankerConfig(kind="target_attention", embedding_dim=dim),
                      world_size=1, evaluate=False, progress=False))
    return {"cfg": cfg, "run": run}


def test_new_item_is_scored_with_its_proxy_and_codes_after_serve_items(art, online):  # noqa: F811,E501
    cfg = online["cfg"]
    scorer = RankerScorer.load(online["run"])  # the run's spec reads both stores
    items = load_items(art["data"], ["item_id", "text"]).to_pydict()
    new = 7
    req = ScoreRequest(user_id=2, candidates=[new, 3, 4], history=[3, 11, 20])
    full = scorer.score(req)
    for loc in (cfg.idproxy_store, cfg.qarm_store):
        with ItemStore.open(loc) as st:
            assert st.delete([new]) == 1
    missing = scorer.score(req)
    np.testing.assert_allclose(missing[1:], full[1:], rtol=0, atol=1e-6)
    assert abs(missing[0] - full[0]) > 1e-5  # the fallback: no proxy, no-code index
    service = ItemService(cfg).start()
    try:
        host, port = service.address
        status, body, _ = post_items(f"http://{host}:{port}", [
            {"item_id": new, "text": items["text"][items["item_id"].index(new)]}])
        assert status == 200, body
        after = scorer.score(req)  # the first call after the write
    finally:
        service.stop()
    np.testing.assert_allclose(after, full, rtol=0, atol=2e-3)
    assert abs(after[0] - full[0]) < abs(missing[0] - full[0])
