"""The RED-Rec user tower as a TorchRec module that ``DistributedModelParallel`` shards
(paper ``001_42c7267e32b49bc6`` §4.2, eq. 5; appendix E.2; Table A3).

::

    U_u = E_user([H̃_u[:-W]; Q])          K interest vectors, K = 3 per scenario

Every event ``j`` of the mixed sequence (:mod:`torchrec_mm.redrec.sequences`) becomes
one input vector::

    x_j = item(i_j) + action(a_j) + hour(h_j) + scenario(s_j) + PE_seq(j) + PE_gap(Δt_j)

projected to the LM's hidden size when ``embedding_dim`` differs from it. The ``K``
learnable query vectors ``Q`` are appended **right after each user's last event**
(positions ``L_b .. L_b + K - 1``); everything after them is padding, masked out of
attention. The hidden states of the pretrained LM (any local Hugging Face checkpoint,
called with ``inputs_embeds`` and an attention mask; the default is the bundled MiniLM,
the same LM that initialises the item tower) at the query positions are projected to
``d`` and l2-normalised: ``[B, K, d]``. Because the queries follow the events directly,
a user's output depends neither on the other users of the batch nor on how much
padding the batch has.

**Tables** (one :class:`~torchrec.modules.embedding_modules.EmbeddingCollection`,
``embedding_dim = d`` for all, names ``{prefix}_...``):

=================== ============================ ===============================
table               rows                          features
=================== ============================ ===============================
``_item`` (id mode) ``num_items``                 ``seq_item_id``, ``cand_item_id``
``_scenario``       ``num_scenarios``             ``seq_scenario``
``_hour``           24                            ``seq_hour``
``_pos``            ``last_n``                    ``seq_pos``
``_gap``            ``num_gap_buckets``           ``seq_gap_bucket``
``_action``         ``num_actions`` (if > 0)      ``seq_action_bit`` (derived)
=================== ============================ ===============================

Every table starts from TorchRec's default, uniform in ``±1/sqrt(rows)``
(``table_init="torchrec"``), or from the LM's own embedding init ``N(0,
initializer_range^2)`` (``table_init="lm"``, BERT: std 0.02), under which no table's
share of the event vector (the sum of one row of each) depends on its size.

**Actions** are multi-hot (an event can be liked *and* shared). The paper embeds the
flag vector densely (``a_j = multi_hot_j @ W_action``); this is done with a *per-bit
table*: the tower turns the ``seq_actions`` bit masks into a derived jagged feature
``seq_action_bit`` (the indices of the set bits, events in order), the EC looks the
bits up (sharded like every other table) and the rows of one event are summed. An event
without any flag gets a zero action vector. (A ``2 ** num_actions``-row table of flag
*combinations* would not generalise across combinations and explodes for many flags.)

**Item side.** ``item_embedding="id"``: an item-ID table (RED-Rec-symbol); the optional
feature ``cand_item_id`` (any number of items per row: the next item, the window,
negatives) is looked up in the same table, so candidates and history share one space.
``"content"``: item-tower vectors through a trainable linear projection to ``d``, for
both history and candidates: either frozen (``item_vectors`` ``[num_items, D_c]``, a
non-trainable buffer, e.g. the ContentEncoder's ``emb_token`` output: the paper's
"Item LLM frozen", Table A3) or, with ``item_states``, the
:class:`~torchrec_mm.redrec.item_tower.ItemTower` whose top LM layers train jointly
with the user tower (the paper's setting; it runs once per distinct item of a batch).
:meth:`UserTower.forward_with_items` returns the candidates' l2-normalised vectors.

**Initialisation** (Table A3): ``"pretrained"`` loads the checkpoint weights,
``"scratch"`` builds the same architecture randomly initialised, ``"frozen"`` loads them
and freezes the LM (tables, queries and projections still train). The LM's token
embedding matrix is never used (inputs are embeddings) and is replaced by a frozen
one-row placeholder; a BERT pooler is dropped (both would be parameters without
gradients, which DDP rejects).

**Sharding.** :class:`UserTowerSharder` shards the tower: its
:class:`ShardedUserTower` shards the child EC with an
:class:`~torchrec.distributed.embedding.EmbeddingCollectionSharder` (table-wise,
column-wise, row-wise on CPU) under the planner's plan and keeps the transformer,
queries and projections as ordinary modules that DMP replicates with DDP (only the EC
parameters are reported as sharded). ``input_dist`` / ``compute`` / ``output_dist``
delegate to the sharded EC; the dense encoder runs as a callback of the EC's output
awaitable (the template of ``torchrec/distributed/fp_embeddingbag.py``). The sharder is
optional: without it DMP recurses into the tower and shards the child EC with its
default sharder, which computes the same thing; registering it keeps the whole tower one
sharded module (one place for the derived action feature and the content lookups,
which need raw item ids and so must run before the input dist). Training through
``TrainPipelineSparseDist`` is not tested.

Example::

    cfg = UserTowerConfig(num_items=10_000, num_scenarios=3, num_actions=5, last_n=128,
                          num_gap_buckets=21)
    tower = UserTower(cfg)                          # MiniLM, K = 9 queries
    inputs, targets = split_window(mix(log, users, t_now, mix_cfg), w=10)
    interests = tower(inputs.to_kjt())              # [B, 9, 384], unit norm
    # under DMP: sharders=[UserTowerSharder()] + default_sharders(device)
"""

