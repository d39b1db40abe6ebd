"""RED-Rec training and retrieval evaluation (paper ``001_42c7267e32b49bc6`` §4.2-§5.1,
appendices D-E): wires :mod:`~torchrec_mm.redrec.sequences`,
:mod:`~torchrec_mm.redrec.tower`, :mod:`~torchrec_mm.redrec.losses` and
:mod:`~torchrec_mm.redrec.protocol` into a resumable DMP training loop.

**Training samples** (one epoch). Every user with at least ``min_history + 1`` events
in the *train* split (``EventLog.from_dataset(split_filter="train")``: no test-period
event and no cold item is ever seen) gets ``cutoffs_per_user`` random cutoffs, drawn
from ``numpy.random.default_rng([seed, epoch, 0])``: a cutoff ``c`` is uniform in
``[min_history + 1, n_u]`` and the sample's ``t_now`` is ``t_{c-1} + 1`` (the events up
to and including the ``c``-th). :func:`~torchrec_mm.redrec.sequences.mix` builds the
mixed sequence of at most ``last_n`` events before ``t_now`` (``policy``, ``quotas``);
:func:`~torchrec_mm.redrec.sequences.split_window` (``W = window``, ``min_input =
min_history``) gives the tower input ``H[:-W]`` and the ``<= W`` window targets (the
first = the next item). With ``target_actions`` (e.g. ``["is_click"]`` on an impression
log) only the window's events with one of those actions are targets; the others still
leave the input. That is ``cutoffs="events"`` (the default). With ``cutoffs="targets"``
a cutoff is the time of one of the user's eligible events (``target_actions`` /
``target_scenarios``; :func:`~torchrec_mm.redrec.sequences.target_cutoffs`: at least
``min_history`` events before it), drawn uniformly among them, the tower input is the
mix of the ``last_n - W`` events before it (the evaluation's input length) and the
window is the user's next ``W`` eligible events from it on
(:func:`~torchrec_mm.redrec.sequences.next_targets`) — the evaluation's cutoffs and
targets. Where the positives are a small share of the log (the clicks of one sparse
scenario) cutoffs anywhere leave most windows without a target (91% on a 97 / 2 / 1 %
homefeed / search / ads log with search/ads clicks as targets, counted over the training
samples by an ad-hoc script) and the tower is trained
on the few that have one; cutoffs at targets train on every sample. Samples are
shuffled per epoch (``[seed, epoch, 1]``); step ``j`` of an epoch takes the global batch
``perm[j*R*B:(j+1)*R*B]`` and rank ``r`` its rows ``r*B:(r+1)*B`` (the last partial
global batch is dropped).

**Negatives.** ``num_negatives`` item ids per step, shared by every user and rank,
drawn with replacement from ``[seed, epoch, step, 2]``: uniform over the items of the
train split (``negatives="seen"``, the default; as SASRec's: training never sees an
item the split holds out — a cold item drawn as a negative is one the model learns to
push down before it is ever evaluated), uniform over every catalogue id (``"uniform"``,
the former default: held-out cold items included) or ``∝ count^alpha`` of
the train-split interactions (``"popularity"``; items never interacted with are never
drawn). A negative equal to a
positive is masked out of that positive's softmax (accidental hit). ``in_batch`` adds
the other users' window items as negatives.

**Loss.** ``loss="multi_interest"`` (default): :func:`multi_interest_window_loss`
(window items clustered into K groups, Hungarian-matched to the K interests, NCE of
every (item, matched interest) pair); ``"single_interest"``:
:func:`single_interest_loss` (one user vector, the ``single_pool`` of the K
interests, against every window item). ``+ nce_weight *`` :func:`nce_loss` of the next
item (eq. 6) against the interest matched to it (multi-interest) or the single vector.
The temperature is a :class:`LearnableTemperature` (``tau_init``; ``learnable_tau``),
clamped after every step. ``item_bias`` (not the paper's) adds a learned per-item offset
to every logit of the item (:class:`~torchrec_mm.redrec.losses.ItemBias`; its own Adam
learning rate ``item_bias_lr``), and evaluation and serving score ``cos / τ + b_i``.

**Item embeddings.** ``item_embedding="id"``: the tower's item-ID table (trained, shared
by history and candidates). ``"content"``: the item tower through the user tower's
trainable projection, for history events, window items, negatives and the evaluated
catalogue alike (so cold items are scored by content). The item tower is either the
item LM trained jointly (``item_states``: the directory of ``redrec item-states``, its
top layers train, :mod:`torchrec_mm.redrec.item_tower`; the paper's setting) or frozen
(``content_store``, field ``content_field``, ``"emb_token"`` or ``"pooled"``; items the
store lacks get the mean vector; the paper's "Item LLM frozen"). Candidates (window items and negatives) go through the tower's
``cand_item_id`` feature: one jagged row per user holding its window items, the
negatives appended to the last row; the model splits them apart again.

**Evaluation** (at the end of training and ``redrec evaluate``): the paper's
random-cutoff protocol (:func:`make_eval_cases`) *restricted to the test period*. The
log is the full dataset, every event of the user before the cutoff is history (also
test-period events before it: they happened before the moment of the prediction), but
only events of ``eval_split`` (``"test"`` = ``test_warm`` + ``test_cold``: events at or
after the split's time cut, or of a cold item; ``"test_warm"``; ``"test_cold"``) with
one of ``target_actions`` (when set) may be a cutoff/target, so the cutoff falls in the
test period and every target is an event the training never saw. Each evaluated user
gets one cutoff (seeded, ``eval_seed``); its targets are the next ``eval_num_targets``
eligible events. History of a case:
``mix`` of the user's events before ``cutoff_time`` with ``eval_last_n`` (default
``last_n - window``, the longest input the tower saw in training). Item vectors: the
tower's item side for every catalogue item. Metrics HR/NDCG/MRR@K and MRR
(:func:`evaluate_multi_interest`, score = max over interests of the cosine) against the
shared random pool ``C ∪ G_u``. ``eval_index="exact"`` scores every candidate exactly;
any other value is a faiss ``index_factory`` string (``"Flat"``, ``"HNSW32"``,
``"IVF64,Flat"``, inner product on unit vectors = cosine) built over the pool: each
interest retrieves its top ``max(ks) + T`` pool items, a pool item's score is its best
retrieved score, pool items that no interest retrieved rank below every retrieved one,
and targets are scored exactly. With ``"Flat"`` HR/NDCG/MRR@K equal the exact ones; the
uncut ``MRR`` then counts only retrieved negatives (an upper bound).

Files of a run directory ``out``: ``config.json``, ``checkpoints/step-N/`` (safetensors,
:mod:`torchrec_mm.training.checkpoint`: every epoch, every ``checkpoint_every`` steps
and at the end), ``train_metrics.json`` (loss curve, per-epoch mean loss, final eval),
``eval_metrics.json``. Re-running with the same directory resumes from the latest
checkpoint (same samples, negatives and optimizer state: an interrupted run ends equal
to an uninterrupted one).

Example::

    cfg = RedRecConfig(data="out/synth", out="runs/redrec", batch_size=32, epochs=2,
                       item_embedding="content", content_store="out/content")
    metrics = train_redrec(cfg)        # {"steps", "curve", "eval": {"HR@50": ...}, ...}
"""

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from tqdm import tqdm
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mm.data.io import load_meta
from torchrec_mm.data.split import TEST_COLD, TEST_WARM, load_split
from torchrec_mm.redrec.losses import (
    ITEM_BIASES,
    ItemBias,
    LearnableTemperature,
    multi_interest_window_loss,
    nce_loss,
    single_interest_loss,
)
from torchrec_mm.redrec.popularity import popularity_counts
from torchrec_mm.redrec.protocol import (
    EvalCases,
    ProtocolConfig,
    evaluate_multi_interest,
    evaluate_scores,
    make_eval_cases,
)
from torchrec_mm.redrec.sequences import (
    POLICIES,
    SEQ_FEATURES,
    EventLog,
    MixConfig,
    action_bits,
    action_names_option,
    mix,
    next_targets,
    split_window,
    target_cutoffs,
)
from torchrec_mm.redrec.item_tower import ITEM_INITS
from torchrec_mm.redrec.tower import (
    CAND_ITEM,
    EVENT_MEANS,
    INITS,
    ITEM_EMBEDDINGS,
    LM_POSITIONS,
    TABLE_INITS,
    UserTower,
    UserTowerConfig,
    UserTowerSharder,
)
from torchrec_mm.training import checkpoint as ckpt
from torchrec_mm.training.distributed import (
    DistContext,
    init_distributed,
    launched_by_torchrun,
    spawn,
)
from torchrec_mm.training.sharding import SHARDING_TYPES
from torchrec_mm.utils.io import write_json

