"""QARM's CrossNet: target attention over the target-aware code-matching sequences.

Paper ``002_93e7adf76829e098`` §2.4::

    Code_i        = IDLookup([r_1^i, ..., r_L^i])             (an item = its RQ codes)
    ItemCodeRep   = ItemNet(Code_target)
    CrossCodeRep  = CrossNet(ItemCodeRep, [Code_1^Search, ..., Code_n^Search])

where ``Code^Search`` are the history items found by the target's codes: for level l,
the latest history items sharing the target's first l RQ codes
(:func:`~torchrec_mm.qarm.matching.code_matching_sequences`, built into the batch's KJT
by the plugin's batch transform as ``qarm_match_l<l>``: each matched item as its L
level-offset RQ codes).

:class:`QARMCrossCollection` wraps a ranker's ``EmbeddingBagCollection`` (it *holds*
it, so DMP still shards it) and owns one ``EmbeddingCollection`` table (the RQ code
table of the cross features, served to ``qarm_rq`` and every ``qarm_match_l<l>``): DMP
shards it with the planner like any other table. Its forward looks the codes up,
sums each item's L code embeddings into one item vector, runs one DIN activation unit
(:class:`~torchrec_mm.models.target_attention.TargetAttention`) per level with the
target's code vector as the query, and appends the L' results as pooled features
``qarm_cross_l<l>`` [B, d] to the EBC's ``KeyedTensor`` — so DLRM, DLRM_DCN and the
target-attention ranker take them unchanged (``embedding_bag_configs()`` lists them).
The wrapper's EC reads the very KJT the ranker passes to the EBC, so
``TrainPipelineSparseDist`` prefetches its input like the ranker's own.
"""

from typing import Dict, List, Optional

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from torchrec_mm.models.target_attention import TargetAttention


@torch.fx.wrap
def _items_jagged(jt: JaggedTensor, codes_per_item: int
                  ) -> "tuple[torch.Tensor, torch.Tensor]":
    """Code embeddings of a jagged row of items ([sum(len)*C, d] values, lengths a
    multiple of C) → item vectors [sum(len), d] (sum of each item's C codes) and the
    items per row [B]."""
    values = jt.values()
    items = values.reshape(-1, codes_per_item, values.shape[1]).sum(dim=1)
    return items, torch.div(jt.lengths(), codes_per_item, rounding_mode="floor")


@torch.fx.wrap
def _item_vector(jt: JaggedTensor, codes_per_item: int) -> torch.Tensor:
    """[B*C, d] code embeddings of one item per sample → [B, d] (sum over its codes)."""
    values = jt.values()
    return values.reshape(-1, codes_per_item, values.shape[1]).sum(dim=1)


@torch.fx.wrap
def _append(kt: KeyedTensor, keys: List[str], values: List[torch.Tensor]) -> KeyedTensor:
    return KeyedTensor(keys=kt.keys() + keys,
                       length_per_key=kt.length_per_key() + [v.shape[1] for v in values],
                       values=torch.cat([kt.values()] + values, dim=1), key_dim=1)


class QARMCrossCollection(nn.Module):
    """Wraps an EBC; appends the CrossNet features ``<prefix>_cross_l1..l<levels>``.

    Args:
        embedding_bag_collection: the ranker's EBC (a child: DMP shards it).
        levels: L' matching levels (keys ``<prefix>_match_l1..``).
        num_rq_levels: L, RQ codes per item (values per matched item).
        rq_rows: rows of the RQ code table (``L * (codebook_size + 1)``).
        embedding_dim: d of the code table and of the outputs.
        max_len: n, the longest matching sequence (the batch transform's ``match_len``).
        prefix: feature-name prefix.
        attention_hidden: hidden sizes of the activation units.
        device: ``meta`` to build without memory (DMP materialises it).

    ``forward(kjt) -> KeyedTensor``: the EBC's keys, then ``<prefix>_cross_l<l>``
    [B, d] (zero for an empty sequence).
    """

    def __init__(self, embedding_bag_collection: nn.Module, levels: int, num_rq_levels: int,
                 rq_rows: int, embedding_dim: int, max_len: int, prefix: str = "qarm",
                 attention_hidden: Optional[List[int]] = None,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        if levels < 1 or levels > num_rq_levels:
            raise ValueError(f"qarm: cross levels must be in 1..{num_rq_levels}, got {levels}")
        self.embedding_bag_collection = embedding_bag_collection
        self.levels = levels
        self.num_rq_levels = num_rq_levels
        self.max_len = max_len
        self.target_key = f"{prefix}_rq"
        self.match_keys = [f"{prefix}_match_l{lv}" for lv in range(1, levels + 1)]
        self.out_keys = [f"{prefix}_cross_l{lv}" for lv in range(1, levels + 1)]
        self.code_collection = EmbeddingCollection(tables=[EmbeddingConfig(
            name=f"t_{prefix}_rq_cross", num_embeddings=rq_rows, embedding_dim=embedding_dim,
            feature_names=[self.target_key] + self.match_keys)], device=device)
        dev = None if device is None or device.type == "meta" else device
        self.attention = nn.ModuleList(
            [TargetAttention(embedding_dim, attention_hidden, device=dev) for _ in range(levels)])
        self._extra = [EmbeddingBagConfig(name=f"t_{k}", num_embeddings=1,
                                          embedding_dim=embedding_dim, feature_names=[k],
                                          pooling=PoolingType.SUM) for k in self.out_keys]

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        """The EBC's tables plus one pseudo-config per output key (for the rankers'
        feature counting; they hold no table)."""
        return list(self.embedding_bag_collection.embedding_bag_configs()) + self._extra

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        kt = self.embedding_bag_collection(features)
        seq: Dict[str, JaggedTensor] = self.code_collection(features)
        target = _item_vector(seq[self.target_key], self.num_rq_levels)
        out: List[torch.Tensor] = []
        for key, unit in zip(self.match_keys, self.attention):
            items, lengths = _items_jagged(seq[key], self.num_rq_levels)
            out.append(unit.forward_jagged(target, items, lengths, self.max_len))
        return _append(kt, self.out_keys, out)