import dataclasses
import inspect
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, Iterator, List, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.distributed.embedding import (
    EmbeddingCollectionContext,
    EmbeddingCollectionSharder,
    ShardedEmbeddingCollection,
)
from torchrec.distributed.embedding_types import BaseEmbeddingSharder, KJTList
from torchrec.distributed.types import (
    Awaitable,
    LazyAwaitable,
    ParameterSharding,
    QuantizedCommCodecs,
    ShardedModule,
    ShardingEnv,
)
from torchrec.distributed.utils import append_prefix
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.optim.keyed import KeyedOptimizer
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from torchrec_mm.redrec.item_tower import ITEM_INITS, ItemTower
from torchrec_mm.redrec.readout import forward_at, named_layer_stack
from torchrec_mm.redrec.sequences import (
    SEQ_ACTIONS,
    SEQ_GAP,
    SEQ_HOUR,
    SEQ_ITEM,
    SEQ_POS,
    SEQ_SCENARIO,
)
from torchrec_mm.utils import jagged

__all__ = [
    "CAND_ITEM",
    "EVENT_MEANS",
    "INITS",
    "ITEM_EMBEDDINGS",
    "LM_POSITIONS",
    "SEQ_ACTION_BIT",
    "ShardedUserTower",
    "TABLE_INITS",
    "UserTower",
    "UserTowerConfig",
    "UserTowerEncoder",
    "UserTowerSharder",
]

INITS: Tuple[str, ...] = ("pretrained", "scratch", "frozen")
ITEM_EMBEDDINGS: Tuple[str, ...] = ("id", "content")
#: how the LM places the sequence's tokens (``UserTowerConfig.lm_positions``)
LM_POSITIONS: Tuple[str, ...] = ("lm", "none")
#: where the user's mean event vector enters the tower (``UserTowerConfig.event_mean``)
EVENT_MEANS: Tuple[str, ...] = ("none", "output", "queries")
#: how the tower's EC tables start (``UserTowerConfig.table_init``)
TABLE_INITS: Tuple[str, ...] = ("torchrec", "lm")
CAND_ITEM = "cand_item_id"
"""Optional KJT key: candidate items per row, embedded by the item side."""
SEQ_ACTION_BIT = "seq_action_bit"
"""Derived KJT key: the set action bits of every event (see the module doc)."""
NUM_HOURS = 24
_DROPOUT_ATTRS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout",
                  "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop")