logger = logging.getLogger(__name__)

__all__ = [
    "EVAL_SPLITS",
    "LOSSES",
    "RedRecBatch",
    "RedRecConfig",
    "RedRecModel",
    "build_model",
    "evaluate_redrec",
    "evaluate_run",
    "load_redrec_config",
    "make_batch",
    "target_mask",
    "train_redrec",
    "training_samples",
    "training_targets",
]

LOSSES = ("multi_interest", "single_interest")
NEGATIVES = ("seen", "uniform", "popularity")
CUTOFFS = ("events", "targets")
EVAL_SPLITS = {"test": (TEST_WARM, TEST_COLD), "test_warm": (TEST_WARM,),
               "test_cold": (TEST_COLD,)}
CONTENT_FIELDS = ("emb_token", "pooled")


@dataclass
class RedRecConfig:
    """Everything a RED-Rec run needs (``torchrec-mm redrec train`` flags / YAML).

    Attributes:
        data: dataset directory (with ``split.json``); out: run directory.
        model_path / init / embedding_dim / interests_per_scenario / dropout /
            item_embedding: :class:`~torchrec_mm.redrec.tower.UserTowerConfig` fields
            (``model_path=None``: the bundled MiniLM).
        content_store / content_field: the frozen item vectors of
            ``item_embedding="content"`` (module doc).
        item_states: instead, the item tower trained jointly (module doc); item_lr:
            its learning rate (``None``: ``dense_lr``); item_dropout: its dropout
            (default 0.0, ``None``: the LM config's; ``UserTowerConfig.item_dropout``);
            item_init: ``"pretrained"`` or ``"scratch"`` (its trained layers randomly
            initialised: Table A3's "Item LLM from scratch").
        center_items: frozen item vectors only (``content_store``): subtract their
            catalogue mean before the tower's projection, as the ``content_mean``
            baseline does. MiniLM's ``[EMB]`` vectors share one direction (mean cosine
            0.80 between items on the generated data); uncentred, the trained user tower
            gave every user the same interests (mean cosine 1.0000 between users, what
            evaluation now reports as ``interest_user_cosine``) and the
            loss stayed near chance on a log without item popularity
            (``plugins/redrec-mixing-sparse.yaml`` has the runs).
        lm_positions: ``"lm"`` or ``"none"`` (the user LM's own position encoding off:
            ``UserTowerConfig.lm_positions``).
        event_mean: ``"none"``, ``"output"`` (a linear map of the user's mean event
            vector added to every interest, around the LM) or ``"queries"`` (the query
            tokens start from it): ``UserTowerConfig.event_mean``.
        table_init: ``"torchrec"`` (default: TorchRec's ``±1/sqrt(rows)``, under which
            the small scenario and action tables make most of the event vectors) or
            ``"lm"`` (the tower's tables start from ``N(0, r^2)``, ``r`` the LM's
            ``initializer_range``, 0.02 for MiniLM: the LM's own embedding init):
            ``UserTowerConfig.table_init``.
        policy / last_n / quotas: :class:`~torchrec_mm.redrec.sequences.MixConfig`.
        window: W, the look-ahead window (paper 10); min_history: events kept as input.
        target_actions: the actions that make an event a positive (e.g. ``["is_click"]``
            for an impression log): only such events are window targets in training
            and targets in evaluation; every event stays in the history with its action
            flags. ``None``: every event (a log of engagements only, e.g. ratings).
        target_scenarios: positives only from these scenarios (e.g. ``["ads"]``: the
            paper's cross-scenario tables, "(for Advertisements)", predict one target
            scenario from histories of all): with ``target_actions``, the events that
            are window targets in training and targets in evaluation; every event of
            every scenario stays in the history. ``None``: every scenario. A run trained
            without it can be evaluated with it (``redrec evaluate
            --target-scenarios``).
        cutoffs_per_user: random training cutoffs per user and epoch.
        cutoffs: where the training cutoffs fall (module doc, "Training samples"):
            ``"events"`` (default, paper eq. 5: anywhere, the window is the mixed
            sequence's last W events) or ``"targets"`` (at an eligible event, the
            window is the next W eligible events: the evaluation's cutoffs, for
            positives that are a small share of the log, e.g. ``target_scenarios``).
        loss: ``"multi_interest"`` | ``"single_interest"``; single_pool: ``"mean"`` |
            ``"first"``; nce_weight: weight of the next-item NCE (eq. 6) added to it.
        num_negatives / negatives / negative_alpha / in_batch: negatives (module doc).
        tau_init / learnable_tau: temperature; kmeans_iters: window clustering.
        batch_size: users per rank and step; epochs / max_steps: length.
        dense_optimizer / dense_lr / embedding_optimizer / embedding_lr: optimizers
            (tables: fused TorchRec optimizer, ``adagrad`` or ``sgd`` on CPU — fbgemm
            has no CPU Adam; the rest: ``adam`` or ``sgd``).
        lm_lr: learning rate of the user LM's layers (``None``: ``dense_lr``); the
            queries, projections and temperature keep ``dense_lr``.
        item_bias: a learned per-item logit offset ``b_i`` (:class:`ItemBias`): the
            score of item ``i`` is ``cos(interest, i) / τ + b_i`` in the loss (as a
            positive and as a negative) and in evaluation — ``"none"`` (default, the
            paper's cosine scores), ``"zero"`` (starts at 0) or ``"log_count"`` (starts
            at the log of the item's train-split positive count + 1, centred: the
            popularity an item's content cannot explain gets its own parameter instead
            of a direction shared by every user's interests). ``redrec embed-items``
            stores it with 1/τ for serving. An item the train split never shows keeps
            its start (with ``negatives="seen"`` no gradient reaches it).
        item_bias_lr: Adam learning rate of the item bias.
        lm_anchor: α of an L2-SP penalty ``α/2 · Σ ||θ - θ_0||²`` that pulls the user
            LM's layers toward their weights at the start of training (the pretrained
            checkpoint; 0: none). Added to the loss that is back-propagated, not to the
            logged loss.
        world_size / sharding_type: DMP ranks and the planner constraint.
        checkpoint_every: steps between extra checkpoints (0: per epoch and at the end).
        eval_*: evaluation (module doc); eval_index: ``"exact"`` or a faiss
            ``index_factory`` string; eval_nprobe: IVF probes.
    """

    data: str
    out: str
    model_path: Optional[str] = None
    init: str = "pretrained"
    item_embedding: str = "id"
    content_store: Optional[str] = None
    content_field: str = "emb_token"
    item_states: Optional[str] = None
    item_lr: Optional[float] = None
    lm_lr: Optional[float] = None
    lm_anchor: float = 0.0
    item_dropout: Optional[float] = 0.0
    item_init: str = "pretrained"
    lm_positions: str = "lm"
    event_mean: str = "none"
    table_init: str = "torchrec"
    item_bias: str = "none"
    item_bias_lr: float = 0.01
    center_items: bool = False
    embedding_dim: int = 0
    interests_per_scenario: int = 3
    dropout: Optional[float] = None
    policy: str = "2d"
    last_n: int = 128
    quotas: Optional[Dict[str, int]] = None
    window: int = 10
    min_history: int = 1
    target_actions: Optional[Tuple[str, ...]] = None
    target_scenarios: Optional[Tuple[str, ...]] = None
    cutoffs_per_user: int = 1
    cutoffs: str = "events"
    loss: str = "multi_interest"
    single_pool: str = "mean"
    nce_weight: float = 0.0
    num_negatives: int = 1024
    negatives: str = "seen"
    negative_alpha: float = 0.75
    in_batch: bool = False
    tau_init: float = 0.07
    learnable_tau: bool = True
    kmeans_iters: int = 10
    batch_size: int = 32
    epochs: int = 1
    max_steps: Optional[int] = None
    dense_optimizer: str = "adam"
    dense_lr: float = 1e-4
    embedding_optimizer: str = "adagrad"
    embedding_lr: float = 0.01
    world_size: int = 1
    sharding_type: str = "auto"
    seed: int = 0
    checkpoint_every: int = 0
    log_every: int = 10
    evaluate: bool = True
    eval_split: str = "test"
    eval_num_targets: int = 3
    eval_pool_size: int = 1_000_000
    eval_ks: Tuple[int, ...] = (10, 50, 100, 1000)
    eval_max_users: Optional[int] = 10_000
    eval_seed: int = 0
    eval_last_n: Optional[int] = None
    eval_batch_size: int = 64
    eval_index: str = "exact"
    eval_nprobe: int = 8
    resume: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        from torchrec_mm.training.trainer import EMBEDDING_OPTIMIZERS

        self.eval_ks = tuple(int(k) for k in self.eval_ks)
        choices = {"init": INITS, "item_init": ITEM_INITS, "lm_positions": LM_POSITIONS,
                   "event_mean": EVENT_MEANS, "table_init": TABLE_INITS,
                   "item_bias": ITEM_BIASES,
                   "item_embedding": ITEM_EMBEDDINGS,
                   "policy": POLICIES,
                   "loss": LOSSES, "negatives": NEGATIVES, "cutoffs": CUTOFFS,
                   "single_pool": ("mean", "first"),
                   "dense_optimizer": ("adam", "sgd"),
                   "embedding_optimizer": tuple(sorted(EMBEDDING_OPTIMIZERS)),
                   "sharding_type": SHARDING_TYPES, "eval_split": tuple(EVAL_SPLITS),
                   "content_field": CONTENT_FIELDS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"RedRecConfig.{name}: {getattr(self, name)!r} is not one "
                                 f"of {list(allowed)}")
        for name in ("last_n", "window", "cutoffs_per_user", "batch_size", "epochs",
                     "world_size", "log_every", "eval_num_targets", "eval_batch_size",
                     "interests_per_scenario", "kmeans_iters", "eval_nprobe"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"RedRecConfig.{name}: must be >= 1, got "
                                 f"{getattr(self, name)}")
        for name in ("min_history", "num_negatives", "checkpoint_every", "embedding_dim",
                     "eval_pool_size"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"RedRecConfig.{name}: must be >= 0, got "
                                 f"{getattr(self, name)}")
        if self.min_history < 1:
            raise ValueError("RedRecConfig.min_history: the tower needs at least one input "
                             f"event, got {self.min_history}")
        if self.last_n <= self.window:
            raise ValueError(f"RedRecConfig.last_n ({self.last_n}) must exceed window "
                             f"({self.window}): the input is H[:-W]")
        self.target_actions = action_names_option(self.target_actions,
                                                   "RedRecConfig.target_actions")
        self.target_scenarios = action_names_option(self.target_scenarios,
                                                   "RedRecConfig.target_scenarios", "scenario")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"RedRecConfig.max_steps: must be >= 1, got {self.max_steps}")
        if self.num_negatives == 0 and not self.in_batch:
            raise ValueError("RedRecConfig: no negatives (num_negatives=0 and in_batch=False)")
        if self.nce_weight < 0 or not math.isfinite(self.nce_weight):
            raise ValueError(f"RedRecConfig.nce_weight: must be finite and >= 0, got "
                             f"{self.nce_weight}")
        if self.negative_alpha < 0:
            raise ValueError(f"RedRecConfig.negative_alpha: must be >= 0, got "
                             f"{self.negative_alpha}")
        if self.item_embedding == "content" and \
                bool(self.content_store) == bool(self.item_states):
            raise ValueError("RedRecConfig: item_embedding='content' needs either "
                             "content_store (frozen item vectors: the output directory of "
                             "`torchrec-mm content encode`) or item_states (the item tower "
                             "trained jointly: `torchrec-mm redrec item-states`), not both")
        if self.item_embedding == "id" and (self.content_store or self.item_states):
            raise ValueError("RedRecConfig: content_store / item_states given but "
                             "item_embedding='id'")
        for name in ("item_lr", "lm_lr", "item_bias_lr"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"RedRecConfig.{name}: must be finite and > 0, got {value}")
        if not (self.lm_anchor >= 0 and math.isfinite(self.lm_anchor)):
            raise ValueError(f"RedRecConfig.lm_anchor: must be finite and >= 0, got "
                             f"{self.lm_anchor}")
        for name, used in (("lm_lr", self.lm_lr is not None), ("lm_anchor", self.lm_anchor > 0)):
            if used and self.init == "frozen":
                raise ValueError(f"RedRecConfig.{name}: the LM does not train with "
                                 "init='frozen'")
        for name in ("dropout", "item_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"RedRecConfig.{name}: must be in [0, 1), got {value}")
        if self.center_items and not (self.item_embedding == "content"
                                      and self.content_store):
            raise ValueError("RedRecConfig.center_items: only with frozen item vectors "
                             "(item_embedding='content' with content_store)")
        if self.item_init != "pretrained" and not self.item_states:
            raise ValueError(f"RedRecConfig.item_init={self.item_init!r}: only with "
                             "item_states (the trained item tower)")
        if self.item_lr is not None and not self.item_states:
            raise ValueError("RedRecConfig.item_lr: only with item_states (the trained item "
                             "tower)")
        if not (0 < self.tau_init <= 1.0):
            raise ValueError(f"RedRecConfig.tau_init: must be in (0, 1], got {self.tau_init}")
        if not self.eval_ks or any(k < 1 for k in self.eval_ks):
            raise ValueError(f"RedRecConfig.eval_ks: positive cutoffs expected, got "
                             f"{self.eval_ks}")
        if self.eval_last_n is not None and self.eval_last_n < 1:
            raise ValueError(f"RedRecConfig.eval_last_n: must be >= 1, got {self.eval_last_n}")
        if self.eval_max_users is not None and self.eval_max_users < 1:
            raise ValueError(f"RedRecConfig.eval_max_users: must be >= 1, got "
                             f"{self.eval_max_users}")
        self.mix_config()  # validates policy / quotas

    def mix_config(self, last_n: Optional[int] = None) -> MixConfig:
        """The training (or, with ``last_n``, the rescaled evaluation) mixing policy."""
        n = self.last_n if last_n is None else int(last_n)
        quotas = self.quotas
        if quotas is not None and last_n is not None:
            quotas = {k: int(v) * n // self.last_n for k, v in quotas.items()}
        try:
            return MixConfig(policy=self.policy, last_n=n, quotas=quotas)
        except ValueError as e:
            raise ValueError(f"RedRecConfig: {e}") from None

    @property
    def resolved_eval_last_n(self) -> int:
        return self.eval_last_n or self.last_n - self.window

    def protocol(self) -> ProtocolConfig:
        """The evaluation protocol (§4.3) of this configuration's ``eval_*`` fields."""
        return ProtocolConfig(num_targets=self.eval_num_targets, pool_size=self.eval_pool_size,
                              ks=self.eval_ks, seed=self.eval_seed,
                              min_history=self.min_history, max_users=self.eval_max_users)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Dict[str, Any], source: str = "config") -> "RedRecConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{source}: unknown RED-Rec option(s) {unknown}")
        missing = [k for k in ("data", "out") if raw.get(k) is None]
        if missing:
            raise ValueError(f"{source}: missing required option(s) {missing}")
        return cls(**raw)


