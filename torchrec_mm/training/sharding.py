"""Sharders and sharding plans for CPU (gloo) and GPU (nccl).

On CPU, TorchRec's stock ``EmbeddingBagCollectionSharder`` leaves out row-wise
sharding although it runs correctly on gloo (see TORCHREC_NOTES); the sharders here
offer it. ``EmbeddingCollection`` offers table-wise, column-wise and row-wise on CPU
(data-parallel EC is not supported by the fbgemm CPU kernel, torchrec #1255).
"""

from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType

SHARDING_TYPES = ("auto", "table_wise", "column_wise", "row_wise", "table_row_wise",
                  "data_parallel")
_EC_CPU = [ShardingType.TABLE_WISE.value, ShardingType.COLUMN_WISE.value,
           ShardingType.ROW_WISE.value]


class CPUEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """EBC sharder that also offers row-wise / table-row-wise on CPU."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        if compute_device_type == "cpu":
            return super().sharding_types("cuda")
        return super().sharding_types(compute_device_type)


class CPUEmbeddingCollectionSharder(EmbeddingCollectionSharder):
    """EC sharder restricted to the sharding types the CPU kernels support."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        if compute_device_type == "cpu":
            return list(_EC_CPU)
        return super().sharding_types(compute_device_type)


def default_sharders(device: torch.device) -> List[ModuleSharder[nn.Module]]:
    """The sharders torchrec-mm uses (plugins append their own)."""
    if device.type == "cpu":
        return [CPUEmbeddingBagCollectionSharder(), CPUEmbeddingCollectionSharder()]
    return [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]


def table_names(module: nn.Module) -> Dict[str, bool]:
    """``{table name: is_sequence_table}`` of every EBC/EC inside ``module``."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    out: Dict[str, bool] = {}
    for m in module.modules():
        if isinstance(m, EmbeddingBagCollection):
            out.update({t.name: False for t in m.embedding_bag_configs()})
        elif isinstance(m, EmbeddingCollection):
            out.update({t.name: True for t in m.embedding_configs()})
    return out


def make_constraints(module: nn.Module, sharding_type: str) -> Dict[str, ParameterConstraints]:
    """Constraints forcing one sharding type on every table (``auto``: planner's choice).

    Sequence (EC) tables cannot be data-parallel on CPU; for them ``data_parallel``
    falls back to table-wise.
    """
    if sharding_type not in SHARDING_TYPES:
        raise ValueError(f"unknown sharding type '{sharding_type}', expected one of "
                         f"{SHARDING_TYPES}")
    if sharding_type == "auto":
        return {}
    out = {}
    for name, is_seq in table_names(module).items():
        st = sharding_type
        if is_seq and st in ("data_parallel", "table_row_wise"):
            st = "table_wise" if st == "data_parallel" else "row_wise"
        kernels = [EmbeddingComputeKernel.DENSE.value] if st == "data_parallel" else [
            EmbeddingComputeKernel.FUSED.value]
        out[name] = ParameterConstraints(sharding_types=[st], compute_kernels=kernels)
    return out


def make_plan(
    module: nn.Module,
    world_size: int,
    device: torch.device,
    sharding_type: str = "auto",
    batch_size: Optional[int] = None,
    sharders: Optional[List[ModuleSharder[nn.Module]]] = None,
    pg: Optional[dist.ProcessGroup] = None,
) -> ShardingPlan:
    """A plan from ``EmbeddingShardingPlanner`` (computed on rank 0, broadcast)."""
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, compute_device=device.type),
        batch_size=batch_size,
        constraints=make_constraints(module, sharding_type),
        debug=False,
    )
    sharders = sharders or default_sharders(device)
    if dist.is_initialized():
        return planner.collective_plan(module, sharders, pg)
    return planner.plan(module, sharders)