@dataclass
class UserTowerConfig:
    """Configuration of :class:`UserTower`.

    Attributes:
        model_path: local Hugging Face checkpoint of the user LM; ``None`` = the bundled
            MiniLM (:func:`torchrec_mm.content.encoder.default_model_path`, the item
            tower's default, so both towers start from the same LM).
        init: ``"pretrained"`` | ``"scratch"`` (same architecture, random init) |
            ``"frozen"`` (pretrained, LM not trained) — paper Table A3.
        num_items: rows of the item-ID table / of ``item_vectors``.
        num_scenarios: S; ``seq_scenario`` values are in ``[0, S)``.
        num_actions: action flags (bits of ``seq_actions``); 0 = no action embedding.
        last_n: N, the longest sequence; ``seq_pos`` values are in ``[0, N)``.
        num_gap_buckets: ``seq_gap_bucket`` values are in ``[0, num_gap_buckets)``
            (``MixConfig.num_gap_buckets``, 21 with the default edges).
        interests_per_scenario: queries per scenario; ``K = interests_per_scenario * S``.
        item_embedding: ``"id"`` (item-ID table) or ``"content"`` (item-tower vectors,
            projected: frozen ``item_vectors``, or with ``item_states`` an item tower
            whose top layers train jointly).
        item_states: directory of :func:`~torchrec_mm.redrec.item_tower.build_item_states`
            (content mode): the item tower is :class:`~torchrec_mm.redrec.item_tower.
            ItemTower` over it, trained with the user tower (paper appendix C).
        embedding_dim: d, the table width and the output width; 0 = the LM hidden size.
        dropout: overrides every dropout probability of the LM config (``0.0`` for
            deterministic training); ``None`` keeps the checkpoint's values.
        item_dropout: the same for the item tower's layers (``item_states``); default
            ``0.0``: the ``[EMB]`` states of different items are close (MiniLM: mean
            cosine ~0.8 between random items), and the checkpoint's dropout (0.1) moves
            one item's state by about as much (cosine 0.95 between two passes), so the
            retrieval loss would train on noise that evaluation does not have.
        item_init: how the item tower's trained layers start (``item_states``):
            ``"pretrained"`` or ``"scratch"`` (same architecture, random init).
        lm_positions: ``"lm"``: the LM adds its own position encoding (MiniLM's
            absolute positions, RoPE) to the sequence, on top of ``PE_seq``/``PE_gap``;
            ``"none"``: every token is at LM position 0, so the sequence's order reaches
            the LM only through ``PE_seq`` and ``PE_gap`` (and the 1-D policies of
            :mod:`~torchrec_mm.redrec.sequences` really drop one axis).
        event_mean: where the user's mean event vector ``m = mean_j x_j`` (``0`` for a
            user without events) enters, besides the LM's attention: ``"none"`` (the
            paper's tower), ``"output"`` (a path around the LM: ``u_k = norm(W_o h_k +
            b_o + W_s m)``) or ``"queries"`` (every query token starts from the user's
            mean event: its LM input is ``q_k + input_proj(m)`` instead of ``q_k``). Not
            in the paper: on the generated logs the trained 2-layer LM passed almost
            nothing of the events to the queries (mean cosine 0.99+ between users'
            interests), while a tower made of the mean alone learned personal
            interests (``plugins/redrec-mixing-sparse.yaml`` has the runs).
        table_init: how the EC tables (item ids, actions, hours, scenarios, positions,
            gap buckets) start: ``"torchrec"`` (default): TorchRec's uniform in
            ``±1/sqrt(rows)``, which scales with the table's size (on ``data synth``
            defaults, d = 64, the 3-row scenario table starts at an rms norm of 2.7,
            the action bits at 2.2, a 5000-row item table at 0.07, the projected
            content vectors at ~1.1); ``"lm"``: ``N(0, initializer_range^2)``, as the
            LM initialises its own token and position embeddings (BERT: std 0.02), so
            every table adds a small term and none drowns the others. Measured, not
            the default: higher HR@10 / HR@100 on MovieLens 100K, lower HR@100 /
            HR@1000 on the 8000-user generated log (README, RED-Rec).
        table_prefix: prefix of the table names (unique within a model).
        trust_remote_code: passed to transformers.
    """

    model_path: Optional[str] = None
    init: str = "pretrained"
    num_items: int = 0
    num_scenarios: int = 1
    num_actions: int = 0
    last_n: int = 128
    num_gap_buckets: int = 21
    interests_per_scenario: int = 3
    item_embedding: str = "id"
    item_states: Optional[str] = None
    embedding_dim: int = 0
    dropout: Optional[float] = None
    item_dropout: Optional[float] = 0.0
    item_init: str = "pretrained"
    lm_positions: str = "lm"
    event_mean: str = "none"
    table_init: str = "torchrec"
    table_prefix: str = "t_redrec"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.item_embedding not in ITEM_EMBEDDINGS:
            raise ValueError(f"item_embedding must be one of {ITEM_EMBEDDINGS}, "
                             f"got {self.item_embedding!r}")
        for name in ("num_items", "num_scenarios", "last_n", "num_gap_buckets",
                     "interests_per_scenario"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.num_actions <= 63:
            raise ValueError(f"num_actions must be in [0, 63], got {self.num_actions}")
        if self.embedding_dim < 0:
            raise ValueError(f"embedding_dim must be >= 0, got {self.embedding_dim}")
        for name in ("dropout", "item_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.item_states and self.item_embedding != "content":
            raise ValueError("item_states is the item side of item_embedding='content'")
        if self.item_init not in ITEM_INITS:
            raise ValueError(f"item_init must be one of {ITEM_INITS}, got {self.item_init!r}")
        if self.item_init != "pretrained" and not self.item_states:
            raise ValueError(f"item_init={self.item_init!r} needs item_states (the trained "
                             "item tower)")
        if self.lm_positions not in LM_POSITIONS:
            raise ValueError(f"lm_positions must be one of {LM_POSITIONS}, got "
                             f"{self.lm_positions!r}")
        if self.event_mean not in EVENT_MEANS:
            raise ValueError(f"event_mean must be one of {EVENT_MEANS}, got "
                             f"{self.event_mean!r}")
        if self.table_init not in TABLE_INITS:
            raise ValueError(f"table_init must be one of {TABLE_INITS}, got "
                             f"{self.table_init!r}")

    @property
    def num_interests(self) -> int:
        """K = interests_per_scenario * num_scenarios."""
        return self.interests_per_scenario * self.num_scenarios

    def resolved_model_path(self) -> str:
        if self.model_path:
            return self.model_path
        from torchrec_mm.content.encoder import default_model_path

        return default_model_path()


# --------------------------------------------------------------------------- LM loading


def load_lm(path: str, init: str = "pretrained", dropout: Optional[float] = None,
            trust_remote_code: bool = False) -> nn.Module:
    """The base transformer (``AutoModel``) of the local checkpoint ``path`` as ``init``
    says (``"pretrained"`` / ``"scratch"``: same architecture, random weights /
    ``"frozen"``), with ``dropout`` overriding every dropout probability, its
    token-embedding matrix replaced by a frozen placeholder (inputs are embeddings) and
    a pooler removed (both would be parameters without gradients, which DDP rejects)."""
    from transformers import AutoConfig, AutoModel

    from torchrec_mm.content.encoder import _quiet_transformers

    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    with _quiet_transformers():
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code,
                                               local_files_only=True)
        if dropout is not None:
            for attr in _DROPOUT_ATTRS:
                if isinstance(getattr(hf_config, attr, None), float):
                    setattr(hf_config, attr, float(dropout))
        if init == "scratch":
            lm = AutoModel.from_config(hf_config, trust_remote_code=trust_remote_code)
        else:
            lm = AutoModel.from_pretrained(path, config=hf_config, dtype=torch.float32,
                                           trust_remote_code=trust_remote_code,
                                           local_files_only=True)
    lm = lm.float()
    if getattr(lm, "pooler", None) is not None:
        lm.pooler = None
    hidden = int(hf_config.get_text_config().hidden_size)
    try:
        placeholder = nn.Embedding(1, hidden)
        placeholder.weight.requires_grad_(False)
        lm.set_input_embeddings(placeholder)
    except NotImplementedError:
        lm.get_input_embeddings().weight.requires_grad_(False)
    if init == "frozen":
        lm.requires_grad_(False)
    return lm


def load_user_lm(cfg: UserTowerConfig) -> nn.Module:
    """:func:`load_lm` of ``cfg.model_path`` (default: the bundled MiniLM) as
    ``cfg.init`` says."""
    return load_lm(cfg.resolved_model_path(), cfg.init, cfg.dropout, cfg.trust_remote_code)


def keep_layers(lm: nn.Module, layers: int, keep: str = "top") -> nn.Module:
    """Keeps ``layers`` transformer layers of ``lm`` (in place; returned): the last ones
    (``keep="top"``) or the first (``"bottom"``); its config is updated to match, so
    ``save_pretrained`` writes a loadable checkpoint."""
    if keep not in ("top", "bottom"):
        raise ValueError(f"keep must be 'top' or 'bottom', got {keep!r}")
    text_cfg = lm.config.get_text_config()
    total = int(text_cfg.num_hidden_layers)
    if not 1 <= layers <= total:
        raise ValueError(f"layers must be in [1, {total}], got {layers}")
    name, stack = named_layer_stack(lm)
    kept = list(stack)[total - layers:] if keep == "top" else list(stack)[:layers]
    parent_name, _, attr = name.rpartition(".")
    setattr(lm.get_submodule(parent_name) if parent_name else lm, attr, nn.ModuleList(kept))
    text_cfg.num_hidden_layers = int(layers)
    types = getattr(text_cfg, "layer_types", None)
    if isinstance(types, list) and len(types) == total:
        text_cfg.layer_types = types[total - layers:] if keep == "top" else types[:layers]
    return lm


# --------------------------------------------------------------------------- dense part


class UserTowerEncoder(nn.Module):
    """The dense part of the tower: input projection, LM, queries, output projection
    (and, in content mode, the item side with its projection: frozen item vectors or
    the trainable item tower). Replicated (DDP) under DMP.

    Args:
        cfg: the tower config.
        lm: the transformer from :func:`load_user_lm`.
        item_vectors: ``[num_items, D_c]`` frozen item vectors (content mode only).
        item_tower: the trainable item tower (content mode, instead of
            ``item_vectors``).
    """

    def __init__(self, cfg: UserTowerConfig, lm: nn.Module,
                 item_vectors: Optional[torch.Tensor] = None,
                 item_tower: Optional[nn.Module] = None) -> None:
        super().__init__()
        text_cfg = lm.config.get_text_config()
        self.hidden_size = int(text_cfg.hidden_size)
        self.dim = cfg.embedding_dim or self.hidden_size
        self.num_interests = cfg.num_interests
        self.lm_positions = cfg.lm_positions
        if self.lm_positions == "none" and "position_ids" not in inspect.signature(
                lm.forward).parameters:
            raise ValueError(f"lm_positions='none': {type(lm).__name__}.forward takes no "
                             "position_ids; use lm_positions='lm' with this LM")
        self.init_range = float(getattr(text_cfg, "initializer_range", 0.02))
        max_pos = getattr(text_cfg, "max_position_embeddings", None)
        if max_pos is not None and cfg.last_n + cfg.num_interests > int(max_pos):
            raise ValueError(f"last_n + K = {cfg.last_n} + {cfg.num_interests} exceeds the "
                             f"LM's max_position_embeddings {max_pos}")
        self.lm = lm
        self.input_proj: nn.Module = (nn.Identity() if self.dim == self.hidden_size
                                      else nn.Linear(self.dim, self.hidden_size))
        self.queries = nn.Parameter(torch.empty(self.num_interests, self.hidden_size))
        self.output_proj = nn.Linear(self.hidden_size, self.dim)
        self.event_mean = cfg.event_mean
        # no bias: output_proj has one
        self.skip_proj: Optional[nn.Linear] = (nn.Linear(self.dim, self.dim, bias=False)
                                               if cfg.event_mean == "output" else None)
        self.item_proj: Optional[nn.Linear] = None
        self.item_tower = item_tower
        if item_tower is not None:
            if cfg.item_embedding != "content" or item_vectors is not None:
                raise ValueError("item_tower: only with item_embedding='content' and "
                                 "without item_vectors")
            if int(item_tower.num_items) != cfg.num_items:
                raise ValueError(f"item_tower: made for {item_tower.num_items} items, the "
                                 f"tower has num_items={cfg.num_items}")
            self.item_proj = nn.Linear(int(item_tower.hidden_size), self.dim)
        elif cfg.item_embedding == "content":
            if item_vectors is None:
                raise ValueError("item_embedding='content' needs item_vectors "
                                 "[num_items, D_c]")
            if item_vectors.dim() != 2 or item_vectors.shape[0] != cfg.num_items:
                raise ValueError(f"item_vectors: expected [num_items={cfg.num_items}, D_c], "
                                 f"got {tuple(item_vectors.shape)}")
            if not bool(torch.isfinite(item_vectors).all()):
                raise ValueError("item_vectors: contains NaN/Inf")
            self.register_buffer("item_vectors", item_vectors.detach().float().clone())
            self.item_proj = nn.Linear(item_vectors.shape[1], self.dim)
        elif item_vectors is not None:
            raise ValueError("item_vectors given but item_embedding='id'")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialises the queries and projections (not the LM)."""
        with torch.no_grad():
            nn.init.normal_(self.queries, std=self.init_range)
        for m in (self.input_proj, self.output_proj, self.skip_proj, self.item_proj):
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    def content_items(self, ids: torch.Tensor) -> torch.Tensor:
        """``[n]`` item ids -> ``[n, d]`` projected item vectors (content mode); the item
        tower runs once per distinct id."""
        assert self.item_proj is not None
        if self.item_tower is None:
            return self.item_proj(self.item_vectors[ids])
        uniq, inverse = torch.unique(ids, return_inverse=True)
        return self.item_proj(self.item_tower(uniq).to(self.queries.dtype))[inverse]

    def encode(self, events: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Runs the LM over ``[events; Q]`` per user.

        Args:
            events: ``[B, T, d]`` event vectors, left-aligned; positions ``>= lengths[b]``
                are padding and may hold anything.
            lengths: ``[B]`` valid events per user (``<= T``).

        Returns:
            ``[B, K, d]`` l2-normalised interest vectors (with the ``event_mean`` term
            where configured).
        """
        B, T, _ = events.shape
        K, H = self.num_interests, self.hidden_size
        lengths = lengths.to(torch.long)
        x = self.input_proj(events)
        x = torch.cat([x, x.new_zeros(B, K, H)], 1)
        q_pos = lengths[:, None] + torch.arange(K, device=x.device)[None, :]      # [B, K]
        rows = torch.arange(B, device=x.device)[:, None].expand(B, K)
        queries = self.queries.to(x.dtype).expand(B, K, H)
        mean: Optional[torch.Tensor] = None
        if self.event_mean != "none":  # [B, d], zero without events
            valid = torch.arange(T, device=x.device)[None, :] < lengths[:, None]
            mean = jagged.segment_mean(events[valid], lengths)
        if self.event_mean == "queries":
            assert mean is not None
            start = torch.where((lengths > 0)[:, None], self.input_proj(mean),
                                mean.new_zeros(()))                            # [B, H]
            queries = queries + start[:, None, :]
        x = x.index_put((rows, q_pos), queries)
        mask = (torch.arange(T + K, device=x.device)[None, :] < (lengths + K)[:, None])
        positions = (torch.zeros(B, T + K, dtype=torch.long, device=x.device)
                     if self.lm_positions == "none" else None)
        h = forward_at(self.lm, x, mask, rows, q_pos, position_ids=positions)   # [B, K, H]
        out = self.output_proj(h)                                                # [B, K, d]
        if self.skip_proj is not None:
            assert mean is not None
            out = out + self.skip_proj(mean)[:, None, :]
        return F.normalize(out, dim=-1)


# --------------------------------------------------------------------------- the tower


def table_configs(cfg: UserTowerConfig, dim: int, init_std: float = 0.02
                  ) -> List[EmbeddingConfig]:
    """The tower's EC tables (module doc); with ``cfg.table_init == "lm"`` each starts
    from ``N(0, init_std^2)`` (the LM's ``initializer_range``)."""
    p = cfg.table_prefix
    init: Dict[str, Any] = ({"init_fn": partial(nn.init.normal_, mean=0.0,
                                                std=float(init_std))}
                            if cfg.table_init == "lm" else {})
    specs: List[Tuple[str, int, List[str]]] = []
    if cfg.item_embedding == "id":
        specs.append(("item", cfg.num_items, [SEQ_ITEM, CAND_ITEM]))
    specs += [("scenario", cfg.num_scenarios, [SEQ_SCENARIO]),
              ("hour", NUM_HOURS, [SEQ_HOUR]),
              ("pos", cfg.last_n, [SEQ_POS]),
              ("gap", cfg.num_gap_buckets, [SEQ_GAP])]
    if cfg.num_actions:
        specs.append(("action", cfg.num_actions, [SEQ_ACTION_BIT]))
    return [EmbeddingConfig(name=f"{p}_{name}", embedding_dim=dim, num_embeddings=rows,
                            feature_names=features, **init)
            for name, rows, features in specs]


def _check_range(name: str, values: torch.Tensor, high: int) -> None:
    if values.numel() == 0:
        return
    bad = (values < 0) | (values >= high)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"feature {name!r}: value {int(values[i])} at position {i} of its "
                         f"jagged values is out of range [0, {high})")