def load_redrec_config(path: Optional[str] = None, **overrides: Any) -> RedRecConfig:
    """A :class:`RedRecConfig` from YAML (optional) with ``overrides`` (``None`` values
    are ignored)."""
    raw: Dict[str, Any] = {}
    if path:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of RED-Rec options")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return RedRecConfig.from_dict(raw, source=path or "config")


# --------------------------------------------------------------------------- samples


@dataclass
class RedRecBatch:
    """One rank's batch.

    Attributes:
        features: ``seq_*`` features of the tower inputs + ``cand_item_id`` (each row's
            window items; the negatives appended to the last row; evaluation: any items).
        window_ids: [B, W] int64 window item ids, ``-1`` padding, first = next item;
            ``None`` for an evaluation batch (no loss).
        neg_ids: [M] int64 sampled negatives (training).
    """

    features: KeyedJaggedTensor
    window_ids: Optional[torch.Tensor] = None
    neg_ids: Optional[torch.Tensor] = None

    def to(self, device: torch.device, non_blocking: bool = False) -> "RedRecBatch":
        return RedRecBatch(
            self.features.to(device, non_blocking=non_blocking),
            None if self.window_ids is None else self.window_ids.to(device),
            None if self.neg_ids is None else self.neg_ids.to(device))


def _positives(log: EventLog, data: str, target_actions: Optional[Sequence[str]],
               scenarios: Optional[Sequence[str]]) -> Optional[np.ndarray]:
    """[E] bool over ``log``'s events with one of ``target_actions`` (when given) in one
    of ``scenarios`` (when given); ``None`` when neither is given (every event)."""
    rows = None
    if target_actions is not None:
        rows = log.action_mask(target_actions, f"{data} (target_actions)")
    if scenarios is not None:
        inside = log.scenario_mask(scenarios, f"{data} (target_scenarios)")
        rows = inside if rows is None else rows & inside
    return rows


