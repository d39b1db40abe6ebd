"""The scoring entry point: a trained run rebuilt from its directory scores a request
exactly as the training-time batch of the same sample does; with the online store, an
item missing from it takes the fallback and is scored with its content proxy by the
first call after its record is written; bad requests name the field."""

import numpy as np
import pytest
import torch
import yaml

from torchrec_mm.data.batching import RankingSamples
from torchrec_mm.data.split import make_split
from torchrec_mm.data.synth import SynthConfig, generate
from torchrec_mm.idproxy.artifacts import Proxies, group_basis, save_proxies
from torchrec_mm.models.rankers import RankerConfig
from torchrec_mm.serving.fields import idproxy_schema, write_idproxy_records
from torchrec_mm.serving.scoring import RankerScorer, ScoreRequest
from torchrec_mm.serving.store import ItemStore
from torchrec_mm.training.trainer import TrainConfig, train

D, Z_RANK = 8, 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring")
    data = str(root / "data")
    generate(SynthConfig(num_users=60, num_items=120, num_interactions=3000, seed=1), data)
    make_split(data, cold_item_frac=0.1, test_time_frac=0.1, seed=0)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(120, 3, 10, generator=g)
    mean, basis = group_basis(z, Z_RANK)
    px = Proxies(p_coarse=torch.nn.functional.normalize(torch.randn(120, D, generator=g), dim=1),
                 z_groups=z, has_content=torch.ones(120, dtype=torch.bool), z_mean=mean,
                 z_basis=basis)
    save_proxies(str(root / "px"), px)
    spec = root / "idproxy.yaml"
    spec.write_text(yaml.safe_dump({"plugins": [{"name": "idproxy", "options": {
        "proxies": str(root / "px"), "hidden_dim": 8, "z_rank": Z_RANK}}]}))
    out = str(root / "run")
    train(TrainConfig(data=data, out=out, ranker=RankerConfig(kind="target_attention",
                                                              embedding_dim=D),
                      plugins=str(spec), max_steps=6, batch_size=64, world_size=1,
                      evaluate=False, progress=False, dense_lr=0.01))
    return {"root": root, "data": data, "run": out, "px": px}


def _request_of_row(samples: RankingSamples, row: int) -> ScoreRequest:
    lengths, values = samples.history(np.array([row]), "all")
    return ScoreRequest(user_id=int(samples.user[row]), candidates=[int(samples.item[row])],
                        history=values.tolist(), scenario=int(samples.scenario[row]),
                        timestamp=int(samples.timestamp[row]))


def test_request_scores_like_the_training_batch(run):
    scorer = RankerScorer.load(run["run"])
    samples = scorer.samples
    rows = samples.rows("test")[:5]
    with torch.no_grad():
        want = torch.sigmoid(scorer.model(samples.make_batch(rows, "all"))[1][1]).numpy()
    got = np.concatenate([scorer.score(_request_of_row(samples, int(r))) for r in rows])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # the checkpoint's trained weights were loaded, not the seeded initialisation
    from torchrec_mm.training.checkpoint import latest_checkpoint, read_checkpoint

    _, _, tensors = read_checkpoint(latest_checkpoint(run["run"] + "/checkpoints"))
    adaptor = [k for k in scorer.model.state_dict() if k.endswith("adaptor.0.weight")][0]
    torch.testing.assert_close(scorer.model.state_dict()[adaptor], tensors[f"/model/{adaptor}"])
    cfg_init = TrainConfig(data=run["data"], out="-", seed=0, plugins=str(run["root"] /
                           "idproxy.yaml"), ranker=RankerConfig(kind="target_attention",
                                                                embedding_dim=D))
    from torchrec_mm.training.trainer import build_model

    init, _ = build_model(cfg_init, samples.layout)
    assert not torch.equal(init.state_dict()[adaptor], scorer.model.state_dict()[adaptor])


def test_new_item_scored_with_its_proxy_after_it_is_written(run):
    px = run["px"]
    loc = str(run["root"] / "store")
    new = 7
    ids = np.arange(120)
    with ItemStore.open(loc, idproxy_schema(D, 3 * Z_RANK)) as st:
        write_idproxy_records(st, px, ids[ids != new], "v1", z_rank=Z_RANK)
    table = RankerScorer.load(run["run"])
    stored = RankerScorer.load(run["run"], store={"idproxy": loc})
    req = ScoreRequest(user_id=3, candidates=[new, 11, 12], history=[11, 5, 40], timestamp=86_400)
    want = table.score(req)
    before = stored.score(req)
    np.testing.assert_allclose(before[1:], want[1:], rtol=0, atol=2e-5)
    assert abs(before[0] - want[0]) > 1e-4  # no record yet: no proxy (the fallback)
    with ItemStore.open(loc) as st:
        write_idproxy_records(st, px, [new], "v1", z_rank=Z_RANK)
    after = stored.score(req)  # the very next call, no reload
    np.testing.assert_allclose(after, want, rtol=0, atol=2e-5)


def test_bad_requests_name_the_field(run):
    scorer = RankerScorer.load(run["run"])
    with pytest.raises(ValueError, match="'candidates': item id 500"):
        scorer.score(ScoreRequest(user_id=1, candidates=[1, 500]))
    with pytest.raises(ValueError, match="'user_id'"):
        scorer.score(ScoreRequest(user_id=-1, candidates=[1]))
    with pytest.raises(ValueError, match="'scenario': unknown scenario 'moon'"):
        scorer.score(ScoreRequest(user_id=1, candidates=[1], scenario="moon"))
    with pytest.raises(ValueError, match="'candidates': empty"):
        scorer.score(ScoreRequest(user_id=1, candidates=[]))
    with pytest.raises(ValueError, match=r"plugin\(s\) \['qarm'\]"):
        RankerScorer.load(run["run"], store={"qarm": "x"})
