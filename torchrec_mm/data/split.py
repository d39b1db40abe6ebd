"""The evaluation split of a dataset: cold (new) items, held-out users and a time cut.

``make_split`` assigns every interaction to exactly one of

* ``test_cold`` (2): the item is one of the **cold items** — a random ``cold_item_frac``
  of the items that have interactions. The draw is **stratified over popularity**:
  items are sorted by interaction count (ties in random order) and cut into
  ``n_cold`` consecutive strata of (almost) equal size, and one item is drawn from each
  stratum, so cold items cover head, torso and tail like the catalogue does (a plain
  uniform draw would be almost all tail items). *All* interactions of a cold item are
  ``test_cold``: the rankers never see the item id in training, as with a new item.
* ``test_warm`` (1): among the other interactions, those of a **held-out user** — a
  seeded random ``test_user_frac`` of the users with interactions (default 0: none),
  whose whole history is test, as the RED-Rec paper's evaluation users are not its
  training users (§5.1) — and those with ``timestamp >= time_cut``, where ``time_cut``
  is the ``1 - test_time_frac`` quantile of the remaining (training users') timestamps
  (the ``floor((1 - f) * n)``-th smallest; ties go to the test side).
* ``train`` (0): the rest.

A split with held-out users needs the user of every interaction:
``split.assign(item_id, timestamp, user_id)`` (it raises without ``user_id``, so no
reader silently trains on a held-out user).

The split is stored in ``split.json`` next to ``meta.json`` (written atomically)::

    {"format": "torchrec-mm/split-v1", "cold_items": [...], "time_cut": 1700000000,
     "num_items": 5000, "num_interactions": 200000, "cold_item_frac": 0.1,
     "test_time_frac": 0.1, "test_user_frac": 0.0, "test_users": [...], "seed": 0,
     "counts": {"train": ..., "test_warm": ..., "test_cold": ...}}

Example::

    split = load_split("out/synth")
    cols = load_interaction_columns("out/synth", ["user_id", "item_id", "timestamp"])
    part = split.assign(cols["item_id"], cols["timestamp"], cols["user_id"])  # int8 [n]
"""

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np

from torchrec_mm.data.io import load_interaction_columns, load_meta
from torchrec_mm.data.schema import SPLIT_FILE, DataError
from torchrec_mm.utils.io import write_json

SPLIT_FORMAT = "torchrec-mm/split-v1"
TRAIN, TEST_WARM, TEST_COLD = 0, 1, 2
SPLIT_NAMES = ["train", "test_warm", "test_cold"]


@dataclass
class Split:
    """A loaded split.

    Attributes:
        cold_items: [C] int64 sorted ids of the cold (new) items.
        time_cut: interactions of warm items with ``timestamp >= time_cut`` are
            test_warm.
        num_items: item count of the dataset the split was made for.
        info: the other keys of split.json (fractions, seed, counts).
        test_users: [H] int64 sorted ids of the held-out users (all their interactions
            are test).
    """

    cold_items: np.ndarray
    time_cut: int
    num_items: int
    info: Dict[str, Any] = field(default_factory=dict)
    test_users: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        self.test_users = np.unique(np.asarray(self.test_users, dtype=np.int64))
        self.cold_items = np.unique(np.asarray(self.cold_items, dtype=np.int64))
        self._cold_mask = np.zeros(self.num_items, dtype=bool)
        self._cold_mask[self.cold_items] = True

    @property
    def cold_mask(self) -> np.ndarray:
        """[num_items] bool, True for cold items."""
        return self._cold_mask

    def assign(self, item_id: np.ndarray, timestamp: np.ndarray,
               user_id: Optional[np.ndarray] = None) -> np.ndarray:
        """Split of each interaction.

        Args:
            item_id: [n] int item ids in ``[0, num_items)``.
            timestamp: [n] int timestamps.
            user_id: [n] int user of each interaction; required when the split holds
                out users (:attr:`test_users`), ignored otherwise.

        Returns:
            [n] int8: 0 train, 1 test_warm, 2 test_cold.

        Raises:
            ValueError: shapes differ, an item id is out of range, or ``user_id`` is
                missing for a split with held-out users.
        """
        item_id = np.asarray(item_id, dtype=np.int64)
        timestamp = np.asarray(timestamp)
        if item_id.shape != timestamp.shape:
            raise ValueError(f"item_id {item_id.shape} and timestamp {timestamp.shape} differ")
        if item_id.size and (item_id.min() < 0 or item_id.max() >= self.num_items):
            raise ValueError(f"item ids must be in [0, {self.num_items})")
        out = (timestamp >= self.time_cut).astype(np.int8)
        if self.test_users.size:
            if user_id is None:
                raise ValueError(
                    f"this split holds out {self.test_users.size} users (all their "
                    "interactions are test): Split.assign needs the user_id column")
            user_id = np.asarray(user_id, dtype=np.int64)
            if user_id.shape != item_id.shape:
                raise ValueError(f"user_id {user_id.shape} and item_id {item_id.shape} differ")
            out[np.isin(user_id, self.test_users)] = TEST_WARM
        out[self._cold_mask[item_id]] = TEST_COLD
        return out

    def to_json(self) -> Dict[str, Any]:
        return {**self.info, "format": SPLIT_FORMAT, "cold_items": self.cold_items.tolist(),
                "time_cut": int(self.time_cut), "num_items": int(self.num_items),
                "test_users": self.test_users.tolist()}