def target_mask(log: EventLog, cfg: RedRecConfig) -> Optional[np.ndarray]:
    """[E] bool over ``log``'s events: those that may be window targets
    (``target_actions`` and ``target_scenarios``); ``None``: every event."""
    return _positives(log, cfg.data, cfg.target_actions, cfg.target_scenarios)


def training_targets(log: EventLog, cfg: RedRecConfig) -> Optional[np.ndarray]:
    """Sorted log rows of the eligible events when ``cfg.cutoffs == "targets"`` (the
    windows of :func:`make_batch`), else ``None``."""
    if cfg.cutoffs != "targets":
        return None
    mask = target_mask(log, cfg)
    return np.arange(log.num_events, dtype=np.int64) if mask is None else np.flatnonzero(mask)


def training_samples(log: EventLog, cfg: RedRecConfig, epoch: int
                     ) -> Tuple[np.ndarray, np.ndarray]:
    """The ``(users [S], t_now [S])`` training samples of ``epoch`` (module doc), in user
    order (shuffle separately)."""
    rng = np.random.default_rng([cfg.seed, epoch, 0])
    if cfg.cutoffs == "targets":
        mask = target_mask(log, cfg)
        if mask is None:
            mask = np.ones(log.num_events, dtype=bool)
        rows = target_cutoffs(log, mask, cfg.min_history)
        user_of = np.searchsorted(log.user_offsets, rows, side="right") - 1
        count = np.bincount(user_of, minlength=log.num_users)
        start = np.concatenate([[0], np.cumsum(count)])
        users = np.repeat(np.flatnonzero(count > 0), cfg.cutoffs_per_user)
        pick = np.minimum((rng.random(users.size) * count[users]).astype(np.int64),
                          count[users] - 1)
        t_now = log.timestamp[rows[start[users] + pick]]
        return users.astype(np.int64), t_now.astype(np.int64)
    n = np.diff(log.user_offsets)
    lo = cfg.min_history + 1
    users = np.repeat(np.flatnonzero(n >= lo), cfg.cutoffs_per_user)
    if users.size == 0:
        return users.astype(np.int64), np.zeros(0, np.int64)
    span = n[users] - lo + 1
    c = lo + np.minimum((rng.random(users.size) * span).astype(np.int64), span - 1)
    t_now = log.timestamp[log.user_offsets[users] + c - 1] + 1
    return users.astype(np.int64), t_now.astype(np.int64)


def _with_candidates(kjt: KeyedJaggedTensor, cand: np.ndarray, cand_lengths: np.ndarray
                     ) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(kjt.keys()) + [CAND_ITEM],
        values=torch.cat([kjt.values(), torch.from_numpy(cand.astype(np.int64))]),
        lengths=torch.cat([kjt.lengths().to(torch.int32),
                           torch.from_numpy(cand_lengths.astype(np.int32))]))


