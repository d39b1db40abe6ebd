"""Stage-1 targets: the trained ranker's item-ID embeddings (IDProxy 3.1.1).

The item-ID table is read from the latest checkpoint of a ``torchrec-mm train`` run
(the unique tensor whose key ends in ``t_item_id.weight``; sharded tables are stored
gathered in full) or from a plain safetensors file with a named tensor, for rankers
trained elsewhere. Items updated fewer than ``tau`` times in training (training
impressions of the item, from the dataset's split) are dropped — their embeddings are
barely trained — and the rest are ℓ2-normalised (all-zero rows are dropped and
counted).
"""

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

logger = logging.getLogger(__name__)

ITEM_TABLE_SUFFIX = "t_item_id.weight"


@dataclass
class ItemTargets:
    """The alignment targets of stage 1.

    Attributes:
        item_ids: ``[M]`` int64 ids of the kept items (sorted).
        embeddings: ``[M, d]`` float32, ℓ2-normalised ID embeddings of those items.
        counts: ``[N]`` int64 training impressions of every item of the table.
        table: where the table came from (checkpoint key or ``file:key``).
        info: counts of dropped items and the settings.
    """

    item_ids: torch.Tensor
    embeddings: torch.Tensor
    counts: torch.Tensor
    table: str = ""
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return int(self.item_ids.shape[0])


def find_item_table(tensors: Dict[str, torch.Tensor], source: str,
                    suffix: str = ITEM_TABLE_SUFFIX) -> Tuple[str, torch.Tensor]:
    """The unique model tensor of ``tensors`` whose key ends in ``suffix``.

    Optimizer state (keys under ``/optimizer``) is ignored.

    Raises:
        KeyError: none or several such tensors (the message lists them).
    """
    keys = sorted(k for k in tensors if k.endswith(suffix) and not k.startswith("/optimizer"))
    if not keys:
        raise KeyError(f"{source}: no tensor whose key ends in '{suffix}' (the item-ID "
                       f"table); {len(tensors)} tensors present. Use --table-file/--table-key "
                       "for a table stored elsewhere")
    if len(keys) > 1:
        raise KeyError(f"{source}: several tensors end in '{suffix}': {keys}; pass the one "
                       "to use with --table-file/--table-key")
    return keys[0], tensors[keys[0]]


def load_item_table(run_dir: Optional[str] = None, table_file: Optional[str] = None,
                    table_key: Optional[str] = None) -> Tuple[str, torch.Tensor]:
    """``(name, [N, d] float32 table)`` from a run's latest checkpoint or a file.

    Args:
        run_dir: a ``torchrec-mm train`` run directory (``checkpoints/LATEST``).
        table_file: a safetensors file (takes precedence over ``run_dir``).
        table_key: tensor name in ``table_file`` (default: the unique key ending in
            ``t_item_id.weight``, or the only tensor of the file).
    """
    from torchrec_mm.utils.io import load_tensors

    if table_file is not None:
        if not os.path.exists(table_file):
            raise FileNotFoundError(f"table file {table_file} not found")
        tensors = load_tensors(table_file)
        if table_key is not None:
            if table_key not in tensors:
                raise KeyError(f"{table_file}: no tensor '{table_key}' (has "
                               f"{sorted(tensors)[:10]})")
            key = table_key
        elif len(tensors) == 1:
            key = next(iter(tensors))
        else:
            key, _ = find_item_table(tensors, table_file)
        name, table = f"{table_file}:{key}", tensors[key]
    else:
        if run_dir is None:
            raise ValueError("give a run directory or a table file")
        from torchrec_mm.training.checkpoint import latest_checkpoint, read_checkpoint

        root = os.path.join(run_dir, "checkpoints")
        ckpt = latest_checkpoint(root) if os.path.isdir(root) else None
        if ckpt is None:
            raise FileNotFoundError(f"{run_dir}: no checkpoint under {root} (train the ranker "
                                    "with `torchrec-mm train` first)")
        _, _, tensors = read_checkpoint(ckpt)
        key, table = find_item_table(tensors, ckpt)
        name = f"{ckpt}:{key}"
    if table.dim() != 2:
        raise ValueError(f"item table {name} must be 2-D [num_items, dim], got shape "
                         f"{tuple(table.shape)}")
    return name, table.float()


