"""SASRec (Kang & McAuley, 2018): the ID-only sequential baseline of RED-Rec's tables
(paper ``001_42c7267e32b49bc6`` §5.1 "Baselines and Evaluation", Tables 1-2), trained and
evaluated inside the RED-Rec harness so its numbers are comparable with RED-Rec's.

**Model.** A user's last ``max_len`` events (item ids only, time order, the
``"global_time"`` mixing policy of :mod:`torchrec_mm.redrec.sequences`) become::

    x_j = sqrt(d) * item(i_j) + pos(j)          j = 0 (oldest kept event) .. L - 1
    h   = LayerNorm(CausalTransformer(dropout(x)))                       [B, L, d]
    u   = h[b, L_b - 1]                          the user vector          [B, d]

The item table is a TorchRec :class:`~torchrec.modules.embedding_modules.EmbeddingCollection`
(one table ``sasrec_item`` of ``num_items x d`` rows serving the features
``seq_item_id`` (history), ``cand_item_id`` (next items) and ``neg_item_id`` (sampled
negatives)), so DMP shards it like the RED-Rec tower's tables; positions, the
transformer (``torch.nn``, pre-LayerNorm, ReLU point-wise FFN of width ``d`` as in
SASRec) and the temperature are small dense modules. The item vectors used for
retrieval are the item table itself.

**Orientation.** Sequences are left-aligned (position 0 = oldest kept event, padding
after the last event, as :class:`~torchrec_mm.redrec.sequences.MixedSequences`), so
under the causal mask a real event never attends to padding: a user's output does not
depend on the batch's padding or on the other users.

**Training** (:func:`fit_sasrec`, :func:`train_sasrec`): every user's time-ordered
*train-split* events are cut into segments of ``max_len + 1`` events that overlap by
one event (so each event after a user's first is predicted exactly once); the hidden
state at every position ``t`` predicts event ``t + 1`` with the RED-Rec NCE
(:func:`~torchrec_mm.redrec.losses.nce_loss`: cosine / learnable ``τ``, in-batch
negatives = the other positions' next items, plus ``negatives`` items sampled uniformly
per batch; accidental hits masked). Negatives are drawn from the items that occur in
the training log, never from items the model cannot have seen (cold items keep their
random initialisation, as a new ID would).

**Evaluation** (:func:`evaluate_sasrec`): the cases of
:func:`~torchrec_mm.redrec.protocol.make_eval_cases` over the whole log (targets:
test-split events by default), the history of each case = its events before
``cutoff_time`` (last ``max_len``), the score = ``cos(u, item)``; metrics from
:func:`~torchrec_mm.redrec.protocol.evaluate_multi_interest` with one vector per user.

Example::

    cfg = SASRecConfig(num_items=meta.num_items, epochs=5)
    out = train_sasrec("out/synth", cfg, out_dir="runs/sasrec")   # train split only
    res = evaluate_sasrec(out["model"], "out/synth", ProtocolConfig(pool_size=100_000))
    res["HR@10"], res["NDCG@10"], res["MRR"]
"""

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from torchrec_mm.data.split import TEST_COLD, TEST_WARM, TRAIN, load_split
from torchrec_mm.redrec.losses import LearnableTemperature, nce_loss
from torchrec_mm.redrec.protocol import (
    EvalCases,
    ProtocolConfig,
    evaluate_multi_interest,
    make_eval_cases,
)
from torchrec_mm.redrec.sequences import (
    SEQ_ITEM,
    EventLog,
    MixConfig,
    action_names_option,
    mix,
)
from torchrec_mm.utils.io import load_tensors, save_tensors, write_json

__all__ = [
    "CAND_ITEM",
    "NEG_ITEM",
    "SASRec",
    "SASRecConfig",
    "evaluate_sasrec",
    "fit_sasrec",
    "load_sasrec",
    "make_training_segments",
    "padded_to_kjt",
    "train_sasrec",
]

CAND_ITEM = "cand_item_id"
"""Candidate / next-item feature (jagged, per user), looked up in the item table."""
NEG_ITEM = "neg_item_id"
"""Sampled negatives (all in row 0 of the KJT), looked up in the item table."""

TABLE = "sasrec_item"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"