def make_batch(log: EventLog, users: np.ndarray, t_now: np.ndarray, cfg: RedRecConfig,
               neg_ids: np.ndarray, target_rows: Optional[np.ndarray] = None
               ) -> RedRecBatch:
    """Tower inputs and window targets of a training batch, and its negatives.

    ``cutoffs="events"``: the mix of ``last_n`` events before ``t_now``, split into the
    input ``H[:-W]`` and the window's eligible events. ``"targets"``: the mix of
    ``last_n - W`` events before ``t_now`` (the evaluation's input length) and the
    next W eligible events at or after it (``target_rows``: the sorted eligible log
    rows, :func:`training_targets`; computed here when not given)."""
    if cfg.cutoffs == "targets":
        if target_rows is None:
            target_rows = training_targets(log, cfg)
        inputs = mix(log, users, t_now, cfg.mix_config(cfg.last_n - cfg.window))
        targets = next_targets(log, users, t_now, cfg.window, target_rows)
    else:
        seq = mix(log, users, t_now, cfg.mix_config())
        eligible = None
        if cfg.target_actions is not None:
            bits = action_bits(log.action_names, cfg.target_actions,
                               f"{cfg.data} (target_actions)")
            eligible = (seq.actions & bits) != 0
        if cfg.target_scenarios is not None:
            ids = log.scenario_ids(cfg.target_scenarios, f"{cfg.data} (target_scenarios)")
            inside = np.isin(seq.scenario, ids.astype(seq.scenario.dtype))
            eligible = inside if eligible is None else eligible & inside
        inputs, targets = split_window(seq, cfg.window, min_input=cfg.min_history,
                                       eligible=eligible)
    valid = targets >= 0
    lengths = valid.sum(1)
    if lengths.size:
        lengths[-1] += neg_ids.size
    cand = np.concatenate([targets[valid], neg_ids.astype(np.int64)])
    return RedRecBatch(_with_candidates(inputs.to_kjt(SEQ_FEATURES), cand, lengths),
                       torch.from_numpy(targets), torch.from_numpy(neg_ids.astype(np.int64)))


def negative_distribution(log: EventLog, num_items: int, cfg: RedRecConfig
                          ) -> Optional[np.ndarray]:
    """``None`` (uniform over the catalogue) or [N] float64 probabilities: uniform over
    the items ``log`` holds (``"seen"``) or ``∝ count^alpha`` (``"popularity"``)."""
    if cfg.negatives == "uniform":
        return None
    counts = np.bincount(log.item, minlength=num_items)[:num_items].astype(np.float64)
    w = np.where(counts > 0, 1.0 if cfg.negatives == "seen" else counts ** cfg.negative_alpha,
                 0.0)
    if w.sum() <= 0:
        raise ValueError(f"negatives={cfg.negatives!r}: the training log has no interactions")
    return w / w.sum()


def sample_negatives(num_items: int, cfg: RedRecConfig, probs: Optional[np.ndarray],
                     epoch: int, step: int) -> np.ndarray:
    rng = np.random.default_rng([cfg.seed, epoch, step, 2])
    if cfg.num_negatives == 0:
        return np.zeros(0, np.int64)
    if probs is None:
        return rng.integers(0, num_items, cfg.num_negatives, dtype=np.int64)
    return rng.choice(num_items, cfg.num_negatives, p=probs).astype(np.int64)


# --------------------------------------------------------------------------- model


class RedRecModel(nn.Module):
    """User tower + temperature + the configured loss.

    ``forward(batch)`` returns ``(loss, interests [B, K, d], candidates [n_c, d])``;
    ``loss`` is ``None`` for an evaluation batch (``window_ids is None``). With
    ``cfg.item_bias`` it holds ``item_bias`` (:class:`ItemBias`; ``bias_counts``: the
    [N] counts a ``"log_count"`` bias starts from).
    """

    def __init__(self, tower: UserTower, cfg: RedRecConfig,
                 bias_counts: Optional[np.ndarray] = None) -> None:
        super().__init__()
        self.tower = tower
        self.tau = LearnableTemperature(init=cfg.tau_init, learnable=cfg.learnable_tau)
        self.item_bias: Optional[ItemBias] = None
        if cfg.item_bias != "none":
            if cfg.item_bias == "log_count" and bias_counts is None:
                raise ValueError("RedRecModel: item_bias='log_count' needs the items' "
                                 "counts (bias_counts)")
            self.item_bias = ItemBias(tower.config.num_items,
                                      bias_counts if cfg.item_bias == "log_count" else None)
        self.loss_kind = cfg.loss
        self.single_pool = cfg.single_pool
        self.nce_weight = float(cfg.nce_weight)
        self.in_batch = bool(cfg.in_batch)
        self.kmeans_iters = int(cfg.kmeans_iters)

    def forward(self, batch: RedRecBatch
                ) -> Tuple[Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
        interests, cands = self.tower.forward_with_items(batch.features)
        vals = None if cands is None else cands.values()
        if batch.window_ids is None:
            return None, interests, vals
        assert vals is not None and batch.neg_ids is not None
        mask = batch.window_ids >= 0
        bsz, w = mask.shape
        n_w = int(mask.sum())
        rows, cols = mask.nonzero(as_tuple=True)
        window = vals.new_zeros(bsz, w, vals.shape[1]).index_put((rows, cols), vals[:n_w])
        neg = vals[n_w:] if batch.neg_ids.numel() else None
        neg_ids = batch.neg_ids if neg is not None else None
        w_bias = n_bias = None
        if self.item_bias is not None:
            w_bias = self.item_bias(batch.window_ids.clamp(min=0))
            n_bias = self.item_bias(neg_ids) if neg_ids is not None else None
        tau = self.tau()
        if self.loss_kind == "multi_interest":
            loss, assign = multi_interest_window_loss(
                interests, window, mask, neg, tau, self.in_batch, batch.window_ids, neg_ids,
                self.kmeans_iters, window_bias=w_bias, neg_bias=n_bias)
            first = assign.item_interest[:, 0].clamp(min=0)
            user = interests[torch.arange(bsz, device=interests.device), first]
        else:
            loss = single_interest_loss(interests, window, neg, tau, mask, self.single_pool,
                                        self.in_batch, batch.window_ids, neg_ids,
                                        target_bias=w_bias, neg_bias=n_bias)
            user = interests.mean(1) if self.single_pool == "mean" else interests[:, 0]
        if self.nce_weight > 0:
            has = batch.window_ids[:, 0] >= 0  # rows with a (first) window target
            if bool(has.any()):
                loss = loss + self.nce_weight * nce_loss(
                    user[has], window[has, 0], neg, tau, self.in_batch,
                    batch.window_ids[has, 0], neg_ids,
                    pos_bias=None if w_bias is None else w_bias[has, 0], neg_bias=n_bias)
        return loss, interests, vals


def content_vectors(content_store: str, field: str, num_items: int, data: str
                    ) -> torch.Tensor:
    """[num_items, D] float32 frozen item vectors: ``field`` of a content store made for
    the dataset ``data`` (items the store lacks get the mean row)."""
    from torchrec_mm.content.store import ContentStore

    store = ContentStore(str(content_store))
    if store.num_items != num_items:
        raise ValueError(f"content store {content_store}: made for {store.num_items} "
                         f"items, the dataset {data} has {num_items}")
    if field not in store.fields:
        raise ValueError(f"content store {content_store}: no field {field!r} (has "
                         f"{sorted(store.fields)})")
    return store.as_table(field, fill="mean").reshape(num_items, -1)


def _item_vectors(cfg: RedRecConfig, num_items: int) -> Optional[torch.Tensor]:
    if cfg.item_embedding != "content" or cfg.item_states:
        return None
    vecs = content_vectors(str(cfg.content_store), cfg.content_field, num_items, cfg.data)
    if cfg.center_items:
        vecs = vecs.float()
        vecs = vecs - vecs.mean(0, keepdim=True)
    return vecs


def build_model(cfg: RedRecConfig, from_checkpoint: bool = False) -> RedRecModel:
    """The unsharded model of ``cfg`` for the dataset ``cfg.data`` (seeded).
    ``from_checkpoint``: its weights will be loaded, so a ``"log_count"`` item bias
    starts at 0 instead of reading the train split's counts."""
    meta = load_meta(cfg.data)
    vecs = _item_vectors(cfg, meta.num_items)
    mix_cfg = cfg.mix_config()
    torch.manual_seed(cfg.seed)
    tower_cfg = UserTowerConfig(
        model_path=cfg.model_path, init=cfg.init, num_items=meta.num_items,
        num_scenarios=len(meta.scenarios), num_actions=len(meta.actions),
        last_n=cfg.last_n, num_gap_buckets=mix_cfg.num_gap_buckets,
        interests_per_scenario=cfg.interests_per_scenario,
        item_embedding=cfg.item_embedding, item_states=cfg.item_states,
        embedding_dim=cfg.embedding_dim, dropout=cfg.dropout, item_dropout=cfg.item_dropout,
        item_init=cfg.item_init, lm_positions=cfg.lm_positions, event_mean=cfg.event_mean,
        table_init=cfg.table_init)
    counts = None
    if cfg.item_bias == "log_count":
        counts = (np.zeros(meta.num_items) if from_checkpoint
                  else item_bias_counts(cfg, meta.num_items))
    return RedRecModel(UserTower(tower_cfg, item_vectors=vecs), cfg, counts)


def item_bias_counts(cfg: RedRecConfig, num_items: int) -> np.ndarray:
    """[N] float64 count of every item's train-split positives (``target_actions`` /
    ``target_scenarios``; every event without them): the start of a ``"log_count"``
    item bias."""
    log = EventLog.from_dataset(cfg.data, split_filter="train")
    return popularity_counts(log, num_items, events=target_mask(log, cfg))


class _TowerSharders:
    """Contributes :class:`UserTowerSharder` to ``trainer.shard_model`` (which takes
    extra sharders from plugin objects)."""

    def sharders(self, device: torch.device) -> List[Any]:
        return [UserTowerSharder(device_type=device.type)]


#: the user LM's parameters (the name fragment of ``lm_lr`` / ``lm_anchor``)
LM_PARAMS = "encoder.lm."


def _shard(model: RedRecModel, cfg: RedRecConfig, ctx: DistContext) -> nn.Module:
    from torchrec_mm.training.trainer import shard_model

    return shard_model(model, cfg, ctx, [_TowerSharders()])  # type: ignore[arg-type]


def _inner(model: nn.Module) -> RedRecModel:
    m = model.module if hasattr(model, "module") else model
    while not isinstance(m, RedRecModel) and hasattr(m, "module"):
        m = m.module
    assert isinstance(m, RedRecModel), type(m)
    return m


# --------------------------------------------------------------------------- evaluation


def _gather_rows(local: torch.Tensor, rows: int, ctx: DistContext) -> torch.Tensor:
    """Concatenates every rank's ``local`` (padded to ``rows`` rows) in rank order."""
    if ctx.world_size == 1:
        return local
    padded = local.new_zeros((rows,) + tuple(local.shape[1:]))
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded.contiguous())
    counts = torch.tensor([local.shape[0]], dtype=torch.long)
    all_counts = [torch.zeros_like(counts) for _ in range(ctx.world_size)]
    dist.all_gather(all_counts, counts)
    return torch.cat([p[:int(c)] for p, c in zip(parts, all_counts)])