def run_data_dir(run_dir: str) -> str:
    """The dataset directory recorded in ``run_dir/config.json``."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: pass the dataset directory (--data)")
    with open(path) as f:
        return json.load(f)["data"]


def training_counts(data_dir: str, num_items: int) -> np.ndarray:
    """``[num_items]`` int64 training impressions per item (``split.json`` train part)."""
    from torchrec_mm.data.io import load_interaction_columns
    from torchrec_mm.data.split import TRAIN, load_split

    cols = load_interaction_columns(data_dir, ["user_id", "item_id", "timestamp"])
    split = load_split(data_dir)
    train = split.assign(cols["item_id"], cols["timestamp"], cols["user_id"]) == TRAIN
    return np.bincount(cols["item_id"][train], minlength=num_items).astype(np.int64)


def make_targets(table: torch.Tensor, counts: np.ndarray, tau: int, name: str = "table"
                 ) -> ItemTargets:
    """Filters and normalises an item table.

    Args:
        table: ``[N, d]`` item-ID embeddings.
        counts: ``[N]`` training impressions per item.
        tau: keep items with ``counts >= tau``.
        name: table name for messages.
    """
    table = table.detach().float().cpu()
    counts = np.asarray(counts, dtype=np.int64)
    if counts.shape[0] != table.shape[0]:
        raise ValueError(f"item table {name} has {table.shape[0]} rows but the dataset has "
                         f"{counts.shape[0]} items: the table belongs to another dataset")
    finite = torch.isfinite(table).all(dim=1).numpy()
    keep_count = counts >= tau
    bad = np.nonzero(keep_count & ~finite)[0]
    if bad.size:
        raise ValueError(f"item table {name}: embedding of item {int(bad[0])} is NaN/Inf "
                         f"({bad.size} such items)")
    norms = table.norm(dim=1).numpy()
    zero = keep_count & (norms == 0)
    keep = np.nonzero(keep_count & ~zero)[0]
    if keep.size == 0:
        raise ValueError(f"item table {name}: no item has >= {tau} training impressions "
                         f"(max {int(counts.max(initial=0))}); lower tau")
    ids = torch.from_numpy(keep.astype(np.int64))
    emb = torch.nn.functional.normalize(table[ids], dim=1)
    info = {"tau": int(tau), "num_items": int(table.shape[0]), "num_targets": int(keep.size),
            "dropped_below_tau": int((~keep_count).sum()), "dropped_zero": int(zero.sum())}
    if zero.any():
        logger.warning("item table %s: %d all-zero rows dropped (e.g. item %d)", name,
                       int(zero.sum()), int(np.nonzero(zero)[0][0]))
    return ItemTargets(item_ids=ids, embeddings=emb, counts=torch.from_numpy(counts),
                       table=name, info=info)


def load_item_targets(run_dir: Optional[str], tau: int = 5, data_dir: Optional[str] = None,
                      table_file: Optional[str] = None, table_key: Optional[str] = None
                      ) -> ItemTargets:
    """The stage-1 targets of a trained ranker.

    Args:
        run_dir: ``torchrec-mm train`` run directory (may be ``None`` with
            ``table_file``).
        tau: minimum number of training impressions ("updates") of a kept item.
        data_dir: the run's dataset (default: ``run_dir/config.json``'s ``data``).
        table_file / table_key: read the table from a safetensors file instead.

    Returns:
        :class:`ItemTargets` with ``M <= N`` items.
    """
    if data_dir is None:
        if run_dir is None:
            raise ValueError("data_dir is required when no run directory is given")
        data_dir = run_data_dir(run_dir)
    name, table = load_item_table(run_dir, table_file, table_key)
    from torchrec_mm.data.io import load_meta

    n_items = load_meta(data_dir).num_items
    if n_items != table.shape[0]:
        raise ValueError(f"item table {name} has {table.shape[0]} rows but {data_dir} has "
                         f"{n_items} items: the table belongs to another dataset")
    counts = training_counts(data_dir, n_items)
    targets = make_targets(table, counts, tau, name)
    targets.info["source_run"] = os.path.abspath(run_dir) if run_dir else None
    targets.info["data_dir"] = os.path.abspath(data_dir)
    return targets