_TARGET_SPLITS = {"all": None, "train": (TRAIN,), "test_warm": (TEST_WARM,),
                  "test_cold": (TEST_COLD,), "test": (TEST_WARM, TEST_COLD)}


@dataclass
class SASRecConfig:
    """SASRec model and training configuration.

    Attributes:
        num_items: rows of the item table (item ids in ``[0, num_items)``).
        dim: d, width of item, position and hidden vectors.
        num_layers / num_heads: causal transformer blocks / attention heads.
        max_len: L, the longest history (and training segment minus one).
        dropout: dropout on the inputs and inside the blocks.
        lr: Adam learning rate; weight_decay: Adam L2.
        epochs: passes over the training segments.
        batch_size: segments per step (each gives up to ``max_len`` positions; the
            in-batch softmax is ``positions x positions``).
        negatives: M sampled negatives per step (shared by the batch), 0 for in-batch only.
        tau_init: initial temperature of the :class:`LearnableTemperature`.
        target_actions: the actions that make an event a next-item target (e.g.
            ``["is_click"]`` for an impression log; every event stays an input);
            ``None``: every event.
        seed: initialisation, shuffling, dropout and negative sampling.
    """

    num_items: int
    dim: int = 64
    num_layers: int = 2
    num_heads: int = 2
    max_len: int = 50
    dropout: float = 0.2
    lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: int = 10
    batch_size: int = 64
    negatives: int = 256
    tau_init: float = 0.07
    target_actions: Optional[Tuple[str, ...]] = None
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {"num_items": self.num_items >= 1, "dim": self.dim >= 1,
                  "num_layers": self.num_layers >= 1, "num_heads": self.num_heads >= 1,
                  "max_len": self.max_len >= 1, "epochs": self.epochs >= 0,
                  "batch_size": self.batch_size >= 1, "negatives": self.negatives >= 0,
                  "dropout": 0.0 <= self.dropout < 1.0, "lr": self.lr > 0}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"SASRecConfig.{name}: invalid value {getattr(self, name)!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"SASRecConfig: dim={self.dim} is not divisible by "
                             f"num_heads={self.num_heads}")
        self.target_actions = action_names_option(self.target_actions,
                                                   "SASRecConfig.target_actions")


# --------------------------------------------------------------------------- features


def padded_to_kjt(items: torch.Tensor, cand: Optional[torch.Tensor] = None,
                  neg: Optional[torch.Tensor] = None) -> KeyedJaggedTensor:
    """Left-aligned padded ids -> the model's KJT.

    Args:
        items: [B, L] int history item ids, left-aligned, ``-1`` padding.
        cand: optional [B, C] int candidate ids per row, ``-1`` entries dropped.
        neg: optional [M] int negative ids (shared; stored as row 0 of ``neg_item_id``).

    Returns:
        ``KeyedJaggedTensor`` with ``seq_item_id`` (and ``cand_item_id``, ``neg_item_id``).
    """
    if items.dim() != 2:
        raise ValueError(f"items: expected [B, L], got {tuple(items.shape)}")
    b = items.shape[0]
    keys, values, lengths = [SEQ_ITEM], [], []
    m = items >= 0
    values.append(items[m])
    lengths.append(m.sum(1))
    if cand is not None:
        if cand.dim() != 2 or cand.shape[0] != b:
            raise ValueError(f"cand: expected [B={b}, C], got {tuple(cand.shape)}")
        mc = cand >= 0
        keys.append(CAND_ITEM)
        values.append(cand[mc])
        lengths.append(mc.sum(1))
    if neg is not None:
        ln = torch.zeros(b, dtype=torch.long)
        if b:
            ln[0] = neg.numel()
        keys.append(NEG_ITEM)
        values.append(neg.reshape(-1))
        lengths.append(ln)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.cat([v.to(torch.long) for v in values]),
        lengths=torch.cat([x.to(torch.long) for x in lengths]).to(torch.int32))


# --------------------------------------------------------------------------- model