def compute_split(item_id: np.ndarray, timestamp: np.ndarray, num_items: int,
                  cold_item_frac: float = 0.1, test_time_frac: float = 0.1,
                  seed: int = 0, test_user_frac: float = 0.0,
                  user_id: Optional[np.ndarray] = None) -> Split:
    """Computes the split from the interaction columns (pure numpy).

    Args:
        item_id: [n] int64 item of each interaction.
        timestamp: [n] int64 time of each interaction.
        num_items: number of items of the dataset.
        cold_item_frac: fraction of the items *with interactions* made cold.
        test_time_frac: fraction of the training users' warm interactions (the latest)
            made test_warm.
        seed: random seed of the cold-item and held-out-user draws (independent streams:
            the cold items do not depend on ``test_user_frac``).
        test_user_frac: fraction of the users *with interactions* held out (all their
            interactions test); needs ``user_id``.
        user_id: [n] int64 user of each interaction.
    """
    if not 0.0 <= cold_item_frac < 1.0:
        raise ValueError(f"cold_item_frac must be in [0, 1), got {cold_item_frac}")
    if not 0.0 <= test_time_frac < 1.0:
        raise ValueError(f"test_time_frac must be in [0, 1), got {test_time_frac}")
    if not 0.0 <= test_user_frac < 1.0:
        raise ValueError(f"test_user_frac must be in [0, 1), got {test_user_frac}")
    if test_user_frac > 0 and user_id is None:
        raise ValueError("test_user_frac > 0 needs user_id (the user of every interaction)")
    item_id = np.asarray(item_id, dtype=np.int64)
    timestamp = np.asarray(timestamp, dtype=np.int64)
    rng = np.random.default_rng(seed)
    count = np.bincount(item_id, minlength=num_items)
    active = np.flatnonzero(count > 0)
    n_cold = int(round(cold_item_frac * len(active)))
    if cold_item_frac > 0 and len(active) > 1:
        n_cold = max(n_cold, 1)
    n_cold = min(n_cold, max(len(active) - 1, 0))  # keep at least one warm item
    # popularity order, ties in random order
    order = active[np.lexsort((rng.random(len(active)), count[active]))]
    if n_cold:
        bounds = (np.arange(n_cold + 1) * len(order)) // n_cold
        size = np.diff(bounds)
        pick = bounds[:-1] + (rng.random(n_cold) * size).astype(np.int64)
        cold = np.sort(order[pick])
    else:
        cold = np.zeros(0, np.int64)
    cold_mask = np.zeros(num_items, bool)
    cold_mask[cold] = True
    held = np.zeros(0, np.int64)
    kept_user = np.ones(item_id.shape[0], bool)
    if test_user_frac > 0:
        user_id = np.asarray(user_id, dtype=np.int64)
        if user_id.shape != item_id.shape:
            raise ValueError(f"user_id {user_id.shape} and item_id {item_id.shape} differ")
        users = np.unique(user_id)
        n_held = min(max(int(round(test_user_frac * len(users))), 1), max(len(users) - 1, 0))
        held = np.sort(np.random.default_rng([seed, 1]).choice(users, n_held, replace=False))
        kept_user = ~np.isin(user_id, held)
    warm_ts = np.sort(timestamp[~cold_mask[item_id] & kept_user])
    if test_time_frac == 0 or len(warm_ts) == 0:
        time_cut = int(warm_ts[-1]) + 1 if len(warm_ts) else 0
    else:
        k = int(np.floor((1.0 - test_time_frac) * len(warm_ts)))
        time_cut = int(warm_ts[min(k, len(warm_ts) - 1)])
    split = Split(cold, time_cut, num_items,
                  info={"cold_item_frac": cold_item_frac, "test_time_frac": test_time_frac,
                        "test_user_frac": test_user_frac, "seed": seed,
                        "num_interactions": int(len(item_id))},
                  test_users=held)
    parts = split.assign(item_id, timestamp, user_id)
    split.info["counts"] = {name: int(c) for name, c in
                            zip(SPLIT_NAMES, np.bincount(parts, minlength=3))}
    return split


