"""Ranking samples as TorchRec batches.

A ranking sample is one interaction (an impression with its click label) plus the
user's history of positive items before it. :class:`RankingSamples` is a compact,
columnar in-memory index over a dataset (a few numpy columns per interaction, built
from the streamed parquet parts); :func:`make_batch` turns a set of sample rows into a
:class:`Batch` — a ``KeyedJaggedTensor`` of sparse features, a dense feature matrix and
labels — with vectorised gathers only, so it stays far cheaper than a train step.

Sparse features (KJT keys)::

    user_id        1 id per sample
    item_id        1 id per sample (the target item)
    scenario       1 id per sample
    attr_<name>    1 id per sample, one key per user attribute of users.parquet
    hist_item_id   jagged: the user's latest ``history_length`` positive items before
                   the sample, latest first

Dense features (``DENSE_FEATURE_NAMES``): log history length, hour of day (sin, cos).

History visibility: a training sample sees only positives of training interactions
(no test items, no cold items leak into training); a test sample sees every earlier
positive, as a serving system would.
"""

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from torchrec_mm.data.schema import DatasetMeta

USER_FEATURE = "user_id"
ITEM_FEATURE = "item_id"
SCENARIO_FEATURE = "scenario"
HISTORY_FEATURE = "hist_item_id"
DENSE_FEATURE_NAMES: List[str] = ["log_hist_len", "hour_sin", "hour_cos"]

SPLIT_TRAIN = 0
SPLIT_TEST_WARM = 1
SPLIT_TEST_COLD = 2
SPLIT_NAMES = {"train": SPLIT_TRAIN, "test_warm": SPLIT_TEST_WARM,
               "test_cold": SPLIT_TEST_COLD}