@dataclass
class _Prepared:
    kjt: KeyedJaggedTensor                  # the EC's input
    lengths: torch.Tensor                   # [B] events per user
    event_of_bit: Optional[torch.Tensor]    # [n_bits] event index of each set action bit
    num_events: int
    content_events: Optional[torch.Tensor]  # [n, d] content mode
    content_cands: Optional[torch.Tensor]   # [n_c, d] content mode
    cand_lengths: Optional[torch.Tensor]    # [B] or None without candidates


def _prepare(cfg: UserTowerConfig, encoder: UserTowerEncoder,
             features: KeyedJaggedTensor) -> _Prepared:
    """Validates the sequence features, derives ``seq_action_bit`` and (content mode)
    looks up the frozen item vectors by raw id: everything that needs the rank's raw
    batch, before any input dist."""
    d = features.to_dict()
    required = [SEQ_ITEM, SEQ_SCENARIO, SEQ_HOUR, SEQ_POS, SEQ_GAP] + (
        [SEQ_ACTIONS] if cfg.num_actions else [])
    missing = [k for k in required if k not in d]
    if missing:
        raise KeyError(f"UserTower: features lack the sequence keys {missing} "
                       f"(got {features.keys()}); build them with MixedSequences.to_kjt()")
    lengths = d[SEQ_ITEM].lengths().to(torch.long)
    for k in required[1:]:
        if not torch.equal(d[k].lengths().to(torch.long), lengths):
            raise ValueError(f"feature {k!r}: per-user lengths differ from {SEQ_ITEM!r}; "
                             "all sequence features must describe the same events")
    if lengths.numel() and int(lengths.max()) > cfg.last_n:
        raise ValueError(f"feature {SEQ_ITEM!r}: a user has {int(lengths.max())} events, "
                         f"more than last_n={cfg.last_n}")
    items = d[SEQ_ITEM].values().to(torch.long)
    _check_range(SEQ_ITEM, items, cfg.num_items)
    _check_range(SEQ_SCENARIO, d[SEQ_SCENARIO].values(), cfg.num_scenarios)
    _check_range(SEQ_HOUR, d[SEQ_HOUR].values(), NUM_HOURS)
    _check_range(SEQ_POS, d[SEQ_POS].values(), cfg.last_n)
    _check_range(SEQ_GAP, d[SEQ_GAP].values(), cfg.num_gap_buckets)
    B, n = lengths.shape[0], items.shape[0]
    cand = d.get(CAND_ITEM)
    if cand is not None:
        cand_ids = cand.values().to(torch.long)
        cand_lengths = cand.lengths().to(torch.long)
        _check_range(CAND_ITEM, cand_ids, cfg.num_items)
    else:
        cand_ids = items.new_zeros(0)
        cand_lengths = None

    keys: List[str] = []
    values: List[torch.Tensor] = []
    lens: List[torch.Tensor] = []
    if cfg.item_embedding == "id":
        keys += [SEQ_ITEM, CAND_ITEM]
        values += [items, cand_ids]
        lens += [lengths, cand_lengths if cand_lengths is not None else lengths.new_zeros(B)]
    for k in (SEQ_SCENARIO, SEQ_HOUR, SEQ_POS, SEQ_GAP):
        keys.append(k)
        values.append(d[k].values().to(torch.long))
        lens.append(lengths)
    event_of_bit = None
    if cfg.num_actions:
        masks = d[SEQ_ACTIONS].values().to(torch.long)
        if masks.numel() and bool(((masks < 0) | (masks >> cfg.num_actions != 0)).any()):
            i = int(((masks < 0) | (masks >> cfg.num_actions != 0)).nonzero()[0, 0])
            raise ValueError(f"feature {SEQ_ACTIONS!r}: bit mask {int(masks[i])} at position "
                             f"{i} has bits beyond num_actions={cfg.num_actions}")
        dev = masks.device
        bits = (masks[:, None] >> torch.arange(cfg.num_actions, device=dev)[None, :]) & 1
        event_of_bit, bit = bits.nonzero(as_tuple=True)         # [n, A] -> event-major
        user_of_event = torch.repeat_interleave(torch.arange(B, device=dev), lengths)
        bit_lengths = torch.zeros(B, dtype=torch.long, device=dev).index_add_(
            0, user_of_event, bits.sum(1))
        keys.append(SEQ_ACTION_BIT)
        values.append(bit)
        lens.append(bit_lengths)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.cat(values), lengths=torch.cat(lens).to(torch.int32))
    content_events = content_cands = None
    if cfg.item_embedding == "content":  # one call: each distinct item encoded once
        content = encoder.content_items(torch.cat([items, cand_ids]))
        content_events, content_cands = content[:n], content[n:]
    return _Prepared(kjt, lengths, event_of_bit, n, content_events, content_cands,
                     cand_lengths)