def make_split(data_dir: str, cold_item_frac: float = 0.1, test_time_frac: float = 0.1,
               seed: int = 0, test_user_frac: float = 0.0) -> Split:
    """Computes the split of the dataset in ``data_dir`` and writes ``split.json``
    atomically (replacing any previous split). See the module docstring."""
    meta = load_meta(data_dir)
    cols = load_interaction_columns(data_dir, ["user_id", "item_id", "timestamp"])
    split = compute_split(cols["item_id"], cols["timestamp"], meta.num_items, cold_item_frac,
                          test_time_frac, seed, test_user_frac, cols["user_id"])
    write_json(os.path.join(data_dir, SPLIT_FILE), split.to_json())
    return split


def load_split(data_dir: str, meta_check: bool = True) -> Split:
    """Reads ``split.json`` of ``data_dir``.

    Raises:
        FileNotFoundError: no split (make one with ``torchrec-mm data split``).
        DataError: a malformed split file, or one made for a different dataset.
    """
    path = os.path.join(data_dir, SPLIT_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run `torchrec-mm data split --data "
                                f"{data_dir}` first")
    with open(path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(path, f"line {e.lineno}", None, f"invalid JSON: {e.msg}") from None
    if raw.get("format") != SPLIT_FORMAT:
        raise DataError(path, 0, "format", f"expected {SPLIT_FORMAT!r}, got {raw.get('format')!r}")
    for key in ("cold_items", "time_cut", "num_items"):
        if key not in raw:
            raise DataError(path, 0, key, "missing required key")
    cold = raw["cold_items"]
    if not isinstance(cold, list) or not all(isinstance(c, int) and not isinstance(c, bool)
                                             for c in cold):
        raise DataError(path, 0, "cold_items", "must be a list of integer item ids")
    num_items = raw["num_items"]
    if not isinstance(num_items, int) or not isinstance(raw["time_cut"], int):
        raise DataError(path, 0, "time_cut", "time_cut and num_items must be integers")
    if cold and (min(cold) < 0 or max(cold) >= num_items):
        raise DataError(path, 0, "cold_items", f"item ids must be in [0, {num_items})")
    held = raw.get("test_users", [])
    if not isinstance(held, list) or not all(isinstance(u, int) and not isinstance(u, bool)
                                             and u >= 0 for u in held):
        raise DataError(path, 0, "test_users", "must be a list of non-negative user ids")
    if meta_check:
        meta = load_meta(data_dir)
        if meta.num_items != num_items or (
                "num_interactions" in raw and raw["num_interactions"] != meta.num_interactions):
            raise DataError(path, 0, "num_items",
                            "split.json was made for a different version of this dataset "
                            "(item or interaction count differs); run `data split` again")
    info = {k: v for k, v in raw.items()
            if k not in ("cold_items", "time_cut", "num_items", "format", "test_users")}
    return Split(np.asarray(cold, dtype=np.int64), int(raw["time_cut"]), int(num_items), info,
                 np.asarray(held, dtype=np.int64))


def split_summary(split: Split) -> str:
    c = split.info.get("counts", {})
    held = f", {len(split.test_users)} held-out users" if split.test_users.size else ""
    return (f"split: {len(split.cold_items)} cold items{held}, time_cut {split.time_cut}; "
            + ", ".join(f"{k} {c.get(k, '?')}" for k in SPLIT_NAMES))

