import os

import pytest
import torch

from torchrec_mm.content.encode_job import encode_items
from torchrec_mm.content.store import ContentStore, MissingItemError
from torchrec_mm.content.testing import item_texts, write_items

IDS = [i for i in range(14) if i not in (4, 9)]  # items 4 and 9 have no content
TEXTS = item_texts(len(IDS), seed=5)


@pytest.fixture(scope="module")
def stores(minilm, tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    data = write_items(str(root / "data"), TEXTS, item_ids=IDS)
    out = {}
    for dtype in ("float16", "float32", "bfloat16"):
        encode_items(data, str(root / dtype), encoder=minilm, batch_size=4, chunk_size=5,
                     group_sample=8, store_dtype=dtype, all_layers=(dtype == "float32"),
                     progress=False)
        out[dtype] = ContentStore(str(root / dtype))
    reference = minilm.encode_texts(TEXTS, return_all_layers=True)  # same layer groups
    return out, reference


def test_ids_missing_and_shapes(stores):
    store = stores[0]["float16"]
    assert store.num_items == 14 and len(store) == 12 and store.dim == 384
    assert store.item_ids.tolist() == IDS
    assert torch.nonzero(store.missing).flatten().tolist() == [4, 9]
    assert store.contains(torch.tensor([[0, 4], [13, 99]])).tolist() == [[True, False],
                                                                         [True, False]]
    assert 3 in store and 9 not in store and -1 not in store
    assert store.shape("layer_groups") == (3, 384)
    with pytest.raises(KeyError, match="per_layer"):
        store.get(torch.tensor([0]), "per_layer")


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("float16", 2e-3), ("bfloat16", 2e-2)])
def test_get_parity_with_encoder(stores, dtype, tol):
    store, ref = stores[0][dtype], stores[1]
    rows = torch.tensor([[5, 0, 11], [2, 2, 7]])  # positions in IDS
    ids = torch.tensor(IDS)[rows]
    for field in ("pooled", "emb_token", "layer_groups") + (("per_layer",) if dtype == "float32"
                                                           else ()):
        got = store.get(ids, field)
        want = getattr(ref, field)[rows]
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got, want, atol=tol * 10, rtol=tol)
    table = store.as_table("layer_groups")
    assert table.shape == (14, 3, 384)
    torch.testing.assert_close(table[torch.tensor(IDS)], store.get(torch.tensor(IDS),
                                                                   "layer_groups"))
    assert not table[store.missing].any()


def test_unknown_ids_and_fallbacks(stores):
    store = stores[0]["float16"]
    with pytest.raises(MissingItemError, match=r"^item 9 is not in the content store"):
        store.get(torch.tensor([1, 9, 4]))
    with pytest.raises(KeyError, match="item 200"):
        store.get(torch.tensor([200]))
    zeros = store.get(torch.tensor([1, 9, 200]), fallback="zeros")
    assert not zeros[1:].any() and zeros[0].abs().sum() > 0
    mean = store.get(torch.tensor([9]), fallback="mean")[0]
    torch.testing.assert_close(mean, store.as_table()[torch.tensor(IDS)].mean(0))
    torch.testing.assert_close(store.as_table(fill="mean")[4], mean)


def test_in_memory_and_online_encoder(stores):
    store = stores[0]["float32"]
    path = store.path
    loaded = ContentStore(os.path.join(path, "manifest.json"), in_memory=True)
    ids = torch.tensor([13, 0, 6])
    assert torch.equal(loaded.get(ids, "emb_token"), store.get(ids, "emb_token"))
    encoder = store.build_encoder()
    assert encoder.layer_groups == store.layer_groups
    new = encoder.encode_texts([TEXTS[IDS.index(13)]])
    torch.testing.assert_close(new.layer_groups, store.get(torch.tensor([13]), "layer_groups"),
                               atol=1e-5, rtol=1e-5)


def test_missing_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="no content store"):
        ContentStore(str(tmp_path))