def _finish(encoder: UserTowerEncoder, prep: _Prepared,
            emb: Dict[str, JaggedTensor]) -> Tuple[torch.Tensor, Optional[JaggedTensor]]:
    """EC lookups -> event vectors -> ``[B, K, d]`` interests (+ candidate vectors)."""
    x = emb[SEQ_SCENARIO].values() + emb[SEQ_HOUR].values() + emb[SEQ_POS].values() + \
        emb[SEQ_GAP].values()
    if prep.content_events is not None:
        x = x + prep.content_events
        cands = prep.content_cands
    else:
        x = x + emb[SEQ_ITEM].values()
        cands = emb[CAND_ITEM].values()
    if prep.event_of_bit is not None:
        x = x.index_add(0, prep.event_of_bit, emb[SEQ_ACTION_BIT].values())
    lengths = prep.lengths
    B = lengths.shape[0]
    T = int(lengths.max()) if B else 0
    rows = torch.repeat_interleave(torch.arange(B, device=x.device), lengths)
    offsets = torch.cumsum(lengths, 0) - lengths
    cols = torch.arange(prep.num_events, device=x.device) - offsets[rows]
    events = x.new_zeros(B, T, x.shape[1]).index_put((rows, cols), x)
    interests = encoder.encode(events, lengths)
    items = None
    if prep.cand_lengths is not None:
        assert cands is not None
        items = JaggedTensor(values=F.normalize(cands, dim=-1), lengths=prep.cand_lengths)
    return interests, items


