"""The ``qarm`` plugin reading codes from an online item store (``store`` option): the
same batch features as the artefact when the store holds the same codes, the no-code
index for items missing from it, a new item's codes used as soon as they are written,
and the transform survives pickling (data-loader workers)."""

import pickle

import numpy as np
import torch

from torchrec_mm.plugins import PluginContext, install_batch_transforms, parse_spec
from torchrec_mm.qarm.test_plugin import D, N_ITEMS, codes, samples  # noqa: F401 (fixtures)
from torchrec_mm.serving.fields import qarm_schema, write_qarm_records
from torchrec_mm.serving.store import ItemStore
from torchrec_mm.models.rankers import RankerConfig


def _transform(samples, codes, **options):
    ctx = PluginContext(layout=samples.layout, ranker=RankerConfig(kind="dlrm", embedding_dim=D),
                        extras={"qarm_codes": codes, "samples": samples})
    spec = parse_spec({"plugins": [{"name": "qarm", "options": {
        "codes": "-", "match_len": 4, "user_vq": True, **options}}]})
    plugins = spec.instantiate()
    return plugins[0].batch_transform(ctx)


def _features(transform, samples, rows):
    saved = list(samples.batch_transforms)
    samples.batch_transforms = [transform]
    try:
        return samples.make_batch(rows, "train").sparse_features.to_dict()
    finally:
        samples.batch_transforms = saved


def _store(tmp_path, codes, ids):
    loc = str(tmp_path / "codes_store")
    with ItemStore.open(loc, qarm_schema(codes.k, codes.levels)) as st:
        write_qarm_records(st, codes, np.asarray(ids), "v1")
    return loc


def test_store_codes_match_the_artefact(tmp_path, samples, codes):  # noqa: F811
    loc = _store(tmp_path, codes, np.arange(N_ITEMS))
    rows = samples.rows("train")[:64]
    want = _features(_transform(samples, codes), samples, rows)
    store_t = pickle.loads(pickle.dumps(_transform(samples, codes, store=loc)))
    got = _features(store_t, samples, rows)
    assert want.keys() == got.keys() and any(k.startswith("qarm_match") for k in got)
    for k in want:
        assert torch.equal(want[k].values(), got[k].values()), k
        assert torch.equal(want[k].lengths(), got[k].lengths()), k


def test_missing_item_gets_no_code_then_its_codes_once_written(tmp_path, samples, codes):  # noqa: F811,E501
    rows = samples.rows("train")[:1]
    target = int(samples.item[rows[0]])
    assert bool(codes.has_code[target])
    ids = np.arange(N_ITEMS)
    loc = _store(tmp_path, codes, ids[ids != target])
    t = _transform(samples, codes, store=loc)
    before = _features(t, samples, rows)["qarm_rq"].values()
    levels = codes.levels
    none = codes.rq_vocab - 1
    offsets = torch.arange(levels) * (none + 1)
    assert torch.equal(before, offsets + none)  # the reserved no-code rows
    with ItemStore.open(loc) as st:
        write_qarm_records(st, codes, [target], "v1")
    after = _features(t, samples, rows)["qarm_rq"].values()
    assert torch.equal(after, offsets + codes.rq[target].long())
