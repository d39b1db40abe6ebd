"""Baseline rankers built from TorchRec parts, from a dataclass config.

``build_ranker`` makes one of

* ``dlrm``: ``torchrec.models.dlrm.DLRM`` as it is (history mean-pooled in the EBC),
* ``dlrm_dcn``: ``torchrec.models.dlrm.DLRM_DCN`` as it is,
* ``target_attention``: :class:`TargetAttentionRanker` (DIN-style attention over the
  history item IDs, the item table in an ``EmbeddingCollection``).

The item-ID table is always named ``t_item_id`` and serves both ``item_id`` and
``hist_item_id``; plugins find it by that feature. Tables are listed by
:func:`table_configs` *before* the model is built so that plugins can change them
(see ``torchrec_mm.plugins``).
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.modules.embedding_configs import (
    EmbeddingBagConfig,
    EmbeddingConfig,
    PoolingType,
)
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from torchrec_mm.data.batching import (
    HISTORY_FEATURE,
    ITEM_FEATURE,
    SCENARIO_FEATURE,
    USER_FEATURE,
    Batch,
    FeatureLayout,
)

RANKER_KINDS = ("dlrm", "dlrm_dcn", "target_attention")
ITEM_TABLE = "t_item_id"


@dataclass
class RankerConfig:
    """Ranker hyper-parameters.

    Attributes:
        kind: one of ``dlrm``, ``dlrm_dcn``, ``target_attention``.
        embedding_dim: D of every table (DLRM needs one D for all).
        dense_arch_layer_sizes: dense MLP; for DLRM the last size is forced to D.
        over_arch_layer_sizes: top MLP; for DLRM it must end with 1.
        dcn_num_layers / dcn_low_rank_dim: DLRM_DCN cross net.
        use_user_id: include a ``user_id`` table (off for strongly cold-user data).
        tasks: extra prediction tasks besides the click (task 0), as action names of
            the dataset (``meta.actions``, e.g. ``[is_like]``); non-empty: the over-arch
            becomes a multi-gate mixture-of-experts head with one logit per task
            (``torchrec_mm.models.multitask``, QARM's multi-task MoE output).
        num_experts: experts of that head.
        task_weights: loss weight of each task, click first (default all 1).
    """

    kind: str = "target_attention"
    embedding_dim: int = 16
    dense_arch_layer_sizes: List[int] = field(default_factory=lambda: [32, 16])
    over_arch_layer_sizes: List[int] = field(default_factory=lambda: [64, 32, 1])
    dcn_num_layers: int = 2
    dcn_low_rank_dim: int = 8
    use_user_id: bool = True
    tasks: List[str] = field(default_factory=list)
    num_experts: int = 4
    task_weights: List[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in RANKER_KINDS:
            raise ValueError(f"unknown ranker kind '{self.kind}', expected one of "
                             f"{RANKER_KINDS}")
        self.tasks = [str(t) for t in self.tasks]
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"ranker tasks must be distinct, got {self.tasks}")
        if self.num_experts < 1:
            raise ValueError(f"ranker num_experts must be >= 1, got {self.num_experts}")
        if self.task_weights and len(self.task_weights) != self.num_tasks:
            raise ValueError(f"ranker task_weights needs {self.num_tasks} weights (click + "
                             f"{self.tasks}), got {self.task_weights}")
        if any(not w >= 0 for w in self.task_weights):
            raise ValueError(f"ranker task_weights must be >= 0, got {self.task_weights}")

    @property
    def num_tasks(self) -> int:
        """1 (the click) + the extra tasks."""
        return 1 + len(self.tasks)

    @staticmethod
    def from_dict(d: Dict[str, Any]) -> "RankerConfig":
        known = {f.name for f in dataclasses.fields(RankerConfig)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ranker option(s) {sorted(unknown)}; known: "
                             f"{sorted(known)}")
        return RankerConfig(**d)


@dataclass
class RankerTables:
    """Table configs of a ranker before it is built (plugins may edit them).

    Attributes:
        pooled: tables of the EmbeddingBagCollection.
        sequence: tables of the EmbeddingCollection (target-attention ranker only).
    """

    pooled: List[EmbeddingBagConfig]
    sequence: List[EmbeddingConfig]

    def find(self, feature: str) -> Tuple[str, Any]:
        """(``"pooled"``/``"sequence"``, config) of the table serving ``feature``."""
        for kind, tables in (("pooled", self.pooled), ("sequence", self.sequence)):
            for t in tables:
                if feature in t.feature_names:
                    return kind, t
        raise KeyError(f"no table serves feature '{feature}'")


def table_configs(layout: FeatureLayout, config: RankerConfig) -> RankerTables:
    """The tables a ranker of ``config`` needs for ``layout``."""
    D = config.embedding_dim
    pooled: List[EmbeddingBagConfig] = []
    sequence: List[EmbeddingConfig] = []
    if config.use_user_id:
        pooled.append(EmbeddingBagConfig(name="t_user_id", num_embeddings=layout.num_users,
                                         embedding_dim=D, feature_names=[USER_FEATURE]))
    pooled.append(EmbeddingBagConfig(name="t_scenario", num_embeddings=layout.num_scenarios,
                                     embedding_dim=D, feature_names=[SCENARIO_FEATURE]))
    for attr, card in layout.user_attrs.items():
        pooled.append(EmbeddingBagConfig(name=f"t_{attr}", num_embeddings=max(card, 1),
                                         embedding_dim=D, feature_names=[attr]))
    item_features = [ITEM_FEATURE, HISTORY_FEATURE]
    if config.kind == "target_attention":
        sequence.append(EmbeddingConfig(name=ITEM_TABLE, num_embeddings=layout.num_items,
                                        embedding_dim=D, feature_names=item_features))
    else:
        pooled.append(EmbeddingBagConfig(name=ITEM_TABLE, num_embeddings=layout.num_items,
                                         embedding_dim=D, feature_names=item_features,
                                         pooling=PoolingType.MEAN))
    return RankerTables(pooled=pooled, sequence=sequence)


@dataclass
class RankerCollections:
    """The embedding collections of a ranker, built but not yet given to the ranker
    (plugins may wrap them: ``torchrec_mm.plugins``, phase 2).

    Attributes:
        ebc: the pooled ``EmbeddingBagCollection`` (or a module holding it).
        ec: the sequence ``EmbeddingCollection`` (target-attention ranker), else None.
    """

    ebc: nn.Module
    ec: Optional[nn.Module] = None


def build_collections(layout: FeatureLayout, config: RankerConfig,
                      tables: Optional[RankerTables] = None,
                      device: Optional[torch.device] = None) -> RankerCollections:
    """The EBC (and EC) of a ranker from its table configs."""
    tables = tables or table_configs(layout, config)
    ebc = EmbeddingBagCollection(tables=tables.pooled, device=device)
    ec = (EmbeddingCollection(tables=tables.sequence, device=device)
          if config.kind == "target_attention" else None)
    return RankerCollections(ebc=ebc, ec=ec)


def build_ranker(
    layout: FeatureLayout,
    config: RankerConfig,
    tables: Optional[RankerTables] = None,
    device: Optional[torch.device] = None,
    collections: Optional[RankerCollections] = None,
) -> nn.Module:
    """Builds the ranker. ``forward(dense [B, F_d], kjt) -> logits [B, 1]``.

    Args:
        layout: features of the dataset.
        config: ranker config.
        tables: table configs (default :func:`table_configs`; plugins pass edited ones).
        device: ``meta`` to build without memory, else the compute device.
        collections: already built (possibly plugin-wrapped) collections; default
            :func:`build_collections` of ``tables``.
    """
    collections = collections or build_collections(layout, config, tables, device)
    D = config.embedding_dim
    ebc = collections.ebc
    if config.kind == "target_attention":
        from torchrec_mm.models.target_attention import TargetAttentionRanker

        ec = collections.ec
        ranker = TargetAttentionRanker(
            embedding_bag_collection=ebc,
            embedding_collection=ec,
            dense_in_features=layout.num_dense,
            dense_arch_layer_sizes=config.dense_arch_layer_sizes,
            over_arch_layer_sizes=config.over_arch_layer_sizes[:-1] or [D],
            max_history=layout.history_length,
            device=device,
        )
        return _with_tasks(ranker, config, config.over_arch_layer_sizes[:-1] or [D])
    dense_sizes = list(config.dense_arch_layer_sizes[:-1]) + [D]
    over_sizes = list(config.over_arch_layer_sizes)
    if over_sizes[-1] != 1:
        over_sizes.append(1)
    if config.kind == "dlrm":
        ranker = DLRM(embedding_bag_collection=ebc, dense_in_features=layout.num_dense,
                      dense_arch_layer_sizes=dense_sizes, over_arch_layer_sizes=over_sizes,
                      dense_device=device)
    else:
        ranker = DLRM_DCN(embedding_bag_collection=ebc, dense_in_features=layout.num_dense,
                          dense_arch_layer_sizes=dense_sizes,
                          over_arch_layer_sizes=over_sizes,
                          dcn_num_layers=config.dcn_num_layers,
                          dcn_low_rank_dim=config.dcn_low_rank_dim, dense_device=device)
    return _with_tasks(ranker, config, over_sizes[:-1] or [D])


def _with_tasks(ranker: nn.Module, config: RankerConfig, expert_sizes: List[int]
                ) -> nn.Module:
    if not config.tasks:
        return ranker
    from torchrec_mm.models.multitask import install_multitask_head

    return install_multitask_head(ranker, list(expert_sizes), config.num_tasks,
                                  config.num_experts)


class RankerTrain(nn.Module):
    """Loss wrapper (``DLRMTrain``'s contract for our :class:`Batch`).

    ``forward(batch) -> (loss, (loss, logits [B], labels [B]))`` with BCE-with-logits.
    A multi-task ranker (``RankerConfig.tasks``) returns logits [B, T] and reads
    ``batch.task_labels`` [B, T]; its loss is ``sum_t w_t BCE(logits[:, t], labels[:, t])``.

    Args:
        model: the ranker, ``forward(dense, kjt) -> [B, 1]`` or ``[B, T]``.
        num_tasks: T (``RankerConfig.num_tasks``; fixed here, so the forward has no
            data-dependent branch and fx-traces for ``TrainPipelineSparseDist``).
        task_weights: [T] loss weights (default all 1).
    """

    def __init__(self, model: nn.Module, num_tasks: int = 1,
                 task_weights: Optional[List[float]] = None) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.num_tasks = int(num_tasks)
        w = [float(x) for x in task_weights] if task_weights else [1.0] * self.num_tasks
        if len(w) != self.num_tasks:
            raise ValueError(f"RankerTrain: {len(w)} task weights for {self.num_tasks} tasks")
        self.register_buffer("task_weights", torch.tensor(w), persistent=False)

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        logits = self.model(batch.dense_features, batch.sparse_features)
        if self.num_tasks == 1:
            logits = logits.squeeze(-1)
            loss = self.loss_fn(logits, batch.labels)
        else:
            labels = _task_labels(batch, self.num_tasks)
            per_task = nn.functional.binary_cross_entropy_with_logits(
                logits, labels, reduction="none").mean(dim=0)
            loss = (per_task * self.task_weights).sum()
        return loss, (loss.detach(), logits.detach(), batch.labels.detach())


@torch.fx.wrap
def _task_labels(batch: Batch, num_tasks: int) -> torch.Tensor:
    labels = batch.task_labels
    if labels is None or labels.dim() != 2 or labels.shape[1] != num_tasks:
        raise ValueError(
            f"multi-task ranker ({num_tasks} tasks) needs batch.task_labels [B, {num_tasks}], "
            f"got {None if labels is None else tuple(labels.shape)} (set the tasks on the "
            "samples: RankingSamples.set_tasks)")
    return labels