class UserTower(nn.Module):
    """The RED-Rec user tower (module doc): sequence features -> K interest vectors.

    Args:
        config: :class:`UserTowerConfig`.
        item_vectors: ``[num_items, D_c]`` frozen item-tower vectors (content mode
            without ``config.item_states``).
        device: where the EC tables are built (``"meta"`` for DMP to materialise).

    Children: ``embeddings`` (the :class:`EmbeddingCollection`) and ``encoder``
    (:class:`UserTowerEncoder`).

    Example::

        tower = UserTower(UserTowerConfig(model_path=path, num_items=100, num_scenarios=3))
        interests = tower(seq.to_kjt())    # [B, 9, d]
    """

    def __init__(self, config: UserTowerConfig, item_vectors: Optional[torch.Tensor] = None,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.config = dataclasses.replace(config)
        lm = load_user_lm(self.config)
        item_tower = None
        if self.config.item_states:
            item_tower = ItemTower(self.config.item_states, init=self.config.item_init,
                                   dropout=self.config.item_dropout)
        self.encoder = UserTowerEncoder(self.config, lm, item_vectors, item_tower)
        self.embeddings = EmbeddingCollection(
            tables=table_configs(self.config, self.encoder.dim, self.encoder.init_range),
            device=device)

    @property
    def num_interests(self) -> int:
        return self.encoder.num_interests

    @property
    def dim(self) -> int:
        """d, the width of interests and item vectors."""
        return self.encoder.dim

    def forward_with_items(self, features: KeyedJaggedTensor
                           ) -> Tuple[torch.Tensor, Optional[JaggedTensor]]:
        """Interests and candidate item vectors.

        Args:
            features: ``seq_item_id, seq_scenario, seq_hour, seq_pos, seq_gap_bucket``
                (and ``seq_actions`` when ``num_actions > 0``), all with the same
                per-user lengths (:meth:`MixedSequences.to_kjt`); optionally
                ``cand_item_id`` (any number of items per user). Other keys are ignored.

        Returns:
            ``([B, K, d] interests, candidates)``: candidates is a :class:`JaggedTensor`
            of ``[n_c, d]`` l2-normalised item vectors with the ``cand_item_id`` lengths,
            or ``None`` without that key.
        """
        prep = _prepare(self.config, self.encoder, features)
        return _finish(self.encoder, prep, self.embeddings(prep.kjt))

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Returns ``[B, K, d]`` l2-normalised interest vectors (see
        :meth:`forward_with_items` for the features)."""
        return self.forward_with_items(features)[0]


# --------------------------------------------------------------------------- sharding


@dataclass
class UserTowerContext(EmbeddingCollectionContext):
    """EC sharding context + the tower's pre-input-dist results."""

    prepared: Optional[_Prepared] = None


def _finish_callback(encoder: UserTowerEncoder, prep: _Prepared,
                     emb: Dict[str, JaggedTensor]
                     ) -> Tuple[torch.Tensor, Optional[JaggedTensor]]:
    return _finish(encoder, prep, emb)


class ShardedUserTower(
    ShardedModule[KJTList, List[torch.Tensor],
                  Tuple[torch.Tensor, Optional[JaggedTensor]], UserTowerContext],
    FusedOptimizerModule,
):
    """:class:`UserTower` under DMP: a sharded EC + the replicated dense encoder.

    ``forward``/``forward_with_items`` return the same values as the unsharded tower on
    this rank's batch (plain tensors, not awaitables).
    """

    def __init__(self, module: UserTower, table_name_to_parameter_sharding:
                 Dict[str, ParameterSharding], ec_sharder: EmbeddingCollectionSharder,
                 env: ShardingEnv, device: torch.device,
                 module_fqn: Optional[str] = None) -> None:
        super().__init__(qcomm_codecs_registry=ec_sharder.qcomm_codecs_registry)
        self.config = module.config
        self.embeddings: ShardedEmbeddingCollection = ec_sharder.shard(
            module.embeddings, table_name_to_parameter_sharding, env=env, device=device,
            module_fqn=append_prefix(module_fqn or "", "embeddings"))
        self.encoder = module.encoder.to(device)

    @property
    def num_interests(self) -> int:
        return self.encoder.num_interests

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def create_context(self) -> UserTowerContext:
        return UserTowerContext()

    def input_dist(self, ctx: UserTowerContext, features: KeyedJaggedTensor
                   ) -> Awaitable[Awaitable[KJTList]]:
        ctx.prepared = _prepare(self.config, self.encoder, features)
        return self.embeddings.input_dist(ctx, ctx.prepared.kjt)

    def compute(self, ctx: UserTowerContext, dist_input: KJTList) -> List[torch.Tensor]:
        return self.embeddings.compute(ctx, dist_input)

    def _with_dense(self, ctx: UserTowerContext, aw: LazyAwaitable
                    ) -> LazyAwaitable[Tuple[torch.Tensor, Optional[JaggedTensor]]]:
        assert ctx.prepared is not None
        aw.callbacks.append(partial(_finish_callback, self.encoder, ctx.prepared))
        return aw

    def output_dist(self, ctx: UserTowerContext, output: List[torch.Tensor]
                    ) -> LazyAwaitable[Tuple[torch.Tensor, Optional[JaggedTensor]]]:
        return self._with_dense(ctx, self.embeddings.output_dist(ctx, output))

    def compute_and_output_dist(self, ctx: UserTowerContext, input: KJTList
                                ) -> LazyAwaitable[Tuple[torch.Tensor, Optional[JaggedTensor]]]:
        return self._with_dense(ctx, self.embeddings.compute_and_output_dist(ctx, input))

    def forward_with_items(self, features: KeyedJaggedTensor
                           ) -> Tuple[torch.Tensor, Optional[JaggedTensor]]:
        """As :meth:`UserTower.forward_with_items`."""
        ctx = self.create_context()
        dist_input = self.input_dist(ctx, features).wait().wait()
        return self.compute_and_output_dist(ctx, dist_input).wait()

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:  # type: ignore[override]
        """``[B, K, d]`` interests of this rank's batch."""
        return self.forward_with_items(features)[0]

    @property
    def fused_optimizer(self) -> KeyedOptimizer:
        return self.embeddings.fused_optimizer

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        for name, _ in self.embeddings.named_parameters():
            yield append_prefix(prefix, append_prefix("embeddings", name))

    @property
    def unsharded_module_type(self) -> Type[UserTower]:
        return UserTower


class UserTowerSharder(BaseEmbeddingSharder[UserTower]):
    """Shards :class:`UserTower` (tables by the plan through ``ec_sharder``; the encoder
    replicated).

    Args:
        ec_sharder: the sharder of the child EC; default: the project's CPU EC sharder
            (table-wise, column-wise, row-wise) on CPU, TorchRec's otherwise.
        device_type: ``"cpu"`` or ``"cuda"`` (chooses the default ``ec_sharder``).
    """

    def __init__(self, ec_sharder: Optional[EmbeddingCollectionSharder] = None,
                 device_type: str = "cpu",
                 qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None
                 ) -> None:
        super().__init__(qcomm_codecs_registry=qcomm_codecs_registry)
        if ec_sharder is None:
            if device_type == "cpu":
                from torchrec_mm.training.sharding import CPUEmbeddingCollectionSharder

                ec_sharder = CPUEmbeddingCollectionSharder(
                    qcomm_codecs_registry=qcomm_codecs_registry)
            else:
                ec_sharder = EmbeddingCollectionSharder(
                    qcomm_codecs_registry=qcomm_codecs_registry)
        self._ec_sharder = ec_sharder

    def shard(self, module: UserTower, params: Dict[str, ParameterSharding],
              env: ShardingEnv, device: Optional[torch.device] = None,
              module_fqn: Optional[str] = None) -> ShardedUserTower:
        return ShardedUserTower(module, params, self._ec_sharder, env,
                                device or torch.device("cpu"), module_fqn)

    @property
    def fused_params(self) -> Optional[Dict[str, Any]]:
        return self._ec_sharder.fused_params

    def shardable_parameters(self, module: UserTower) -> Dict[str, nn.Parameter]:
        return self._ec_sharder.shardable_parameters(module.embeddings)

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return self._ec_sharder.sharding_types(compute_device_type)

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        return self._ec_sharder.compute_kernels(sharding_type, compute_device_type)

    @property
    def module_type(self) -> Type[UserTower]:
        return UserTower