@torch.no_grad()
def embed_cases(model: nn.Module, log: EventLog, cases: EvalCases, cfg: RedRecConfig,
                ctx: DistContext, progress: bool = False
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """User interests of every case and item vectors of the whole catalogue.

    Every rank embeds a contiguous slice of the cases and of the catalogue (the items
    ride along as ``cand_item_id`` of the case batches), then all ranks all-gather.

    Returns:
        ``([U', K, d] interests, [N, d] unit item vectors)`` on every rank.
    """
    u, r, world = len(cases), ctx.rank, ctx.world_size
    n_items = cases.num_items
    bs = cfg.eval_batch_size
    per_rank = max(1, math.ceil(u / world))
    calls = max(1, math.ceil(per_rank / bs))
    chunk = math.ceil(n_items / (world * calls))
    mix_cfg = cfg.mix_config(cfg.resolved_eval_last_n)
    users_np, cut_np = cases.users.numpy(), cases.cutoff_time.numpy()
    was_training = model.training
    model.eval()
    user_parts, item_parts = [], []
    for j in tqdm(range(calls), desc="redrec embed", disable=not progress, leave=False):
        lo = min(u, r * per_rank + j * bs)
        hi = min(lo + bs, (r + 1) * per_rank, u)
        rows = np.arange(lo, hi) if hi > lo else np.zeros(1, np.int64)  # dummy row
        ilo = min(n_items, (r * calls + j) * chunk)
        items = np.arange(ilo, min(ilo + chunk, n_items), dtype=np.int64)
        seq = mix(log, users_np[rows], cut_np[rows], mix_cfg)
        lengths = np.zeros(rows.size, np.int64)
        lengths[0] = items.size
        batch = RedRecBatch(_with_candidates(seq.to_kjt(SEQ_FEATURES), items, lengths))
        _, interests, vecs = model(batch.to(ctx.device))
        if hi > lo:
            user_parts.append(interests.detach().cpu())
        assert vecs is not None
        item_parts.append(vecs.detach().cpu())
    model.train(was_training)
    k, d = _inner(model).tower.num_interests, _inner(model).tower.dim
    mine_u = torch.cat(user_parts) if user_parts else torch.zeros(0, k, d)
    mine_i = torch.cat(item_parts) if item_parts else torch.zeros(0, d)
    return (_gather_rows(mine_u, per_rank, ctx),
            _gather_rows(mine_i, calls * chunk, ctx))


def _faiss_scores(user_vecs: torch.Tensor, item_vecs: torch.Tensor, cases: EvalCases,
                  ks: Tuple[int, ...], factory: str, nprobe: int, progress: bool,
                  item_bias: Optional[torch.Tensor] = None, scale: float = 1.0
                  ) -> Dict[str, Any]:
    """Protocol metrics with the pool searched through a faiss index (module doc). With
    ``item_bias`` [N] the score is ``scale · cos + bias``: the index holds
    ``[item, bias]`` and the queries are ``[scale · interest, 1]``."""
    import faiss

    pool = cases.pool
    p, t = int(pool.shape[0]), int(cases.targets.shape[1])
    uv = torch.nn.functional.normalize(user_vecs.float(), dim=-1)
    iv = torch.nn.functional.normalize(item_vecs.float(), dim=-1)
    bias = None if item_bias is None else item_bias.detach().float().cpu().flatten()
    if bias is not None:
        uv = torch.cat([uv * scale, uv.new_ones(*uv.shape[:-1], 1)], -1)
        iv = torch.cat([iv, bias[:, None]], -1)
    pool_x = np.ascontiguousarray(iv[pool].numpy(), dtype=np.float32)
    d = pool_x.shape[1]
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"eval_index: faiss cannot build {factory!r}: {e}") from None
    if not index.is_trained:
        index.train(pool_x)
    index.add(pool_x)
    if hasattr(index, "nprobe"):
        index.nprobe = nprobe
    kq = min(p, max(ks) + t)
    low = -1e12  # below every score: "not retrieved"

    def score_fn(users: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        rows = torch.searchsorted(cases.users, users)
        q = uv[rows]                                             # [R, K, d]
        rr, kk = q.shape[0], q.shape[1]
        out = torch.full(cand.shape, low, dtype=torch.float64)
        if kq > 0:
            sims, idx = index.search(np.ascontiguousarray(q.reshape(rr * kk, d).numpy()), kq)
            sims = torch.from_numpy(sims).double().reshape(rr, kk * kq)
            idx = torch.from_numpy(idx).long().reshape(rr, kk * kq)
            ok = idx >= 0
            sims = torch.where(ok, sims, torch.full_like(sims, low))
            best = torch.full((rr, p), low, dtype=torch.float64)
            best.scatter_reduce_(1, idx.clamp(min=0), sims, reduce="amax")
            out[:, :p] = best
        tg = cases.targets[rows]
        tv = iv[tg.clamp(min=0)]                                 # [R, T, d]
        out[:, p:] = torch.einsum("rkd,rtd->rkt", q, tv).amax(1).double()
        return out

    return evaluate_scores(score_fn, cases, ks, progress=progress)


def eval_target_rows(log: EventLog, data: str, split: str,
                     target_actions: Optional[Sequence[str]] = None,
                     part: Optional[np.ndarray] = None,
                     scenarios: Optional[Sequence[str]] = None) -> np.ndarray:
    """[E] bool over ``log``'s events (the whole dataset ``data``): the events that may
    be evaluation targets — those of ``split`` (a key of :data:`EVAL_SPLITS`) with one
    of ``target_actions`` when given, in one of ``scenarios`` when given
    (``target_scenarios``). ``part``: the events' split codes
    (``load_split(data).assign(...)``) when the caller has them already."""
    if part is None:
        part = load_split(data).assign(log.item, log.timestamp, log.user)
    rows = np.isin(part, np.array(EVAL_SPLITS[split], dtype=part.dtype))
    positive = _positives(log, data, target_actions, scenarios)
    return rows if positive is None else rows & positive


def evaluate_redrec(model: nn.Module, cfg: RedRecConfig, ctx: DistContext,
                    log: Optional[EventLog] = None) -> Dict[str, Any]:
    """Retrieval metrics of ``model`` (collective: every rank calls it; the metrics are
    computed on every rank from the gathered vectors)."""
    if log is None:
        log = EventLog.from_dataset(cfg.data)
    target_rows = eval_target_rows(log, cfg.data, cfg.eval_split, cfg.target_actions,
                                   scenarios=cfg.target_scenarios)
    pcfg = cfg.protocol()
    num_items = _inner(model).tower.config.num_items
    cases = make_eval_cases(log.user_offsets, log.item, log.timestamp, num_items, pcfg,
                            target_rows=target_rows)
    if len(cases) == 0:
        raise ValueError(f"{cfg.data}: no user has a {cfg.eval_split} event after "
                         f"{cfg.min_history} earlier event(s): nothing to evaluate")
    show = cfg.progress and ctx.is_main
    user_vecs, item_vecs = embed_cases(model, log, cases, cfg, ctx, progress=show)
    inner = _inner(model)
    bias = None if inner.item_bias is None else inner.item_bias.weight.detach().cpu()
    scale = 1.0 / float(inner.tau().detach())
    if cfg.eval_index == "exact":
        metrics = evaluate_multi_interest(user_vecs, item_vecs, cases, cfg.eval_ks,
                                          progress=show, item_bias=bias, scale=scale)
    else:
        metrics = _faiss_scores(user_vecs, item_vecs, cases, cfg.eval_ks, cfg.eval_index,
                                cfg.eval_nprobe, show, item_bias=bias, scale=scale)
    metrics["split"] = cfg.eval_split
    metrics["index"] = cfg.eval_index
    return metrics


# --------------------------------------------------------------------------- training


def normalized_redrec_config(raw: Dict[str, Any]) -> Dict[str, Any]:
    """A stored RED-Rec run configuration with the defaults of options added since it
    was written; as stored when it no longer parses."""
    try:
        return json.loads(json.dumps(RedRecConfig.from_dict(dict(raw)).to_dict()))
    except (TypeError, ValueError):
        return raw


def _check_resumable(cfg: RedRecConfig) -> None:
    from torchrec_mm.training.trainer import _check_resumable as check

    check(cfg, normalized_redrec_config)  # type: ignore[arg-type]  # duck-typed


def _mean_across(value: float, ctx: DistContext) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    if ctx.world_size > 1:
        dist.all_reduce(t)
        t /= ctx.world_size
    return float(t)


def run_rank(cfg: RedRecConfig, ctx: DistContext) -> Dict[str, Any]:
    """The training loop of one rank (the process group is initialised)."""
    train_log = EventLog.from_dataset(cfg.data, split_filter="train")
    unsharded = build_model(cfg)
    num_items = unsharded.tower.config.num_items
    # L2-SP anchor: the LM's weights as built (a resumed run rebuilds the same start)
    anchor = [(p, p.detach().clone()) for n, p in unsharded.named_parameters()
              if LM_PARAMS in n and p.requires_grad] if cfg.lm_anchor > 0 else []
    model = _shard(unsharded, cfg, ctx)
    from torchrec_mm.training.trainer import make_optimizer

    dense_lrs = {frag: lr for frag, lr in (("item_tower.", cfg.item_lr),
                                           (LM_PARAMS, cfg.lm_lr),
                                           ("item_bias.", cfg.item_bias_lr)) if lr is not None}
    optimizer = make_optimizer(model, cfg, dense_lrs)  # type: ignore[arg-type]  # duck-typed
    ckpt_root = os.path.join(cfg.out, "checkpoints")
    latest = ckpt.latest_checkpoint(ckpt_root) if cfg.resume else None
    if latest is not None:
        _check_resumable(cfg)
    if ctx.is_main:
        write_json(os.path.join(cfg.out, "config.json"), cfg.to_dict())
    progress: Dict[str, Any] = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "curve": [],
                                "epochs": [], "epoch_loss_sum": 0.0}
    if latest is not None:
        _, skeleton, tensors = ckpt.read_checkpoint(latest)
        optimizer.init_state()
        model.load_state_dict(ckpt.restore(model.state_dict(), ckpt.child(skeleton, "model"),
                                           tensors, "/model", values_from_checkpoint=False))
        optimizer.load_state_dict(ckpt.restore(
            optimizer.state_dict(), ckpt.child(skeleton, "optimizer"), tensors, "/optimizer",
            values_from_checkpoint=False))
        progress = ckpt.restore(progress, ckpt.child(skeleton, "progress"), tensors,
                                "/progress")
        if ctx.is_main:
            logger.info("redrec: resumed from %s at step %d", latest, progress["step"])

    start_step = int(progress["step"])
    users0, _ = training_samples(train_log, cfg, 0)
    global_bs = cfg.batch_size * ctx.world_size
    steps_per_epoch = users0.size // global_bs
    if steps_per_epoch == 0:
        who = (f"users with an eligible train event after >= {cfg.min_history} others"
               if cfg.cutoffs == "targets" else
               f"users with >= {cfg.min_history + 1} train events")
        raise ValueError(f"{cfg.data}: {users0.size} training samples ({who} x "
                         f"{cfg.cutoffs_per_user} cutoffs), fewer than one step of batch "
                         f"{cfg.batch_size} x {ctx.world_size} rank(s)")
    total = steps_per_epoch * cfg.epochs
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    if start_step > total:
        raise ValueError(f"{cfg.out} holds a run trained for {start_step} steps, more than "
                         f"the {total} of this configuration (epochs {cfg.epochs}, max_steps "
                         f"{cfg.max_steps}): use another --out or --no-resume")
    probs = negative_distribution(train_log, num_items, cfg)
    target_rows = training_targets(train_log, cfg)
    inner = _inner(model)

    def save() -> None:
        ckpt.save_checkpoint(ckpt_root, progress["step"], {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "progress": progress})

    bar = tqdm(total=total, initial=progress["step"], desc="train[redrec]",
               disable=not (ctx.is_main and cfg.progress), dynamic_ncols=True)
    t_start = time.time()
    model.train()
    running: List[float] = []
    saved_at = -1
    while progress["step"] < total:
        epoch = progress["epoch"]
        users, t_now = training_samples(train_log, cfg, epoch)
        perm = np.random.default_rng([cfg.seed, epoch, 1]).permutation(users.size)
        for j in range(progress["batch_in_epoch"], steps_per_epoch):
            sel = perm[j * global_bs + ctx.rank * cfg.batch_size:
                       j * global_bs + (ctx.rank + 1) * cfg.batch_size]
            neg = sample_negatives(num_items, cfg, probs, epoch, j)
            batch = make_batch(train_log, users[sel], t_now[sel], cfg, neg, target_rows)
            loss, _, _ = model(batch.to(ctx.device))
            optimizer.zero_grad()
            # + the L2-SP penalty (0 without an anchor); the logged loss stays the task's
            (loss + 0.5 * cfg.lm_anchor * sum((p - p0).pow(2).sum() for p, p0 in anchor)
             ).backward()
            optimizer.step()
            inner.tau.clamp_()
            value = float(loss.detach())
            running.append(value)
            progress["epoch_loss_sum"] += value
            progress["step"] += 1
            progress["batch_in_epoch"] = j + 1
            if progress["step"] % cfg.log_every == 0 or progress["step"] == total:
                mean = _mean_across(float(np.mean(running)), ctx)
                progress["curve"].append({"step": progress["step"], "epoch": epoch,
                                          "loss": mean, "tau": float(inner.tau().detach())})
                running = []
                bar.set_postfix(loss=f"{mean:.4f}")
            bar.update(1)
            epoch_done = progress["batch_in_epoch"] == steps_per_epoch
            if epoch_done:
                mean = _mean_across(progress["epoch_loss_sum"] / steps_per_epoch, ctx)
                progress["epochs"].append({"epoch": epoch, "loss": mean,
                                           "step": progress["step"]})
                progress["epoch"] += 1
                progress["batch_in_epoch"] = 0
                progress["epoch_loss_sum"] = 0.0
            if epoch_done or (cfg.checkpoint_every
                              and progress["step"] % cfg.checkpoint_every == 0):
                save()
                saved_at = progress["step"]
            if progress["step"] >= total:
                break
    bar.close()
    if saved_at != progress["step"]:
        save()
    result: Dict[str, Any] = {"config": cfg.to_dict(), "world_size": ctx.world_size,
                              "steps": progress["step"], "steps_per_epoch": steps_per_epoch,
                              "start_step": start_step,
                              "curve": progress["curve"], "epochs": progress["epochs"],
                              "train_seconds": time.time() - t_start,
                              "plan": str(getattr(model, "plan", "")) if ctx.is_main else None}
    if cfg.evaluate:
        metrics = evaluate_redrec(model, cfg, ctx)
        result["eval"] = metrics
        if ctx.is_main:
            write_json(os.path.join(cfg.out, "eval_metrics.json"),
                       {"step": progress["step"], "checkpoint": _latest_name(ckpt_root),
                        "config": cfg.to_dict(), "metrics": metrics})
    if ctx.is_main:
        write_json(os.path.join(cfg.out, "train_metrics.json"), result)
    return result


