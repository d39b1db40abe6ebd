"""RED-Rec cross-scenario event sequences and their mixing policies (vectorised).

RED-Rec (paper §4.2) reads, per user, the events ``(item, actions, scenario, t)`` of
all scenarios (homefeed, search, ads, ...) and builds one mixed sequence of at most
``last_n`` events with the **2-D dense mixing** policy, eq. (4)::

    S_mixer = Merge(S_homefeed[-n_h:], S_ads[-n_a:], S_search[-n_s:])

the last ``n_s`` events of every scenario (scenario axis: quota balancing), merged
chronologically (time axis: recency) with their scenario tags. Every event ``j`` gets
a 2-D position ``p_j = PE_seq(j) + PE_gap(t_now - t_j)``; its content is the item
embedding + an action embedding + an hour-of-day embedding (+ the scenario).

This module turns an interaction log into those sequences for a batch of
``(user, t_now)`` pairs with numpy gathers only (:func:`mix`), and has a
straightforward per-user Python version with identical output (:func:`mix_reference`)
for tests and the benchmark.

**Policies** (:attr:`MixConfig.policy`; the five rows "Mixer Strategy" of the paper's
Table 3, homefeed + search + ads):

``"2d"`` — *2D-Mixing (RED-Rec)*. Each scenario ``s`` contributes its last
    ``take_s`` events before ``t_now`` (``take_s`` from the quotas, below), all merged
    chronologically. ``seq_pos`` and ``gap_bucket`` are both filled.
``"global_time"`` — *Sorted by Timestamp*. The global last ``N`` events before
    ``t_now`` by time, whatever their scenario: a scenario that is rare or not recent
    can vanish from the sequence entirely.
``"concat"`` — *Naive Combination*. The same events as ``"2d"`` but not merged: one
    block per scenario in ``meta.scenarios`` order (homefeed block, then search, then
    ads), each block chronological. ``seq_pos`` counts along the concatenation.
``"1d_position"`` — *1D (on position)*. The ``"2d"`` sequence with a one-dimensional
    position: only ``PE_seq(j)``; ``gap_bucket`` is the constant 0 for every event, so
    the gap embedding carries no information.
``"1d_time"`` — *1D (on timestamp)*. The ``"2d"`` sequence with only the time
    position ``PE_gap(t_now - t_j)``; ``seq_pos`` is the constant 0.

The paper names the two 1-D rows without defining them. It calls 2-D mixing the
"integration of both positional and temporal information" and defines the 2-D
position encoding as the sum of a sequence-position and a time-gap term. The
reading used here follows from that: the 1-D variants keep the quota-balanced,
chronologically merged events and drop one of the two position terms. The two
other readings (a different event order or event set) give a sequence that is
identical to ``"2d"`` or to ``"concat"``.

With the user tower's default ``lm_positions="lm"``
(:class:`~torchrec_mm.redrec.tower.UserTowerConfig`) its LM also applies its own
position encoding to the sequence (MiniLM's pretrained absolute positions, RoPE in a
decoder LM) in every policy, so ``"1d_time"`` drops the learned ``PE_seq`` table of
RED-Rec's input, not the LM's notion of order; ``lm_positions="none"`` puts every
token at LM position 0, and then the 1-D policies drop one axis for real.

**Quotas** (``2d``, ``concat``, ``1d_*``). ``quotas`` maps scenario names to
``n_s``; scenarios that are not listed get ``0``, and the quotas must sum to at most
``last_n``. Default: ``last_n`` split equally,
``n_s = N // S + (1 if s < N % S else 0)`` in ``meta.scenarios`` order. A user keeps
``min(available_s, n_s)`` events of each scenario. With ``redistribute=True``
(default) the slots left unused (a scenario with fewer events than its quota, and
quotas summing to less than ``N``) are **water-filled**. In rounds, every scenario
that still has older events before ``t_now`` gets one more slot, in
``meta.scenarios`` order, until ``N`` events are taken or no scenario has events
left. In closed form: ``extra_s = min(spare_s, λ) + [spare_s > λ and s is among
the first r such scenarios]``, with ``λ`` the largest level whose total fits. So a
user with 100 homefeed, 2 search and 100 ads events and ``N = 128`` (quotas
43/43/42) gets 64/2/62. With ``redistribute=False`` the quotas are hard caps: a
quota of 0 excludes a scenario (the paper's "scenario exclusion" variants).

**Cutoff.** Only events with ``timestamp < t_now[b]`` (strictly before) are used:
events at or after the cutoff are "in the future" and never appear.

**Orientation and padding of** :class:`MixedSequences`: every ``[B, N]`` array is
left-aligned and chronological. Position 0 is the user's oldest kept event and
position ``length[b] - 1`` the most recent. Positions ``>= length[b]`` are padding:
``-1`` in every index field (item, scenario, hour, seq_pos, gap_bucket, timestamp),
``0`` in ``actions`` and ``0.0`` in ``duration``. ``N = cfg.last_n`` always, even
when every user is shorter.

**Gap buckets.** ``gap_bucket = searchsorted(edges, t_now - t_j, side="right")``:
bucket ``k`` holds gaps in ``[edges[k-1], edges[k])`` seconds, so there are
``len(edges) + 1`` buckets (:attr:`MixConfig.num_gap_buckets`). The default edges
are log-spaced, ``60 * 2**k`` s for ``k = 0..19``: bucket 0 is under a minute,
bucket 20 is ``>= 60 * 2**19`` s (about 364 days), and every bucket in between
doubles in width. ``hour = ((t_j + utc_offset) mod 86400) // 3600``.

**Bad input.** :meth:`EventLog.from_dataset` reads through the validated dataset
readers. An unknown scenario, action bits beyond ``meta.actions`` or a negative
timestamp raise :class:`~torchrec_mm.data.schema.DataError` naming the part file,
the row and the field. :meth:`EventLog.from_arrays` checks the same things
(scenario ids in ``[0, S)``, action bits below ``num_actions``, non-negative
ids/timestamps, finite non-negative durations). A bad row raises ``DataError``
naming ``source``, the row (the caller's ``row`` id if given, else the 0-based
index into the arrays) and the field. Nothing is masked silently.

Example::

    log = EventLog.from_dataset("out/synth", split_filter="train")
    cfg = MixConfig(policy="2d", last_n=128)
    seq = mix(log, users=np.array([3, 7]), t_now=np.array([1_700_500_000] * 2), cfg=cfg)
    inputs, targets = split_window(seq, w=10)     # user tower input, [B, 10] targets
    kjt = inputs.to_kjt()                         # jagged seq_* features
"""