@dataclass
class Batch(Pipelineable):
    """One ranking batch (the ``torchrec.datasets.utils.Batch`` fields plus ids).

    Attributes:
        dense_features: [B, len(DENSE_FEATURE_NAMES)] float32.
        sparse_features: KJT with the keys listed in the module docstring.
        labels: [B] float32 click labels.
        user_ids / item_ids: [B] int64, for per-user metrics and slices.
        task_labels: [B, T] float32 labels of a multi-task ranker (column 0 = the click),
            when the samples have tasks (:meth:`RankingSamples.set_tasks`), else None.
        timestamps: [B] int64 sample times (for time-aware batch transforms, e.g. the
            ``redrec_user`` plugin's snapshot choice); None if unknown.
    """

    dense_features: torch.Tensor
    sparse_features: KeyedJaggedTensor
    labels: torch.Tensor
    user_ids: torch.Tensor
    item_ids: torch.Tensor
    task_labels: Optional[torch.Tensor] = None
    timestamps: Optional[torch.Tensor] = None

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(
            dense_features=self.dense_features.to(device=device, non_blocking=non_blocking),
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            user_ids=self.user_ids.to(device=device, non_blocking=non_blocking),
            item_ids=self.item_ids.to(device=device, non_blocking=non_blocking),
            task_labels=None if self.task_labels is None else self.task_labels.to(
                device=device, non_blocking=non_blocking),
            timestamps=None if self.timestamps is None else self.timestamps.to(
                device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.dense_features.record_stream(stream)
        self.sparse_features.record_stream(stream)
        self.labels.record_stream(stream)
        self.user_ids.record_stream(stream)
        self.item_ids.record_stream(stream)
        if self.task_labels is not None:
            self.task_labels.record_stream(stream)
        if self.timestamps is not None:
            self.timestamps.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(
            dense_features=self.dense_features.pin_memory(),
            sparse_features=self.sparse_features.pin_memory(),
            labels=self.labels.pin_memory(),
            user_ids=self.user_ids.pin_memory(),
            item_ids=self.item_ids.pin_memory(),
            task_labels=None if self.task_labels is None else self.task_labels.pin_memory(),
            timestamps=None if self.timestamps is None else self.timestamps.pin_memory(),
        )

    @property
    def batch_size(self) -> int:
        return int(self.labels.numel())


@dataclass
class FeatureLayout:
    """What a ranker needs to know about the features of a dataset.

    Attributes:
        num_users / num_items / num_scenarios: table sizes.
        user_attrs: ``{"attr_<name>": cardinality}``.
        history_length: max length of ``hist_item_id``.
    """

    num_users: int
    num_items: int
    num_scenarios: int
    user_attrs: Dict[str, int] = field(default_factory=dict)
    history_length: int = 50
    dense_feature_names: List[str] = field(default_factory=lambda: list(DENSE_FEATURE_NAMES))

    @property
    def num_dense(self) -> int:
        return len(self.dense_feature_names)

    @property
    def sparse_keys(self) -> List[str]:
        return [USER_FEATURE, ITEM_FEATURE, SCENARIO_FEATURE, *self.user_attrs,
                HISTORY_FEATURE]

    @staticmethod
    def from_meta(meta: DatasetMeta, history_length: int = 50) -> "FeatureLayout":
        return FeatureLayout(
            num_users=meta.num_users,
            num_items=meta.num_items,
            num_scenarios=len(meta.scenarios),
            user_attrs=dict(sorted(meta.user_attrs.items())),
            history_length=history_length,
        )


def build_batch(layout: FeatureLayout, users: np.ndarray, items: np.ndarray,
                scenarios: np.ndarray, timestamps: np.ndarray, user_attrs: List[np.ndarray],
                hist_lengths: np.ndarray, hist_values: np.ndarray,
                labels: Optional[np.ndarray] = None,
                task_labels: Optional[np.ndarray] = None) -> Batch:
    """The :class:`Batch` of B samples from their columns (vectorised) — the one place
    the ranker's features are laid out, for training (:meth:`RankingSamples.make_batch`)
    and for scoring requests (``torchrec_mm.serving.scoring``).

    Args:
        users / items / scenarios / timestamps: [B] int64 (scenario: index).
        user_attrs: one [B] int64 array per ``layout.user_attrs`` key, in order.
        hist_lengths: [B] history lengths; hist_values: [sum] item ids, latest first.
        labels: [B] click labels (default zeros); task_labels: [B, T] or None.
    """
    B = int(users.shape[0])
    singles = [users, items, scenarios] + list(user_attrs)
    values = np.concatenate([np.asarray(v, dtype=np.int64) for v in singles]
                            + [np.asarray(hist_values, dtype=np.int64)])
    lengths = np.concatenate([np.ones(B * len(singles), dtype=np.int64),
                              np.asarray(hist_lengths, dtype=np.int64)])
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=layout.sparse_keys,
        values=torch.from_numpy(values),
        lengths=torch.from_numpy(lengths.astype(np.int32)),
    )
    hour = (np.asarray(timestamps) % 86400) / 3600.0
    angle = 2 * math.pi * hour / 24.0
    dense = np.stack(
        # history fill in [0, 1] (0 without history features: history_length 0)
        [np.log1p(hist_lengths) / (math.log1p(layout.history_length) or 1.0),
         np.sin(angle), np.cos(angle)], axis=1).astype(np.float32)
    return Batch(
        dense_features=torch.from_numpy(dense),
        sparse_features=kjt,
        labels=torch.from_numpy(np.zeros(B, np.float32) if labels is None
                                else np.asarray(labels, dtype=np.float32).copy()),
        user_ids=torch.from_numpy(np.asarray(users, dtype=np.int64).copy()),
        item_ids=torch.from_numpy(np.asarray(items, dtype=np.int64).copy()),
        task_labels=None if task_labels is None else torch.from_numpy(task_labels),
        timestamps=torch.from_numpy(np.asarray(timestamps, dtype=np.int64).copy()),
    )


class RankingSamples:
    """Columnar index of ranking samples of one dataset.

    Interactions are held sorted by (user, timestamp) as compact numpy columns; the
    positive items form per-visibility "streams" so a sample's history is a slice
    ``stream[hist_end - n : hist_end]``.

    Args:
        columns: ``user_id, item_id, scenario (int index), timestamp, label`` arrays of
            equal length N (see ``torchrec_mm.data.io.load_interaction_columns``), and
            optionally ``actions`` (the action bit masks, for multi-task labels).
        split: [N] int8 split of each interaction (SPLIT_TRAIN/TEST_WARM/TEST_COLD).
        user_attr_values: ``{"attr_<name>": [num_users] int64}``.
        layout: the feature layout (history length etc.).
        action_names: names of the action bits (``meta.actions``).
        source: where the columns come from, for error messages.
    """

    def __init__(
        self,
        columns: Dict[str, np.ndarray],
        split: np.ndarray,
        user_attr_values: Dict[str, np.ndarray],
        layout: FeatureLayout,
        action_names: Optional[List[str]] = None,
        source: str = "<columns>",
    ) -> None:
        order = np.lexsort((columns["timestamp"], columns["user_id"]))
        self.user = columns["user_id"][order].astype(np.int64)
        self.item = columns["item_id"][order].astype(np.int64)
        self.scenario = columns["scenario"][order].astype(np.int64)
        self.timestamp = columns["timestamp"][order].astype(np.int64)
        self.label = columns["label"][order].astype(np.float32)
        self.split = split[order].astype(np.int8)
        self.actions = (columns["actions"][order].astype(np.int64) if "actions" in columns
                        else None)
        self.action_names = list(action_names or [])
        self.source = source
        #: extra task labels of :meth:`make_batch` (see :meth:`set_tasks`): action bits
        self.task_bits: List[int] = []
        self.task_names: List[str] = []
        self.layout = layout
        #: applied in order to every batch :meth:`make_batch` builds (plugins' feature
        #: transforms, e.g. QARM's code features; see ``RankerPlugin.batch_transform``)
        self.batch_transforms: List[Callable[["Batch"], "Batch"]] = []
        self.user_attr_values = {k: np.asarray(v, dtype=np.int64)
                                 for k, v in user_attr_values.items()}
        for k in layout.user_attrs:
            if k not in self.user_attr_values:
                raise ValueError(f"user attribute '{k}' of the layout has no values")
        positive = self.label > 0
        # Stream "train": positives of training interactions; "all": every positive.
        self._streams: Dict[str, np.ndarray] = {}
        self._hist_end: Dict[str, np.ndarray] = {}
        for name, visible in (("train", positive & (self.split == SPLIT_TRAIN)),
                              ("all", positive)):
            self._streams[name] = self.item[visible]
            # number of visible positives strictly before each row (global count)
            before = np.cumsum(visible) - visible
            self._hist_end[name] = before.astype(np.int64)
        # first stream index of each row's user, per stream
        user_first_row = np.searchsorted(self.user, self.user, side="left")
        self._user_start = {name: self._hist_end[name][user_first_row]
                            for name in self._streams}

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def set_tasks(self, tasks: List[str]) -> None:
        """Makes :meth:`make_batch` add ``task_labels`` [B, 1 + len(tasks)]: the click
        label, then the action bits named ``tasks`` (names of ``meta.actions``)."""
        tasks = list(tasks)
        if not tasks:
            self.task_bits, self.task_names = [], []
            return
        if self.actions is None:
            raise ValueError(f"{self.source}: tasks {tasks} need the interactions' "
                             "'actions' column, which these samples were built without")
        unknown = [t for t in tasks if t not in self.action_names]
        if unknown:
            raise ValueError(f"{self.source}: unknown task(s) {unknown}; the dataset's "
                             f"actions (meta.json 'actions') are {self.action_names}")
        self.task_bits = [self.action_names.index(t) for t in tasks]
        self.task_names = tasks

    def task_labels(self, rows: np.ndarray) -> np.ndarray:
        """[len(rows), 1 + len(tasks)] float32: click label, then each task's bit."""
        rows = np.asarray(rows, dtype=np.int64)
        cols = [self.label[rows]]
        if self.task_bits:
            acts = self.actions[rows]
            cols += [((acts >> b) & 1).astype(np.float32) for b in self.task_bits]
        return np.stack(cols, axis=1).astype(np.float32)

    @staticmethod
    def from_dataset(data_dir: str, history_length: int = 50) -> "RankingSamples":
        """Builds the index from a dataset directory with a ``split.json``."""
        from torchrec_mm.data.io import load_interaction_columns, load_users
        from torchrec_mm.data.split import load_split

        meta = DatasetMeta.load(data_dir)
        cols = load_interaction_columns(
            data_dir, ["user_id", "item_id", "scenario", "timestamp", "label", "actions"])
        split = load_split(data_dir).assign(cols["item_id"], cols["timestamp"], cols["user_id"])
        users = load_users(data_dir)
        attr_values = {}
        for name in meta.user_attrs:
            values = np.zeros(meta.num_users, dtype=np.int64)
            values[users.column("user_id").to_numpy()] = users.column(name).to_numpy()
            attr_values[name] = values
        layout = FeatureLayout.from_meta(meta, history_length)
        return RankingSamples(cols, split, attr_values, layout, action_names=meta.actions,
                              source=data_dir)

    def rows(self, split: str) -> np.ndarray:
        """Row indices of one split (``train``, ``test_warm``, ``test_cold``, ``test``)."""
        if split == "test":
            return np.nonzero(self.split != SPLIT_TRAIN)[0]
        return np.nonzero(self.split == SPLIT_NAMES[split])[0]

    def history(self, rows: np.ndarray, stream: str) -> "tuple[np.ndarray, np.ndarray]":
        """Histories of ``rows``: (lengths [B], values [sum(lengths)], latest first)."""
        end = self._hist_end[stream][rows]
        start = np.maximum(self._user_start[stream][rows], end - self.layout.history_length)
        lengths = end - start
        total = int(lengths.sum())
        offsets = np.cumsum(lengths) - lengths
        within = np.arange(total, dtype=np.int64) - np.repeat(offsets, lengths)
        idx = np.repeat(end - 1, lengths) - within
        return lengths, self._streams[stream][idx]

    def make_batch(self, rows: np.ndarray, stream: Optional[str] = None) -> Batch:
        """Builds a :class:`Batch` from sample rows (vectorised).

        Args:
            rows: [B] row indices of this index.
            stream: history visibility, ``"train"`` or ``"all"``; default: ``"train"``
                when every row is a training row, else ``"all"``.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if stream is None:
            stream = "train" if bool((self.split[rows] == SPLIT_TRAIN).all()) else "all"
        users = self.user[rows]
        hist_len, hist_values = self.history(rows, stream)
        batch = build_batch(
            self.layout, users, self.item[rows], self.scenario[rows], self.timestamp[rows],
            [self.user_attr_values[k][users] for k in self.layout.user_attrs],
            hist_len, hist_values, labels=self.label[rows],
            task_labels=self.task_labels(rows) if self.task_bits else None)
        for transform in self.batch_transforms:
            batch = transform(batch)
        return batch


class RankingBatchDataset(IterableDataset):
    """Iterates batches of one split, sharded over ranks and DataLoader workers.

    Use with ``torch.utils.data.DataLoader(ds, batch_size=None, num_workers=n)``.
    Every rank gets the same number of batches (the remainder is dropped when
    ``drop_last``), as collective training requires.

    Args:
        samples: the sample index.
        split: ``train``, ``test_warm``, ``test_cold`` or ``test``.
        batch_size: per-rank batch size.
        shuffle / seed: reshuffle each epoch with ``seed + epoch``.
        rank / world_size: this process's share of the batches.
        start_batch: skip this many of this rank's batches (to resume mid-epoch).
    """

    def __init__(
        self,
        samples: RankingSamples,
        split: str,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        stream: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.samples = samples
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.stream = stream or ("train" if split == "train" else "all")
        self.epoch = 0
        self.start_batch = 0
        self._rows = samples.rows(split)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def batches(self) -> List[np.ndarray]:
        """This rank's list of row batches for the current epoch."""
        rows = self._rows
        if self.shuffle:
            rows = np.random.default_rng(self.seed + self.epoch).permutation(rows)
        per_step = self.batch_size * self.world_size
        n_steps = len(rows) // per_step if self.drop_last else math.ceil(len(rows) / per_step)
        out = []
        for s in range(n_steps):
            chunk = rows[s * per_step:(s + 1) * per_step]
            out.append(chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size])
        return out

    def __len__(self) -> int:
        return max(0, len(self.batches()) - self.start_batch)

    def __iter__(self) -> Iterator[Batch]:
        batches = self.batches()[self.start_batch:]
        info = get_worker_info()
        if info is not None:
            batches = batches[info.id::info.num_workers]
        for rows in batches:
            yield self.samples.make_batch(rows, self.stream)


def iter_batches(samples: RankingSamples, rows: Sequence[int], batch_size: int,
                 stream: Optional[str] = None) -> Iterator[Batch]:
    """Plain in-order batches over ``rows`` (evaluation helper)."""
    rows = np.asarray(rows)
    for i in range(0, len(rows), batch_size):
        yield samples.make_batch(rows[i:i + batch_size], stream)