def _latest_name(root: str) -> Optional[str]:
    path = ckpt.latest_checkpoint(root)
    return os.path.basename(path) if path else None


def _worker(cfg: RedRecConfig, job: str = "train") -> None:
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", cfg.world_size))
    ctx = init_distributed(rank, world)
    try:
        if job == "train":
            run_rank(cfg, ctx)
        else:
            _evaluate_rank(cfg, ctx)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _launch(cfg: RedRecConfig, job: str) -> None:
    if launched_by_torchrun() or cfg.world_size == 1:
        _worker(cfg, job)
    else:
        spawn(_worker, cfg.world_size, (cfg, job))


def train_redrec(cfg: RedRecConfig) -> Dict[str, Any]:
    """Trains (spawning ``cfg.world_size`` local ranks unless launched by torchrun),
    resuming from ``cfg.out``'s latest checkpoint; returns ``train_metrics.json``."""
    os.makedirs(cfg.out, exist_ok=True)
    _launch(cfg, "train")
    with open(os.path.join(cfg.out, "train_metrics.json")) as f:
        return json.load(f)


def _evaluate_rank(cfg: RedRecConfig, ctx: DistContext) -> Dict[str, Any]:
    root = os.path.join(cfg.out, "checkpoints")
    latest = ckpt.latest_checkpoint(root)
    if latest is None:
        raise FileNotFoundError(f"{cfg.out}: no checkpoint (train the run first)")
    model = _shard(build_model(cfg, from_checkpoint=True), cfg, ctx)
    step, skeleton, tensors = ckpt.read_checkpoint(latest)
    model.load_state_dict(ckpt.restore(model.state_dict(), ckpt.child(skeleton, "model"),
                                       tensors, "/model", values_from_checkpoint=False))
    metrics = evaluate_redrec(model, cfg, ctx)
    if ctx.is_main:
        write_json(os.path.join(cfg.out, "eval_metrics.json"),
                   {"step": step, "checkpoint": os.path.basename(latest),
                    "config": cfg.to_dict(), "metrics": metrics})
    return metrics


def evaluate_run(run_dir: str, **overrides: Any) -> Dict[str, Any]:
    """Evaluates the latest checkpoint of a run directory (its ``config.json``, with
    ``overrides`` of evaluation options, e.g. ``eval_index="HNSW32"``) and writes
    ``run_dir/eval_metrics.json``; returns its contents."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a RED-Rec run directory")
    with open(path) as f:
        raw = json.load(f)
    bad = sorted(k for k in overrides if not (k.startswith("eval_") or k in (
        "data", "world_size", "progress", "target_scenarios")))
    if bad:
        raise ValueError(f"evaluate: only eval_*, target_scenarios, data, world_size and "
                         f"progress can be overridden, got {bad}")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    raw["out"] = run_dir
    raw["evaluate"] = True
    cfg = RedRecConfig.from_dict(raw, source=path)
    _launch(cfg, "evaluate")
    with open(os.path.join(run_dir, "eval_metrics.json")) as f:
        return json.load(f)