import bisect
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mm.data.io import RowChecker, ReadStats, load_interaction_columns, load_meta
from torchrec_mm.data.schema import MAX_ACTIONS, DataError
from torchrec_mm.data.split import TEST_COLD, TEST_WARM, TRAIN, load_split

POLICIES: Tuple[str, ...] = ("2d", "global_time", "concat", "1d_position", "1d_time")

DEFAULT_GAP_EDGES: Tuple[int, ...] = tuple(60 * 2 ** k for k in range(20))

PAD = -1
"""Padding value of every index field of :class:`MixedSequences` (``actions`` pads 0)."""

SMALL_INDEX = np.int32
"""dtype of the small index fields of :class:`MixedSequences` (scenario, hour, seq_pos,
gap_bucket): torch embedding lookups take int32, and the padded batch is ~25% smaller
than in int64 (the output size dominates the cost of :func:`mix`)."""

# KJT keys of MixedSequences.to_kjt (one value per event, jagged per user)
SEQ_ITEM = "seq_item_id"
SEQ_SCENARIO = "seq_scenario"
SEQ_ACTIONS = "seq_actions"
SEQ_HOUR = "seq_hour"
SEQ_POS = "seq_pos"
SEQ_GAP = "seq_gap_bucket"
SEQ_FEATURES: Tuple[str, ...] = (SEQ_ITEM, SEQ_SCENARIO, SEQ_ACTIONS, SEQ_HOUR, SEQ_POS,
                                 SEQ_GAP)

_SPLIT_CODES = {"train": (TRAIN,), "test_warm": (TEST_WARM,), "test_cold": (TEST_COLD,),
                "test": (TEST_WARM, TEST_COLD)}


# --------------------------------------------------------------------------- log


def action_bits(action_names: Sequence[str], names: Sequence[str],
                source: str = "the event log") -> int:
    """The bit mask of the actions ``names`` in an ``actions`` column whose bit ``k``
    is ``action_names[k]``.

    Raises:
        ValueError: no names, or an unknown one (naming ``source`` and the known ones).
    """
    names = list(names)
    if not names:
        raise ValueError(f"{source}: no action names given")
    unknown = [n for n in names if n not in action_names]
    if unknown:
        raise ValueError(f"{source}: unknown action(s) {unknown}; its actions are "
                         f"{list(action_names)}")
    bits = 0
    for n in names:
        bits |= 1 << list(action_names).index(n)
    return bits


def action_names_option(value: Any, name: str, what: str = "action"
                        ) -> Optional[Tuple[str, ...]]:
    """A config's action- (or scenario-, ``what``) name list (``None``, a name or a
    sequence of names) as a tuple; raises ``ValueError`` naming the option ``name`` for
    an empty or non-string entry."""
    if value is None:
        return None
    names = (value,) if isinstance(value, str) else tuple(value)
    if not names or not all(isinstance(a, str) and a for a in names):
        raise ValueError(f"{name}: a non-empty list of {what} names expected, got {value!r}")
    return names


