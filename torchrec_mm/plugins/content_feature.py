"""``content_feature``: the item's content embedding as one more pooled feature.

The simplest way to bring content into a ranker, and the baseline every method paper
compares against (IDProxy Table 1 "v1: content embedding as a feature", QARM Table 5
"+IA Rep"): the frozen content vector of the target item (and, optionally, the mean
over the user's history items) is projected to the ranker's embedding dim by a
trainable linear map and added as a feature ``item_content`` (``hist_item_content``)
next to the ID features.

Mechanics (the plugin contract of ``torchrec_mm.plugins``, phase 2):
``wrap_collections`` replaces the ranker's EBC by :class:`ContentFeatureCollection`,
which *holds* the original EBC (so DMP still shards it) and returns its ``KeyedTensor``
with the extra keys appended. ``embedding_bag_configs()`` lists the extra features, so DLRM's
interaction arch and the target-attention ranker size themselves for them unchanged.

Spec::

    plugins:
      - name: content_feature
        options: {store: out/demo/content, history: true}
"""

import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_mm.plugins import PluginContext, RankerPlugin, register_plugin
from torchrec_mm.utils import jagged


@torch.fx.wrap
def _feature_ids(kjt: KeyedJaggedTensor, key: str) -> "tuple[torch.Tensor, torch.Tensor]":
    jt = kjt[key]
    return jt.values(), jt.lengths()


@torch.fx.wrap
def _append_keys(kt: KeyedTensor, keys: List[str], values: List[torch.Tensor]) -> KeyedTensor:
    return KeyedTensor(
        keys=kt.keys() + keys,
        length_per_key=kt.length_per_key() + [v.shape[1] for v in values],
        values=torch.cat([kt.values()] + values, dim=1),
        key_dim=1,
    )


class ContentFeatureCollection(nn.Module):
    """Wraps an EBC; appends projected content features to its output.

    Args:
        embedding_bag_collection: the ranker's EBC (kept as a child: DMP shards it).
        content: [num_items, D_c] frozen content vectors (rows of missing items zero).
        embedding_dim: D, the projected size (the ranker's embedding dim).
        item_feature: KJT key of the target item (one id per sample).
        history_feature: KJT key of the history (jagged), or None to skip it.

    ``forward(kjt) -> KeyedTensor`` with the inner keys plus ``item_content`` [B, D]
    (and ``hist_item_content`` [B, D], the projected mean over history items; zero for
    an empty history).
    """

    def __init__(self, embedding_bag_collection: nn.Module, content: torch.Tensor,
                 embedding_dim: int, item_feature: str = "item_id",
                 history_feature: Optional[str] = "hist_item_id") -> None:
        super().__init__()
        self.embedding_bag_collection = embedding_bag_collection
        self.register_buffer("content", content.float(), persistent=False)
        self.projection = nn.Linear(content.shape[1], embedding_dim)
        self.item_feature = item_feature
        self.history_feature = history_feature
        self._extra: List[EmbeddingBagConfig] = [EmbeddingBagConfig(
            name="t_item_content", num_embeddings=content.shape[0],
            embedding_dim=embedding_dim, feature_names=["item_content"])]
        if history_feature is not None:
            self._extra.append(EmbeddingBagConfig(
                name="t_hist_item_content", num_embeddings=content.shape[0],
                embedding_dim=embedding_dim, feature_names=["hist_item_content"],
                pooling=PoolingType.MEAN))

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return list(self.embedding_bag_collection.embedding_bag_configs()) + self._extra

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        kt = self.embedding_bag_collection(features)
        ids, _ = _feature_ids(features, self.item_feature)
        values = [self.projection(self.content[ids])]
        keys = ["item_content"]
        if self.history_feature is not None:
            h_ids, h_len = _feature_ids(features, self.history_feature)
            mean = jagged.segment_mean(self.content[h_ids], h_len)
            values.append(self.projection(mean))
            keys.append("hist_item_content")
        return _append_keys(kt, keys, values)


def _representation_file(path: str, num_items: int) -> "tuple[torch.Tensor, torch.Tensor]":
    """(table [num_items, D] zero where missing, present [num_items] bool) of a
    safetensors file holding ``reps`` and ``has_rep``."""
    from torchrec_mm.utils.io import load_tensors

    t = load_tensors(path)
    if "reps" not in t or "has_rep" not in t:
        raise ValueError(f"{path}: expected tensors 'reps' [N, D] and 'has_rep' [N], "
                         f"found {sorted(t)}")
    reps, has = t["reps"].float(), t["has_rep"].bool()
    if reps.dim() != 2 or reps.shape[0] < num_items or has.shape[0] != reps.shape[0]:
        raise ValueError(f"{path}: reps {tuple(reps.shape)} / has_rep {tuple(has.shape)} do "
                         f"not cover the dataset's {num_items} items")
    bad = has & ~torch.isfinite(reps).all(dim=1)
    if bool(bad.any()):
        raise ValueError(f"{path}: reps of item {int(bad.nonzero()[0])} has NaN/Inf")
    reps, has = reps[:num_items], has[:num_items]
    return reps * has.unsqueeze(1), has


@dataclass
class ContentFeatureOptions:
    """Options of the ``content_feature`` plugin.

    Attributes:
        store: content store directory written by ``torchrec-mm encode`` (relative
            paths are resolved against the dataset directory's parent first), or a
            safetensors file of item representations ``reps`` [N, D] + ``has_rep``
            [N] (e.g. QARM's ``aligned.safetensors``: the "+IA Rep" variant).
        field: which stored state to use (``pooled``, ``emb_token``).
        history: also add the mean content of the history items.
        missing: ``zeros`` (items without content get a zero vector) or ``error``.
    """

    store: str = "content"
    field: str = "pooled"
    history: bool = True
    missing: str = "zeros"


@register_plugin("content_feature")
class ContentFeaturePlugin(RankerPlugin):
    Options = ContentFeatureOptions

    def wrap_collections(self, collections: Any, ctx: PluginContext) -> Any:
        from torchrec_mm.content.store import ContentStore

        if ctx.layout is None or ctx.ranker is None:
            raise ValueError("content_feature needs the feature layout and ranker config")
        path = ctx.resolve_path(self.options.store)
        n = ctx.layout.num_items
        if os.path.isfile(path):
            table, present = _representation_file(path, n)
        else:
            store = ContentStore(path)
            present = store.contains(torch.arange(n))
            table = None
        ids = torch.arange(n)
        if not bool(present.any()):
            raise ValueError(f"content store {path} has none of the "
                             f"dataset's {n} items")
        if self.options.missing == "error" and not bool(present.all()):
            first = int(ids[~present][0])
            raise ValueError(f"content store {path} has no content for "
                             f"item {first} ({int((~present).sum())} items missing)")
        if table is None:
            stored = store.get(ids[present], self.options.field).float()
            table = torch.zeros(n, stored.shape[-1])
            table[present] = stored
        collections.ebc = ContentFeatureCollection(
            collections.ebc, table, ctx.ranker.embedding_dim,
            history_feature="hist_item_id" if self.options.history else None)
        return collections