class SASRec(nn.Module):
    """SASRec over an :class:`EmbeddingCollection` item table (module doc).

    Args:
        config: :class:`SASRecConfig`.
        device: where the EC table is built (``"meta"`` for DMP to materialise).

    Children: ``embeddings`` (EC, table ``sasrec_item``), ``pos`` (``max_len x d``),
    ``encoder`` (``nn.TransformerEncoder``), ``norm``, ``temperature``.

    Example::

        model = SASRec(SASRecConfig(num_items=1000))
        u = model(padded_to_kjt(torch.tensor([[3, 7, 9, -1], [5, -1, -1, -1]])))  # [2, d]
    """

    def __init__(self, config: SASRecConfig, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.config = dataclasses.replace(config)
        c = self.config
        self.embeddings = EmbeddingCollection(
            tables=[EmbeddingConfig(name=TABLE, embedding_dim=c.dim,
                                    num_embeddings=c.num_items,
                                    feature_names=[SEQ_ITEM, CAND_ITEM, NEG_ITEM])],
            device=device)
        self.pos = nn.Embedding(c.max_len, c.dim)
        layer = nn.TransformerEncoderLayer(
            d_model=c.dim, nhead=c.num_heads, dim_feedforward=c.dim, dropout=c.dropout,
            activation="relu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, c.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.dim)
        self.input_dropout = nn.Dropout(c.dropout)
        self.temperature = LearnableTemperature(init=c.tau_init)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Item and position tables ~ N(0, 1/d) (unit expected norm)."""
        std = 1.0 / math.sqrt(self.config.dim)
        for p in self.embeddings.parameters():
            if p.device.type != "meta":
                nn.init.normal_(p, std=std)
        nn.init.normal_(self.pos.weight, std=std)

    @property
    def dim(self) -> int:
        return self.config.dim

    def item_embeddings(self) -> torch.Tensor:
        """[num_items, d] the item table (unsharded model only)."""
        return self.embeddings.embeddings[TABLE].weight

    def forward_with_items(self, features: KeyedJaggedTensor
                           ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, JaggedTensor]]:
        """Hidden states of every position, and the candidate / negative lookups.

        Args:
            features: ``seq_item_id`` (each row's history, oldest first, at most
                ``max_len``; at least one event per row), optionally ``cand_item_id``
                and ``neg_item_id``.

        Returns:
            ``(hidden [B, L, d], lengths [B], lookups)``: ``L`` = the longest history of
            the batch; positions ``>= lengths[b]`` hold garbage (padding).
            ``lookups`` maps ``cand_item_id`` / ``neg_item_id`` (present keys only) to
            :class:`JaggedTensor` of raw ``[n, d]`` item vectors.
        """
        c = self.config
        d = features.to_dict()
        if SEQ_ITEM not in d:
            raise KeyError(f"SASRec: features lack {SEQ_ITEM!r} (got {features.keys()})")
        lengths = d[SEQ_ITEM].lengths().to(torch.long)
        for k, jt in d.items():
            if k in (SEQ_ITEM, CAND_ITEM, NEG_ITEM):
                v = jt.values()
                bad = (v < 0) | (v >= c.num_items)
                if bool(bad.any()):
                    i = int(bad.nonzero()[0, 0])
                    raise ValueError(f"feature {k!r}: item id {int(v[i])} at position {i} "
                                     f"outside [0, {c.num_items})")
        b = lengths.shape[0]
        if b and int(lengths.min()) < 1:
            raise ValueError(f"feature {SEQ_ITEM!r}: row {int((lengths < 1).nonzero()[0, 0])} "
                             "has no history event (SASRec needs at least one)")
        L = int(lengths.max()) if b else 0
        if L > c.max_len:
            raise ValueError(f"feature {SEQ_ITEM!r}: a history of {L} events, more than "
                             f"max_len={c.max_len}")
        keys = [k for k in (SEQ_ITEM, CAND_ITEM, NEG_ITEM) if k in d]
        # the EC looks up every feature of its table: absent keys become empty rows
        all_keys = (SEQ_ITEM, CAND_ITEM, NEG_ITEM)
        emb = self.embeddings(KeyedJaggedTensor.from_lengths_sync(
            keys=list(all_keys),
            values=torch.cat([d[k].values().to(torch.long) for k in keys]),
            lengths=torch.cat([d[k].lengths().to(torch.int32) if k in d
                               else torch.zeros(b, dtype=torch.int32) for k in all_keys])))
        vals = emb[SEQ_ITEM].values()
        mask = torch.arange(L, device=lengths.device)[None, :] < lengths[:, None]
        x = vals.new_zeros(b, L, c.dim)
        x[mask] = vals * math.sqrt(c.dim)
        x = self.input_dropout(x + self.pos.weight[:L][None])
        causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=x.dtype,
                                                                device=x.device)
        h = self.norm(self.encoder(x, mask=causal, is_causal=True))
        return h, lengths, {k: emb[k] for k in keys if k != SEQ_ITEM}

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Returns the user vectors ``[B, d]``: the hidden state at each row's last event."""
        h, lengths, _ = self.forward_with_items(features)
        return h[torch.arange(h.shape[0]), lengths - 1]

    @torch.no_grad()
    def user_vectors(self, items: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """[B, d] user vectors of left-aligned padded histories ``items`` [B, N] (``-1``
        padding; only the last ``max_len`` events of each row are used), in eval mode."""
        was = self.training
        self.eval()
        try:
            items = _last_events(items, self.config.max_len)
            out = [self(padded_to_kjt(items[i:i + batch_size]))
                   for i in range(0, items.shape[0], batch_size)]
        finally:
            self.train(was)
        return torch.cat(out) if out else torch.zeros(0, self.dim)


def _last_events(items: torch.Tensor, n: int) -> torch.Tensor:
    """Keeps the last ``n`` valid events of each left-aligned row (still left-aligned)."""
    lengths = (items >= 0).sum(1)
    if items.shape[1] <= n:
        return items
    start = (lengths - n).clamp(min=0)
    idx = start[:, None] + torch.arange(n)[None, :]
    out = items.gather(1, idx.clamp(max=items.shape[1] - 1))
    return out.masked_fill(torch.arange(n)[None, :] >= (lengths - start)[:, None], -1)


# --------------------------------------------------------------------------- training


def make_training_segments(log: EventLog, max_len: int) -> np.ndarray:
    """Each user's events cut into segments of ``max_len + 1`` that overlap by one event.

    Segment ``k`` of user ``u`` holds its events ``k*max_len .. k*max_len + max_len``, so
    each event after the user's first is a next-item target exactly once. Users with
    fewer than two events give none.

    Returns:
        [S, max_len + 1] int64 item ids, left-aligned, ``-1`` padding (every row >= 2
        events).
    """
    return _items_at(log, training_segment_events(log, max_len))


def _items_at(log: EventLog, events: np.ndarray) -> np.ndarray:
    """Item ids of event indices (``-1`` stays ``-1``)."""
    items = log.item[np.maximum(events, 0)] if log.num_events else np.full(events.shape, -1)
    return np.where(events >= 0, items, -1).astype(np.int64)


def training_segment_events(log: EventLog, max_len: int) -> np.ndarray:
    """The segments of :func:`make_training_segments` as [S, max_len + 1] int64 event
    indices into ``log`` (``-1`` padding)."""
    off = log.user_offsets.astype(np.int64)
    n = np.diff(off)
    segs = np.where(n >= 2, -(-(n - 1) // max_len), 0)
    total = int(segs.sum())
    seg_user = np.repeat(np.arange(n.shape[0], dtype=np.int64), segs)
    k = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(segs) - segs, segs)
    start = off[seg_user] + k * max_len
    length = np.minimum(start + max_len + 1, off[seg_user + 1]) - start
    col = np.arange(max_len + 1, dtype=np.int64)[None, :]
    return np.where(col < length[:, None], start[:, None] + col, -1).astype(np.int64)


def _as_log(data: Union[str, EventLog], split_filter: Optional[str]) -> EventLog:
    if isinstance(data, EventLog):
        return data
    return EventLog.from_dataset(data, split_filter=split_filter)


def fit_sasrec(log: EventLog, cfg: SASRecConfig, progress: bool = True
               ) -> Tuple[SASRec, Dict[str, Any]]:
    """Trains SASRec on every event of ``log`` (pass a train-only log; see module doc).

    Returns:
        ``(model in eval mode, metrics)``: metrics hold ``loss`` (per epoch mean),
        ``tau``, ``num_segments``, ``num_targets``, ``num_train_events``, ``seconds``.
    """
    from tqdm.auto import tqdm

    if log.num_events and int(log.item.max()) >= cfg.num_items:
        r = int(np.argmax(log.item >= cfg.num_items))
        raise ValueError(f"log row {int(log.row[r])}: item_id {int(log.item[r])} outside "
                         f"[0, num_items={cfg.num_items})")
    t0 = time.time()
    events = training_segment_events(log, cfg.max_len)
    segments = torch.from_numpy(_items_at(log, events))
    # next-item targets: every event, or those with one of target_actions
    targets = segments[:, 1:].clone()
    if cfg.target_actions is not None:
        engaged = log.action_mask(cfg.target_actions, "SASRec (target_actions)")
        ok = (events[:, 1:] >= 0) & engaged[np.maximum(events[:, 1:], 0)]
        targets[~torch.from_numpy(ok)] = -1
    train_items = torch.from_numpy(np.unique(log.item))
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = SASRec(cfg)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        losses = []
        num_batches = -(-segments.shape[0] // cfg.batch_size)
        bar = tqdm(total=cfg.epochs * num_batches, desc="sasrec train", unit="step",
                   disable=not progress or num_batches == 0)
        model.train()
        for _ in range(cfg.epochs):
            perm = torch.randperm(segments.shape[0], generator=gen)
            total, count = 0.0, 0
            for i in range(0, segments.shape[0], cfg.batch_size):
                rows = perm[i:i + cfg.batch_size]
                seg, tgt = segments[rows], targets[rows]
                inp = seg[:, :-1].masked_fill(seg[:, 1:] < 0, -1)  # the last event: target only
                if not bool((tgt >= 0).any()):
                    bar.update(1)
                    continue
                neg = (train_items[torch.randint(train_items.numel(), (cfg.negatives,),
                                                 generator=gen)]
                       if cfg.negatives else None)
                h, lengths, look = model.forward_with_items(padded_to_kjt(inp, tgt, neg))
                valid = tgt >= 0
                loss = nce_loss(
                    h[valid[:, :h.shape[1]]], look[CAND_ITEM].values(),
                    look[NEG_ITEM].values() if neg is not None else None,
                    model.temperature(), in_batch=True, pos_ids=tgt[valid],
                    neg_ids=neg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                model.temperature.clamp_()
                value = float(loss.detach())
                total += value * int(valid.sum())
                count += int(valid.sum())
                bar.update(1)
                bar.set_postfix(loss=f"{value:.3f}")
            losses.append(total / max(count, 1))
        bar.close()
    model.eval()
    metrics = {"loss": losses, "tau": float(model.temperature()),
               "num_segments": int(segments.shape[0]),
               "num_targets": int((targets >= 0).sum()),
               "num_train_events": int(log.num_events), "seconds": time.time() - t0,
               "config": dataclasses.asdict(cfg)}
    return model, metrics


def save_sasrec(model: SASRec, out_dir: str) -> None:
    """Writes ``config.json`` and ``model.safetensors`` (atomically) into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    save_tensors(os.path.join(out_dir, MODEL_FILE), dict(model.state_dict()))
    write_json(os.path.join(out_dir, CONFIG_FILE), dataclasses.asdict(model.config))


def load_sasrec(out_dir: str) -> SASRec:
    """Reads a model written by :func:`save_sasrec` / :func:`train_sasrec` (eval mode)."""
    with open(os.path.join(out_dir, CONFIG_FILE)) as f:
        cfg = SASRecConfig(**json.load(f))
    model = SASRec(cfg)
    model.load_state_dict(load_tensors(os.path.join(out_dir, MODEL_FILE)), strict=True)
    return model.eval()


def train_sasrec(data_dir: Union[str, EventLog], cfg: SASRecConfig,
                 out_dir: Optional[str] = None, progress: bool = True) -> Dict[str, Any]:
    """Trains SASRec on the **train split** of a dataset (next-item NCE, module doc).

    Args:
        data_dir: a canonical dataset with ``split.json`` (only ``train`` rows are read),
            or an :class:`EventLog` used as is.
        cfg: :class:`SASRecConfig` (``num_items`` must cover the catalog).
        out_dir: if given, writes ``model.safetensors``, ``config.json`` and
            ``metrics.json`` there.
        progress: tqdm bar over steps.

    Returns:
        the JSON metrics of :func:`fit_sasrec` plus ``"model"`` (the trained
        :class:`SASRec`, not part of ``metrics.json``).
    """
    log = _as_log(data_dir, "train")
    model, metrics = fit_sasrec(log, cfg, progress)
    if out_dir is not None:
        save_sasrec(model, out_dir)
        write_json(os.path.join(out_dir, METRICS_FILE), metrics)
    return {**metrics, "model": model}


# --------------------------------------------------------------------------- evaluation


def sasrec_case_vectors(model: SASRec, log: EventLog, cases: EvalCases,
                        batch_size: int = 512) -> torch.Tensor:
    """[U', d] user vectors of the cases: each case's last ``max_len`` events strictly
    before ``cutoff_time`` (``mix`` with the ``"global_time"`` policy)."""
    seq = mix(log, cases.users.numpy(), cases.cutoff_time.numpy(),
              MixConfig(policy="global_time", last_n=model.config.max_len))
    return model.user_vectors(torch.from_numpy(seq.item), batch_size)


def evaluate_sasrec(model: SASRec, data_dir: Union[str, EventLog],
                    protocol_cfg: Optional[ProtocolConfig] = None,
                    target_split: str = "test",
                    target_rows: Optional[np.ndarray] = None,
                    progress: bool = True,
                    return_per_user: bool = False,
                    target_actions: Optional[List[str]] = None,
                    scenarios: Optional[List[str]] = None) -> Dict[str, Any]:
    """RED-Rec protocol metrics of a SASRec model (same cases as RED-Rec).

    Args:
        model: a trained :class:`SASRec`.
        data_dir: the dataset (every split is read: histories use all events before the
            cutoff), or an :class:`EventLog`.
        protocol_cfg: :class:`ProtocolConfig` (``min_history`` must be >= 1).
        target_split: which events may be targets when reading a dataset: ``"test"``
            (warm + cold, default), ``"test_warm"``, ``"test_cold"``, ``"train"`` or
            ``"all"``.
        target_rows: [E] bool over the *log's* rows instead of ``target_split`` (the
            only choice for an :class:`EventLog`; default every event).
        progress, return_per_user: as in :func:`evaluate_multi_interest`.
        target_actions: further restrict the targets to events with one of these actions
            (as ``RedRecConfig.target_actions``); scenarios: to events of these
            scenarios (as ``RedRecConfig.target_scenarios``).

    Returns:
        ``{"HR@K", "NDCG@K", "MRR@K" for K in ks, "MRR", "num_users", "num_candidates",
        "pool_size", "target_split"}``.
    """
    cfg = protocol_cfg or ProtocolConfig()
    if cfg.min_history < 1:
        raise ValueError("evaluate_sasrec: ProtocolConfig.min_history must be >= 1 "
                         "(SASRec needs a history event)")
    log = _as_log(data_dir, None)
    if target_rows is None and not isinstance(data_dir, EventLog):
        if target_split not in _TARGET_SPLITS:
            raise ValueError(f"target_split: {target_split!r}; choose from "
                             f"{list(_TARGET_SPLITS)}")
        codes = _TARGET_SPLITS[target_split]
        if codes is not None:
            part = load_split(data_dir).assign(log.item, log.timestamp, log.user)
            target_rows = np.isin(part, np.array(codes, dtype=np.int8))
    elif isinstance(data_dir, EventLog) and target_rows is None:
        target_split = "all"
    else:
        target_split = "custom"
    if target_actions is not None:
        engaged = log.action_mask(target_actions, "evaluate_sasrec (target_actions)")
        target_rows = engaged if target_rows is None else np.asarray(target_rows) & engaged
    if scenarios is not None:
        inside = log.scenario_mask(scenarios, "evaluate_sasrec (target_scenarios)")
        target_rows = inside if target_rows is None else np.asarray(target_rows) & inside
    cases = make_eval_cases(log.user_offsets, log.item, log.timestamp,
                            model.config.num_items, cfg, target_rows)
    vecs = sasrec_case_vectors(model, log, cases)
    out = evaluate_multi_interest(vecs, model.item_embeddings().detach(), cases,
                                  progress=progress, return_per_user=return_per_user)
    out["target_split"] = target_split
    return out