@dataclass(eq=False)
class EventLog:
    """All events of a dataset as CSR by user, each user's events in time order.

    Events are sorted by ``(user, timestamp, row)`` (stable: equal timestamps keep
    their original order). Build with :meth:`from_dataset` or :meth:`from_arrays`;
    the constructor expects already sorted arrays.

    Attributes:
        user_offsets: [U + 1] int64; user ``u``'s events are
            ``user_offsets[u]:user_offsets[u + 1]``.
        item: [E] int64 item ids.
        scenario: [E] int16 scenario index into ``scenario_names``.
        actions: [E] int64 action bit masks (bit ``k`` = ``action_names[k]``).
        timestamp: [E] int64 unix seconds (>= 0).
        duration: [E] float32 viewing duration (zeros when the source has none).
        row: [E] int64 original row of each event (in the dataset: the row over all
            interaction parts in file order).
        scenario_names: scenario names (``meta.scenarios``), defining the indices.
        action_names: action names (``meta.actions``); may be empty.
    """

    user_offsets: np.ndarray
    item: np.ndarray
    scenario: np.ndarray
    actions: np.ndarray
    timestamp: np.ndarray
    duration: np.ndarray
    row: np.ndarray
    scenario_names: List[str]
    action_names: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        E = self.item.shape[0]
        for name in ("scenario", "actions", "timestamp", "duration", "row"):
            if getattr(self, name).shape != (E,):
                raise ValueError(f"EventLog.{name} has shape {getattr(self, name).shape}, "
                                 f"expected ({E},)")
        if self.user_offsets.ndim != 1 or self.user_offsets.shape[0] < 1 or (
                int(self.user_offsets[0]) != 0 or int(self.user_offsets[-1]) != E):
            raise ValueError("EventLog.user_offsets must be [U + 1] from 0 to the event count")
        if not self.scenario_names:
            raise ValueError("EventLog needs at least one scenario name")
        # second index: events of each (user, scenario), in time order
        S = self.num_scenarios
        user_of = np.repeat(np.arange(self.num_users, dtype=np.int64),
                            np.diff(self.user_offsets))
        key = user_of * S + self.scenario.astype(np.int64)
        self._scen_perm = np.argsort(key, kind="stable")
        self._scen_ts = self.timestamp[self._scen_perm]
        counts = np.bincount(key, minlength=self.num_users * S)
        self._scen_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __repr__(self) -> str:
        return (f"EventLog({self.num_events} events, {self.num_users} users, "
                f"scenarios={self.scenario_names}, actions={self.action_names})")

    def hour_of_day(self, utc_offset: int = 0) -> np.ndarray:
        """[E] int8 hour of day ``((timestamp + utc_offset) mod 86400) // 3600``
        (cached per offset)."""
        cache = self.__dict__.setdefault("_hours", {})
        if utc_offset not in cache:
            cache[utc_offset] = (((self.timestamp + utc_offset) % 86400) // 3600).astype(np.int8)
        return cache[utc_offset]

    @property
    def user(self) -> np.ndarray:
        """[E] int64 user of each event (expanded from ``user_offsets``)."""
        return np.repeat(np.arange(self.num_users, dtype=np.int64), np.diff(self.user_offsets))

    @property
    def num_users(self) -> int:
        return int(self.user_offsets.shape[0] - 1)

    def action_mask(self, names: Sequence[str], source: str = "the event log") -> np.ndarray:
        """[E] bool: events with at least one of the actions ``names`` (e.g.
        ``["is_click"]``: the engaged events of an impression log).

        Raises:
            ValueError: an unknown action name (naming ``source`` and the known ones).
        """
        return (self.actions & action_bits(self.action_names, names, source)) != 0

    def scenario_ids(self, names: Sequence[str], source: str = "the event log"
                     ) -> np.ndarray:
        """int64 indices of the scenarios ``names`` (e.g. ``["ads"]``).

        Raises:
            ValueError: an unknown scenario name (naming ``source`` and the known ones).
        """
        unknown = sorted(set(names) - set(self.scenario_names))
        if unknown:
            raise ValueError(f"{source}: unknown scenario(s) {unknown}; the log has "
                             f"{self.scenario_names}")
        return np.array([self.scenario_names.index(n) for n in names], dtype=np.int64)

    def scenario_mask(self, names: Sequence[str], source: str = "the event log"
                      ) -> np.ndarray:
        """[E] bool: events of one of the scenarios ``names`` (:meth:`scenario_ids`)."""
        return np.isin(self.scenario, self.scenario_ids(names, source).astype(
            self.scenario.dtype))

    @property
    def num_events(self) -> int:
        return int(self.item.shape[0])

    @property
    def num_scenarios(self) -> int:
        return len(self.scenario_names)

    @classmethod
    def from_arrays(
        cls,
        user: np.ndarray,
        item: np.ndarray,
        scenario: np.ndarray,
        actions: np.ndarray,
        timestamp: np.ndarray,
        duration: Optional[np.ndarray] = None,
        *,
        num_users: Optional[int] = None,
        scenario_names: Optional[Sequence[str]] = None,
        num_scenarios: Optional[int] = None,
        action_names: Optional[Sequence[str]] = None,
        num_actions: Optional[int] = None,
        row: Optional[np.ndarray] = None,
        source: str = "<arrays>",
    ) -> "EventLog":
        """Validates and sorts event columns into an :class:`EventLog`.

        Args:
            user / item / scenario / actions / timestamp: [E] integer arrays, any order;
                ``scenario`` holds indices into ``scenario_names``.
            duration: [E] float, default zeros.
            num_users: U (default ``max(user) + 1``).
            scenario_names / num_scenarios: the scenarios (names default to
                ``"s0", "s1", ...``; one of the two is required).
            action_names / num_actions: the action bits; a set bit ``>= num_actions``
                is an error (default: ``len(action_names)``; no check when neither is
                given, apart from the sign bit).
            row: [E] original row ids, the tie-break of equal timestamps (default
                ``arange(E)``).
            source: what errors name as the file.

        Raises:
            DataError: naming ``source``, the 0-based row and the field of the first
                bad value: scenario out of range, unknown action bits, negative ids or
                timestamps, non-finite or negative durations, ragged columns.
        """
        cols = {"user_id": user, "item_id": item, "scenario": scenario, "actions": actions,
                "timestamp": timestamp}
        arrays: Dict[str, np.ndarray] = {}
        E = None
        for name, values in cols.items():
            arr = np.asarray(values)
            if arr.ndim != 1:
                raise DataError(source, 0, name, f"expected a 1-D array, got shape {arr.shape}")
            if E is None:
                E = arr.shape[0]
            if arr.shape[0] != E:
                raise DataError(source, min(E, arr.shape[0]), name,
                                f"has {arr.shape[0]} values, expected {E}")
            if arr.dtype == bool:
                arr = arr.astype(np.int64)
            if arr.size and not np.issubdtype(arr.dtype, np.integer):
                raise DataError(source, 0, name, f"expected integers, got dtype {arr.dtype}")
            arrays[name] = arr.astype(np.int64, copy=False)
        assert E is not None
        dur = (np.zeros(E, np.float32) if duration is None
               else np.asarray(duration, dtype=np.float32))
        if dur.shape != (E,):
            raise DataError(source, 0, "duration", f"has shape {dur.shape}, expected ({E},)")
        rows = np.arange(E, dtype=np.int64) if row is None else np.asarray(row, np.int64)
        if rows.shape != (E,):
            raise DataError(source, 0, "row", f"has shape {rows.shape}, expected ({E},)")

        if scenario_names is None:
            if num_scenarios is None:
                raise ValueError("EventLog.from_arrays needs scenario_names or num_scenarios")
            scenario_names = [f"s{k}" for k in range(num_scenarios)]
        scenario_names = list(scenario_names)
        if num_scenarios is not None and num_scenarios != len(scenario_names):
            raise ValueError(f"num_scenarios={num_scenarios} but {len(scenario_names)} "
                             "scenario names")
        action_names = list(action_names) if action_names is not None else []
        if num_actions is None and action_names:
            num_actions = len(action_names)
        if num_actions is not None and not 0 <= num_actions <= MAX_ACTIONS:
            raise ValueError(f"num_actions must be in [0, {MAX_ACTIONS}], got {num_actions}")

        checker = RowChecker(source, E, lambda i: int(rows[i]), False, ReadStats())
        u, it, s = arrays["user_id"], arrays["item_id"], arrays["scenario"]
        a, t = arrays["actions"], arrays["timestamp"]
        checker.fail(u < 0, "user_id", lambda i: f"negative user id {u[i]}")
        if num_users is not None:
            checker.fail(u >= num_users, "user_id",
                         lambda i: f"user id {u[i]} out of range [0, {num_users})")
        checker.fail(it < 0, "item_id", lambda i: f"negative item id {it[i]}")
        S = len(scenario_names)
        checker.fail((s < 0) | (s >= S), "scenario",
                     lambda i: f"scenario id {s[i]} out of range [0, {S}) "
                     f"(scenarios {scenario_names})")
        checker.fail(a < 0, "actions", lambda i: f"negative action mask {a[i]}")
        if num_actions is not None and num_actions < MAX_ACTIONS:
            checker.fail(a >= (1 << num_actions), "actions",
                         lambda i: f"action mask {a[i]} sets a bit >= {num_actions} "
                         f"(known actions: {action_names or num_actions})")
        checker.fail(t < 0, "timestamp", lambda i: f"negative timestamp {t[i]}")
        checker.fail(~np.isfinite(dur) | (dur < 0), "duration",
                     lambda i: f"duration must be finite and >= 0, got {dur[i]}")

        U = int(u.max()) + 1 if (num_users is None and E) else int(num_users or 0)
        order = np.lexsort((rows, t, u))
        counts = np.bincount(u, minlength=U) if E else np.zeros(U, np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(
            user_offsets=offsets,
            item=it[order],
            scenario=s[order].astype(np.int16),
            actions=a[order],
            timestamp=t[order],
            duration=dur[order],
            row=rows[order],
            scenario_names=scenario_names,
            action_names=action_names,
        )

    @classmethod
    def from_dataset(
        cls,
        data_dir: str,
        split_filter: Optional[Union[str, Sequence[str]]] = None,
        skip_bad: bool = False,
    ) -> "EventLog":
        """Reads the interactions of a canonical dataset (validated readers).

        Args:
            data_dir: dataset directory (``meta.json``, ``interactions/``).
            split_filter: keep only the rows of these splits of ``split.json``
                (``"train"``, ``"test_warm"``, ``"test_cold"``, ``"test"`` = warm +
                cold, or a list of them), e.g. ``"train"`` for training histories
                that see no test item. ``None`` keeps every row.
            skip_bad: drop invalid rows instead of raising (see ``data.io``).

        Returns:
            the log with ``U = meta.num_users``; ``row`` is the row over all parts in
            file order.

        Raises:
            DataError: an invalid row (naming part file, row, field) unless
                ``skip_bad``; FileNotFoundError: no dataset, or no ``split.json``
                when ``split_filter`` is given.
        """
        meta = load_meta(data_dir)
        cols = load_interaction_columns(
            data_dir, ["user_id", "item_id", "scenario", "actions", "duration", "timestamp"],
            skip_bad=skip_bad)
        rows = np.arange(cols["user_id"].shape[0], dtype=np.int64)
        if split_filter is not None:
            names = [split_filter] if isinstance(split_filter, str) else list(split_filter)
            codes = []
            for n in names:
                if n not in _SPLIT_CODES:
                    raise ValueError(f"unknown split {n!r}; choose from {list(_SPLIT_CODES)}")
                codes.extend(_SPLIT_CODES[n])
            part = load_split(data_dir).assign(cols["item_id"], cols["timestamp"], cols["user_id"])
            keep = np.isin(part, np.array(codes, dtype=np.int8))
            cols = {k: v[keep] for k, v in cols.items()}
            rows = rows[keep]
        return cls.from_arrays(
            cols["user_id"], cols["item_id"], cols["scenario"], cols["actions"],
            cols["timestamp"], cols["duration"], num_users=meta.num_users,
            scenario_names=meta.scenarios, action_names=meta.actions, row=rows,
            source=data_dir)


# --------------------------------------------------------------------------- config


@dataclass
class MixConfig:
    """How :func:`mix` builds a sequence (see the module docstring for each policy).

    Attributes:
        policy: ``"2d"`` (paper), ``"global_time"``, ``"concat"``, ``"1d_position"``
            or ``"1d_time"``.
        last_n: N, the maximal (and padded) sequence length.
        quotas: ``{scenario name: n_s}`` (unlisted scenarios get 0; sum <= N);
            default N split equally. Unused by ``"global_time"``.
        redistribute: water-fill slots left unused by the quotas to scenarios that
            still have events (default); ``False`` makes the quotas hard caps.
        gap_buckets: strictly increasing positive edges in seconds of the
            ``t_now - t_j`` buckets (default ``60 * 2**k``, ``k = 0..19``).
        utc_offset: seconds added to timestamps before taking the hour of day.
    """

    policy: str = "2d"
    last_n: int = 128
    quotas: Optional[Dict[str, int]] = None
    redistribute: bool = True
    gap_buckets: Tuple[int, ...] = DEFAULT_GAP_EDGES
    utc_offset: int = 0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown mixing policy {self.policy!r}; choose from {POLICIES}")
        if self.last_n < 1:
            raise ValueError(f"last_n must be >= 1, got {self.last_n}")
        edges = np.asarray(self.gap_buckets, dtype=np.int64)
        if edges.ndim != 1 or edges.size == 0 or (edges <= 0).any() or (np.diff(edges) <= 0).any():
            raise ValueError("gap_buckets must be non-empty, positive and strictly "
                             f"increasing, got {self.gap_buckets}")
        if self.quotas is not None:
            bad = {k: v for k, v in self.quotas.items() if int(v) < 0}
            if bad:
                raise ValueError(f"quotas must be >= 0, got {bad}")
            if sum(int(v) for v in self.quotas.values()) > self.last_n:
                raise ValueError(f"quotas {self.quotas} sum to more than last_n={self.last_n}")

    @property
    def num_gap_buckets(self) -> int:
        """Size of a gap-bucket embedding table: ``len(gap_buckets) + 1``."""
        return len(self.gap_buckets) + 1

    def resolve_quotas(self, scenario_names: Sequence[str]) -> np.ndarray:
        """[S] int64 quota ``n_s`` per scenario index (see the module docstring)."""
        S = len(scenario_names)
        if self.quotas is None:
            q = np.full(S, self.last_n // S, dtype=np.int64)
            q[: self.last_n % S] += 1
            return q
        unknown = sorted(set(self.quotas) - set(scenario_names))
        if unknown:
            raise ValueError(f"quotas name unknown scenarios {unknown}; "
                             f"the log has {list(scenario_names)}")
        return np.array([int(self.quotas.get(s, 0)) for s in scenario_names], dtype=np.int64)


# --------------------------------------------------------------------------- output


@dataclass(eq=False)
class MixedSequences:
    """A batch of mixed sequences: padded ``[B, N]`` arrays, **left-aligned and
    chronological** (position 0 = oldest kept event, ``length[b] - 1`` = most recent;
    padding ``-1``, ``actions`` 0, ``duration`` 0.0 — see the module docstring).

    Attributes:
        item: [B, N] int64 item ids.
        scenario: [B, N] int32 scenario indices.
        actions: [B, N] int64 action bit masks.
        hour: [B, N] int32 hour of day 0..23.
        seq_pos: [B, N] int32 index for ``PE_seq`` (0..N-1; constant 0 in ``1d_time``).
        gap_bucket: [B, N] int32 bucket of ``t_now - t_j`` for ``PE_gap``
            (0..num_gap_buckets-1; constant 0 in ``1d_position``).
        timestamp: [B, N] int64 event times.
        duration: [B, N] float32 viewing durations.
        length: [B] int64 valid events per row.
        users: [B] int64 user ids; t_now: [B] int64 cutoffs (the gap reference).
        policy: the mixing policy; gap_edges: [G] int64 gap bucket edges.
    """

    item: np.ndarray
    scenario: np.ndarray
    actions: np.ndarray
    hour: np.ndarray
    seq_pos: np.ndarray
    gap_bucket: np.ndarray
    timestamp: np.ndarray
    duration: np.ndarray
    length: np.ndarray
    users: np.ndarray
    t_now: np.ndarray
    policy: str
    gap_edges: np.ndarray

    _PADDED = ("item", "scenario", "actions", "hour", "seq_pos", "gap_bucket", "timestamp",
               "duration")

    @property
    def batch_size(self) -> int:
        return int(self.item.shape[0])

    @property
    def last_n(self) -> int:
        return int(self.item.shape[1])

    @property
    def mask(self) -> np.ndarray:
        """[B, N] bool, True at valid (non-padding) positions."""
        return np.arange(self.last_n)[None, :] < self.length[:, None]

    def actions_multi_hot(self, num_actions: int) -> np.ndarray:
        """[B, N, num_actions] float32 action bits (the paper's one-hot action vectors;
        an action embedding is ``multi_hot @ table``). Padding rows are all zero."""
        bits = (self.actions[..., None] >> np.arange(num_actions, dtype=np.int64)) & 1
        return bits.astype(np.float32)

    def to_kjt(self, keys: Sequence[str] = SEQ_FEATURES) -> KeyedJaggedTensor:
        """The valid events as jagged features, one value per event, each user's
        values chronological (oldest first).

        Keys (any subset of :data:`SEQ_FEATURES`, in the given order):
        ``seq_item_id`` item ids, ``seq_scenario`` scenario indices, ``seq_actions``
        the action bit mask as an id (a table of ``2 ** num_actions`` rows; or use
        :meth:`actions_multi_hot`), ``seq_hour`` 0..23, ``seq_pos`` the ``PE_seq``
        index, ``seq_gap_bucket`` the ``PE_gap`` bucket.

        Returns:
            ``KeyedJaggedTensor`` with ``stride = B`` and ``lengths[k * B + b] =
            length[b]`` for every key ``k``; int64 values.
        """
        source = {SEQ_ITEM: self.item, SEQ_SCENARIO: self.scenario, SEQ_ACTIONS: self.actions,
                  SEQ_HOUR: self.hour, SEQ_POS: self.seq_pos, SEQ_GAP: self.gap_bucket}
        keys = list(keys)
        for k in keys:
            if k not in source:
                raise KeyError(f"unknown sequence feature {k!r}; choose from {SEQ_FEATURES}")
        m = self.mask
        values = np.concatenate([source[k][m] for k in keys]) if keys else np.zeros(0, np.int64)
        lengths = np.tile(self.length, len(keys)).astype(np.int32)
        return KeyedJaggedTensor.from_lengths_sync(
            keys=keys, values=torch.from_numpy(values.astype(np.int64, copy=False)),
            lengths=torch.from_numpy(lengths))


# --------------------------------------------------------------------------- helpers


def _first_at_or_after(ts: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                       t: np.ndarray) -> np.ndarray:
    """Vectorised bisection: for each range ``[lo, hi)`` of ``ts`` (sorted inside
    the range), the first index whose time is ``>= t`` (``hi`` if none)."""
    lo = lo.astype(np.int64, copy=True)
    hi = hi.astype(np.int64, copy=True)
    n = ts.shape[0]
    if n == 0:
        return lo
    active = lo < hi
    while active.any():
        mid = (lo + hi) >> 1
        before = (ts[np.minimum(mid, n - 1)] < t) & active
        lo = np.where(before, mid + 1, lo)
        hi = np.where(active & ~before, mid, hi)
        active = lo < hi
    return lo


def allocate_quotas(available: np.ndarray, quotas: np.ndarray, last_n: int,
                    redistribute: bool = True) -> np.ndarray:
    """Events taken per scenario (module docstring, "Quotas"), vectorised over users.

    Args:
        available: [B, S] events of each scenario before the cutoff.
        quotas: [S] ``n_s`` (sum <= ``last_n``).
        last_n: N.
        redistribute: water-fill unused slots.

    Returns:
        [B, S] int64 ``take`` with ``min(available, quotas) <= take <= available``
        and ``take.sum(1) == min(N, available.sum(1))`` when ``redistribute``.
    """
    available = np.asarray(available, dtype=np.int64)
    base = np.minimum(available, np.asarray(quotas, dtype=np.int64)[None, :])
    if not redistribute:
        return base
    rest = last_n - base.sum(1)                          # [B] free slots
    spare = available - base                             # [B, S] events not yet taken
    lo = np.zeros(rest.shape, np.int64)                  # largest level that fits
    hi = np.full(rest.shape, last_n, np.int64)
    while (lo < hi).any():
        mid = (lo + hi + 1) >> 1
        fits = np.minimum(spare, mid[:, None]).sum(1) <= rest
        lo = np.where(fits, mid, lo)
        hi = np.where(fits, hi, mid - 1)
    extra = np.minimum(spare, lo[:, None])
    remainder = rest - extra.sum(1)
    eligible = spare > lo[:, None]
    extra += eligible & (np.cumsum(eligible, axis=1) <= remainder[:, None])
    return base + extra


def _check_batch(log: EventLog, users: np.ndarray, t_now: np.ndarray
                 ) -> Tuple[np.ndarray, np.ndarray]:
    users = np.asarray(users)
    t_now = np.asarray(t_now)
    if users.ndim != 1 or t_now.shape != users.shape:
        raise ValueError(f"users {users.shape} and t_now {t_now.shape} must both be [B]")
    for name, arr in (("users", users), ("t_now", t_now)):
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    users = users.astype(np.int64, copy=False)
    bad = (users < 0) | (users >= log.num_users)
    if bad.any():
        b = int(np.flatnonzero(bad)[0])
        raise ValueError(f"users[{b}] = {users[b]} out of range [0, {log.num_users})")
    return users, t_now.astype(np.int64, copy=False)


def _empty_output(B: int, N: int, users: np.ndarray, t_now: np.ndarray, cfg: MixConfig
                  ) -> MixedSequences:
    # The padded fields are views of one buffer (8-byte fields first, so every view is
    # aligned): one allocation instead of eight. Separate multi-MB arrays made glibc
    # return the memory to the OS after every batch and fault it in again
    # (benchmarks/bench_redrec_mixing.py measures mix with both changes here).
    fields = [("item", np.int64, PAD), ("actions", np.int64, 0),
              ("timestamp", np.int64, PAD), ("scenario", SMALL_INDEX, PAD),
              ("hour", SMALL_INDEX, PAD), ("seq_pos", SMALL_INDEX, PAD),
              ("gap_bucket", SMALL_INDEX, PAD), ("duration", np.float32, 0)]
    sizes = [B * N * np.dtype(dt).itemsize for _, dt, _ in fields]
    buf = np.empty(sum(sizes), dtype=np.uint8)
    arrays, at = {}, 0
    for (name, dt, fill), size in zip(fields, sizes):
        arr = buf[at:at + size].view(dt).reshape(B, N)
        arr.fill(fill)
        arrays[name] = arr
        at += size
    return MixedSequences(
        **arrays, length=np.zeros(B, np.int64), users=users.copy(), t_now=t_now.copy(),
        policy=cfg.policy, gap_edges=np.asarray(cfg.gap_buckets, dtype=np.int64))


# --------------------------------------------------------------------------- mixing


def mix(log: EventLog, users: np.ndarray, t_now: np.ndarray, cfg: MixConfig) -> MixedSequences:
    """Mixed sequences of ``users`` from their events strictly before ``t_now``.

    Vectorised over the batch: per-user work is numpy gathers, one vectorised
    bisection per (user, scenario) and one sort of the ``<= B * N`` kept events;
    the cost does not grow with history length beyond the bisection's log factor.

    Args:
        log: the events.
        users: [B] int user ids (repeats allowed, e.g. several cutoffs per user).
        t_now: [B] int cutoffs; only events with ``timestamp < t_now[b]`` are used.
        cfg: the policy (module docstring).

    Returns:
        :class:`MixedSequences` with ``N = cfg.last_n``.
    """
    users, t_now = _check_batch(log, users, t_now)
    B, N, S, E = users.shape[0], cfg.last_n, log.num_scenarios, log.num_events
    out = _empty_output(B, N, users, t_now, cfg)
    if cfg.policy == "global_time":
        start_u = log.user_offsets[users]
        cut = _first_at_or_after(log.timestamp, start_u, log.user_offsets[users + 1], t_now)
        length = np.minimum(cut - start_u, N)
        ar = np.arange(int(length.sum()), dtype=np.int64)
        gidx = np.repeat(cut - length - (np.cumsum(length) - length), length) + ar
    else:
        quotas = cfg.resolve_quotas(log.scenario_names)
        us = users[:, None] * S + np.arange(S, dtype=np.int64)[None, :]      # [B, S]
        seg_lo = log._scen_offsets[us]
        cut = _first_at_or_after(log._scen_ts, seg_lo, log._scen_offsets[us + 1],
                                 t_now[:, None])
        take = allocate_quotas(cut - seg_lo, quotas, N, cfg.redistribute)   # [B, S]
        counts = take.ravel()
        ar = np.arange(int(counts.sum()), dtype=np.int64)
        # per (b, s) block: positions cut - take .. cut - 1 of the scenario index
        gidx = log._scen_perm[np.repeat((cut - take).ravel() - (np.cumsum(counts) - counts),
                                        counts) + ar]
        length = take.sum(1)
        if cfg.policy != "concat" and S > 1:
            # chronological merge: within a user, event index order == (time, row) order
            boff = np.repeat(np.arange(B, dtype=np.int64) * max(E, 1), length)
            gidx += boff
            # each (b, s) block is already sorted: the stable sort (timsort) merges the
            # runs instead of sorting B * N keys from scratch
            gidx.sort(kind="stable")
            gidx -= boff
    # left-aligned rows: the boolean mask visits (b, col) in the order of gidx
    out.length = length.astype(np.int64)
    m = out.mask
    ts = log.timestamp[gidx]
    out.item[m] = log.item[gidx]
    out.scenario[m] = log.scenario[gidx]
    out.actions[m] = log.actions[gidx]
    out.timestamp[m] = ts
    out.duration[m] = log.duration[gidx]
    out.hour[m] = log.hour_of_day(cfg.utc_offset)[gidx]
    if cfg.policy == "1d_time":
        out.seq_pos[m] = 0
    else:
        out.seq_pos[m] = ar - np.repeat(np.cumsum(length) - length, length)
    out.gap_bucket[m] = 0 if cfg.policy == "1d_position" else np.searchsorted(
        out.gap_edges, np.repeat(t_now, length) - ts, side="right")
    return out


def _allocate_reference(available: List[int], quotas: List[int], last_n: int,
                        redistribute: bool) -> List[int]:
    take = [min(a, q) for a, q in zip(available, quotas)]
    if not redistribute:
        return take
    free = last_n - sum(take)
    while free > 0:
        gave = False
        for s in range(len(take)):
            if free > 0 and take[s] < available[s]:
                take[s] += 1
                free -= 1
                gave = True
        if not gave:
            break
    return take


def mix_reference(log: EventLog, users: np.ndarray, t_now: np.ndarray,
                  cfg: MixConfig) -> MixedSequences:
    """:func:`mix` written as a plain per-user Python loop (same output).

    Independent of the log's internal indices: each user's events are re-sorted by
    ``(timestamp, row)``, quotas are water-filled one slot at a time.
    """
    users, t_now = _check_batch(log, users, t_now)
    B, N, S = users.shape[0], cfg.last_n, log.num_scenarios
    out = _empty_output(B, N, users, t_now, cfg)
    edges = [int(e) for e in cfg.gap_buckets]
    for b in range(B):
        u, t = int(users[b]), int(t_now[b])
        lo, hi = int(log.user_offsets[u]), int(log.user_offsets[u + 1])
        events = [j for j in range(lo, hi) if int(log.timestamp[j]) < t]
        events.sort(key=lambda j: (int(log.timestamp[j]), int(log.row[j])))
        if cfg.policy == "global_time":
            chosen = events[len(events) - min(N, len(events)):]
        else:
            per_scenario: List[List[int]] = [[] for _ in range(S)]
            for j in events:
                per_scenario[int(log.scenario[j])].append(j)
            take = _allocate_reference([len(p) for p in per_scenario],
                                       [int(q) for q in cfg.resolve_quotas(log.scenario_names)],
                                       N, cfg.redistribute)
            chosen = []
            for s in range(S):
                chosen += per_scenario[s][len(per_scenario[s]) - take[s]:]
            if cfg.policy != "concat":
                chosen.sort(key=lambda j: (int(log.timestamp[j]), int(log.row[j])))
        out.length[b] = len(chosen)
        for k, j in enumerate(chosen):
            ts = int(log.timestamp[j])
            out.item[b, k] = log.item[j]
            out.scenario[b, k] = log.scenario[j]
            out.actions[b, k] = log.actions[j]
            out.timestamp[b, k] = ts
            out.duration[b, k] = log.duration[j]
            out.hour[b, k] = ((ts + cfg.utc_offset) % 86400) // 3600
            out.seq_pos[b, k] = 0 if cfg.policy == "1d_time" else k
            out.gap_bucket[b, k] = (0 if cfg.policy == "1d_position"
                                    else bisect.bisect_right(edges, t - ts))
    return out


def split_window(seq: MixedSequences, w: int, min_input: int = 1,
                 rebase_gaps: bool = True, eligible: Optional[np.ndarray] = None
                 ) -> Tuple[MixedSequences, np.ndarray]:
    """Splits off the training window (paper eq. (5): the user tower reads
    ``H[:-W]``; the last ``W`` events are the targets of the window loss).

    A row of length ``L`` has a window of ``n_t = clip(L - min_input, 0, w)`` events,
    the ``n_t`` most recent, so that at least ``min_input`` events stay in the input
    whenever ``L >= min_input`` (short users get a shorter window, a user with
    ``L <= min_input`` none). Every window event leaves the input; with ``eligible``
    only the eligible ones become targets (e.g. the clicks of an impression log: the
    window's engaged events are its positives).

    Args:
        seq: mixed sequences.
        w: W, the window size (>= 0).
        min_input: events kept in the input before any target is taken.
        rebase_gaps: recompute ``gap_bucket`` of the inputs relative to the earliest
            window event's time (the moment the tower predicts from) and set ``t_now``
            to it, so train-time gaps mean what they mean at serving time. Rows
            without a window keep their ``t_now``; ``"1d_position"`` keeps its
            constant gaps. Only ``"concat"`` can have inputs later than a window event
            (its tail is the last scenario block, not the latest events); their gap
            is bucket 0.
        eligible: optional [B, N] bool over ``seq``'s positions, the events that may
            be targets (default: every event).

    Returns:
        ``(inputs, targets)``: ``inputs`` is ``seq`` with its last ``n_t`` events
        turned into padding (``length - n_t``); ``targets`` is [B, w] int64 item ids
        of the window's (eligible) events, chronological (oldest first),
        left-aligned, padded with ``-1``.
    """
    if w < 0 or min_input < 0:
        raise ValueError(f"w and min_input must be >= 0, got w={w}, min_input={min_input}")
    B, N = seq.batch_size, seq.last_n
    if eligible is not None and np.shape(eligible) != (B, N):
        raise ValueError(f"eligible: expected a [B={B}, N={N}] bool array, got shape "
                         f"{np.shape(eligible)}")
    n_t = np.clip(seq.length - min_input, 0, w)
    n_in = seq.length - n_t
    cols = np.arange(N)[None, :]
    drop = (cols >= n_in[:, None]) & (cols < seq.length[:, None])      # [B, N] targets
    targets = np.full((B, w), PAD, dtype=np.int64)
    if w:
        tcols = np.arange(w)[None, :]
        tmask = tcols < n_t[:, None]
        src = np.minimum(n_in[:, None] + tcols, N - 1)
        targets[tmask] = np.take_along_axis(seq.item, src, axis=1)[tmask]
        if eligible is not None:
            keep = tmask & np.take_along_axis(np.asarray(eligible, dtype=bool), src, axis=1)
            # left-align the kept targets, chronological order unchanged
            order = np.argsort(~keep, axis=1, kind="stable")
            targets = np.where(np.take_along_axis(keep, order, axis=1),
                               np.take_along_axis(targets, order, axis=1), PAD)
    fields = {}
    for name in MixedSequences._PADDED:
        arr = getattr(seq, name).copy()
        arr[drop] = 0 if name in ("actions", "duration") else PAD
        fields[name] = arr
    t_ref = seq.t_now.copy()
    if rebase_gaps and N:
        earliest = np.where(drop, seq.timestamp, np.iinfo(np.int64).max).min(1)
        t_ref = np.where(n_t > 0, earliest, seq.t_now)
        if seq.policy != "1d_position":
            keep = cols < n_in[:, None]
            gaps = np.searchsorted(seq.gap_edges, (t_ref[:, None] - seq.timestamp)[keep],
                                   side="right")
            fields["gap_bucket"][keep] = gaps
    inputs = replace(seq, **fields, length=n_in.astype(np.int64), t_now=t_ref)
    return inputs, targets


def target_cutoffs(log: EventLog, eligible: np.ndarray, min_history: int = 1
                   ) -> np.ndarray:
    """[C] int64 log rows that may be a training cutoff at a target (``RedRecConfig
    .cutoffs="targets"``), sorted: the ``eligible`` events with at least
    ``min_history`` of their user's events strictly earlier in time (the input a
    cutoff at the row's time leaves; events at the same time count as later, as in
    :func:`mix`).

    Args:
        log: the events.
        eligible: [E] bool, the events that may be targets.
        min_history: events required before the cutoff.
    """
    E = log.num_events
    if np.shape(eligible) != (E,):
        raise ValueError(f"eligible: expected an [E={E}] bool array, got shape "
                         f"{np.shape(eligible)}")
    n = np.diff(log.user_offsets)
    user_of_row = np.repeat(np.arange(n.shape[0], dtype=np.int64), n)
    idx = np.arange(E, dtype=np.int64)
    first = np.ones(E, dtype=bool)  # first event of its (user, timestamp) run
    first[1:] = (user_of_row[1:] != user_of_row[:-1]) | (log.timestamp[1:] > log.timestamp[:-1])
    run_start = np.maximum.accumulate(np.where(first, idx, 0))
    earlier = run_start - log.user_offsets[:-1][user_of_row]
    return np.flatnonzero(np.asarray(eligible, dtype=bool) & (earlier >= min_history))


def next_targets(log: EventLog, users: np.ndarray, t_now: np.ndarray, w: int,
                 target_rows: np.ndarray) -> np.ndarray:
    """The window of a cutoff at a target: each user's next ``w`` eligible events at or
    after ``t_now``, however many other events lie between them (the evaluation
    protocol's targets, :func:`~torchrec_mm.redrec.protocol.make_eval_cases`, with
    ``w`` of them). Vectorised: one bisection per row over the user's eligible events.

    Args:
        log: the events.
        users: [B] int user ids; t_now: [B] int cutoff times.
        w: W, the window size (>= 1).
        target_rows: sorted int log rows of the eligible events (e.g.
            ``np.flatnonzero(mask)``).

    Returns:
        [B, w] int64 item ids, chronological, left-aligned, padded with ``-1``.
    """
    users, t_now = _check_batch(log, users, t_now)
    if w < 1:
        raise ValueError(f"w must be >= 1, got {w}")
    rows = np.asarray(target_rows, dtype=np.int64)
    if rows.size == 0:
        return np.full((users.shape[0], w), PAD, dtype=np.int64)
    lo = np.searchsorted(rows, log.user_offsets[users])
    hi = np.searchsorted(rows, log.user_offsets[users + 1])
    k0 = _first_at_or_after(log.timestamp[rows], lo, hi, t_now)
    kk = k0[:, None] + np.arange(w, dtype=np.int64)[None, :]
    return np.where(kk < hi[:, None], log.item[rows[np.minimum(kk, rows.size - 1)]],
                    PAD).astype(np.int64)
