"""IDProxy stage 2 (fine proxies) and the injection of proxies into the item-ID slots.

Paper ``000_ab5ad86b392685c5`` §3.2. Stage 1 (``torchrec-mm idproxy fit``) leaves, per
item, a coarse proxy ``p_coarse`` [d] aligned to the ranker's ID embeddings and the
pooled hidden states of the encoder's G layer groups ``z_groups`` [G, D]
(``torchrec_mm.idproxy.artifacts``). Stage 2 trains, jointly with the ranker under the
CTR loss, a light adaptor on those frozen states (:class:`FineProxy`)::

    p_raw_fine = φ̃(concat(z_1, ..., z_G))            MLP  G*D -> hidden -> d
    r          = σ(W_g [p_coarse, p_raw_fine])        gate, [d]
    p_fine     = W_c p_coarse + r ⊙ p_raw_fine        W_c initialised to the identity

and the proxies go into the item-ID slots of an unmodified ranker — the target item and
every history item — through modules that *hold* the ranker's EBC/EC (never subclass
them: DMP picks sharders by exact type) and return the same keys:

* :class:`IDProxyEmbeddingCollection` wraps the target-attention ranker's
  ``EmbeddingCollection`` (sequence table ``t_item_id``);
* :class:`IDProxyEmbeddingBagCollection` wraps DLRM's / DLRM_DCN's
  ``EmbeddingBagCollection`` (pooled ``t_item_id``, MEAN over the history).

Modes (:class:`IDProxyConfig`):

``augment`` (the paper's setting)
    ID embedding and proxies side by side. Sequence table: each item's value becomes
    ``concat(e_id, p_coarse, p_fine)`` [3d] (``[2d]`` without the fine proxy) and
    ``embedding_configs()`` reports that dim so the ranker sizes its attention for it.
    Pooled table: extra keys ``item_id_coarse``, ``item_id_fine``,
    ``hist_item_id_coarse``, ``hist_item_id_fine`` [B, d] (history = mean of the
    per-item proxies, zero when empty), listed by ``embedding_bag_configs()``.
``feature`` ("without structure reuse")
    The same coarse/fine proxies as ordinary pooled features (the extra keys of
    ``augment``'s pooled table) appended to the ranker's EBC output, while the
    item-ID slots (the sequence table the target attention reads) stay ID-only. For
    DLRM/DLRM_DCN, whose only item slots *are* pooled features, it equals ``augment``.
    With ``feature_parts="fine"`` only the fine proxy's keys: stacked after a
    ``use_fine=False`` augment wrapper (coarse proxy in the ID slots, as v3) this is
    Table 1's v4, stage 1 + 2 where stage 2 does not reuse the ranker's structure.
``swap``
    The proxy (``p_fine``, or ``p_coarse`` with ``use_fine=False``) takes the place of
    the ID embedding, same keys and dims.
``cold_only``
    The proxy replaces the ID embedding only for *cold* items (training impressions
    below a threshold, given as a ``cold`` mask), as at serving time; warm items keep
    their ID embedding.

The frozen per-item inputs of the proxies (``p_coarse`` and the adaptor's layer-group
states) live in one embedding table, ``t_idproxy_inputs`` (:class:`ProxyInputs`, an
``EmbeddingCollection`` child), so ``DistributedModelParallel`` shards them with the
planner like the ID tables rather than replicating them on every rank; each call looks
up only the distinct items it needs, detached (frozen: no gradient, no optimizer state).
Stored fine proxies (``fine_run``) in a pooled wrapper (DLRM, mode augment / feature)
are instead one frozen, MEAN-pooled table ``t_idproxy_stored`` of an
``EmbeddingBagCollection`` (:class:`StoredProxyBags`) over ``concat(p_coarse, p_fine)``:
the slots need only the target's row and the history's mean, which one pooled lookup
of the item and history features gives.
With ``history_refresh`` the history's ``concat(p_coarse, p_fine)`` is a frozen table
too, ``t_idproxy_history``, that the adaptor rewrites every k training steps (each
rank the rows of its own shards) while the target items' proxies are computed live:
in a pooled wrapper it is the second table of the EBC that holds the proxies' inputs
(:class:`CachedProxyBags`), so one pooled lookup serves the target's inputs and the
history's mean; in the sequence wrapper it is a second :class:`ProxyInputs` table.

Fallback for items without content (``has_content`` False): wherever the proxy would
*replace* an ID embedding (``swap``, ``cold_only``), such an item keeps its ID
embedding; in ``augment`` its proxy slots are zero (the ID slot carries it). A proxy
is never computed from missing content.

Pooled history with per-item choices (``swap``/``cold_only``): a MEAN-pooled EBC does
not expose per-item embeddings, so the wrapper removes the items that take a proxy
from the history *before* the EBC lookup (a KJT filter on values/lengths) and combines
the EBC's mean over the kept items with the proxies of the removed ones::

    hist = (n_kept * mean_EBC(kept ids) + sum_{proxied} proxy_i) / max(L, 1)

which is exactly the mean over items of (ID embedding if kept else proxy). The cost:
the EBC's input is then computed by the wrapper, so ``TrainPipelineSparseDist``
cannot prefetch that EBC's input dist (it runs, unpipelined). ``augment`` leaves the
EBC's input untouched.
"""

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from torchrec_mm.utils import jagged
from torchrec_mm.idproxy.artifacts import Proxies, group_basis

MODES = ("augment", "feature", "swap", "cold_only")
FEATURE_PARTS = ("coarse_fine", "fine")


@dataclass
class IDProxyConfig:
    """How proxies enter the ranker.

    Attributes:
        mode: ``augment`` (ID + p_coarse + p_fine, the paper's setting), ``feature``
            (the proxies as ordinary pooled features of the target and the history,
            outside the ID slots, "without structure reuse"), ``swap``
            (proxy instead of the ID embedding) or ``cold_only`` (proxy instead of the ID
            embedding for cold items only).
        use_fine: use the stage-2 fine proxy (else only ``p_coarse``: stage 1 alone).
        feature_parts: mode ``feature`` only: ``coarse_fine`` (both proxies as
            features) or ``fine`` (only p_fine; stack it after a ``use_fine: false``
            augment plugin for the paper's v4 "Stage 1 + 2 w/o structure reuse": stage 1
            in the ID slots as in v3, stage 2 as ordinary features).
        item_feature / history_feature: KJT keys of the target item and the history,
            both served by the item table.
        cold_threshold: items with fewer training impressions than this are cold
            (the plugin turns counts into the ``cold`` mask given to the wrappers).
        hidden_dim: hidden size of the adaptor φ̃.
        z_rank: principal components per layer group read by φ̃ (0: the full states;
            see :class:`FineProxy`).
        fallback: what an item without content gets where a proxy would replace its ID
            embedding; only ``id_embedding`` (keep the ID embedding) is supported.
        fine_run: a ranker run trained with this plugin and ``use_fine``: its trained
            adaptor computes p_fine once for every item, and the fine proxies are then a
            frozen table like p_coarse (the paper's deployment, §3.2.4: the adaptor is
            trained offline once, proxies are written to storage and the production
            ranker — continually trained — retrieves them by ID). None: the adaptor
            trains with the ranker (stage 2).
        store: read the proxies' inputs from this online item store at every call
            (:class:`StoreInputs`) instead of the artefact's table; an item not in the
            store has no content (the fallback). ``store_version``: only its records.
        history_grad: the fine proxies of the history items carry gradient into the
            adaptor (φ̃, W_g, W_c), as in the paper's joint stage 2. False (modes
            ``augment`` / ``feature`` with a trained fine proxy): the history items'
            p_fine is computed without gradient — the adaptor learns from the target
            items' p_fine alone, while the ranker still reads p_fine in every history
            slot — so the adaptor's backward runs over a batch's distinct *target*
            items instead of all its distinct items (most of them history items).
        history_refresh: k > 0 (with ``history_grad`` false): the history items'
            ``concat(p_coarse, p_fine)`` are read from a frozen table,
            ``t_idproxy_history``, that the adaptor rewrites for every item (the rows
            this rank holds) at the first forward and every k training forwards
            after, and before an evaluation that follows training — so the history
            slots read p_fine of an adaptor up to k - 1 steps old, while the target
            items' p_fine is computed live, with gradient, as with ``history_grad``
            false. The step then runs the adaptor over the batch's distinct *target*
            items only (a pooled ranker's: each sample's target, read with the
            history's mean in one pooled lookup, :class:`CachedProxyBags`); the
            rewrite costs one adaptor pass over the catalogue per k steps. Not in the
            paper (its stage 2 is joint): a speed option whose price is measured in
            the README. 0: the history's p_fine comes from the current adaptor at
            every step.
    """

    mode: str = "augment"
    use_fine: bool = True
    item_feature: str = "item_id"
    history_feature: str = "hist_item_id"
    cold_threshold: int = 5
    hidden_dim: int = 64
    z_rank: int = 32
    fallback: str = "id_embedding"
    store: Optional[str] = None
    store_version: Optional[str] = None
    feature_parts: str = "coarse_fine"
    fine_run: Optional[str] = None
    history_grad: bool = True
    history_refresh: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown idproxy mode '{self.mode}', expected one of {MODES}")
        if self.feature_parts not in FEATURE_PARTS:
            raise ValueError(f"unknown idproxy feature_parts '{self.feature_parts}', "
                             f"expected one of {FEATURE_PARTS}")
        if self.feature_parts == "fine" and (self.mode != "feature" or not self.use_fine):
            raise ValueError("idproxy feature_parts 'fine' needs mode 'feature' and "
                             f"use_fine true (got mode '{self.mode}', use_fine "
                             f"{self.use_fine})")
        if self.fallback != "id_embedding":
            raise ValueError(f"unknown idproxy fallback '{self.fallback}' "
                             "(supported: id_embedding)")
        if self.cold_threshold < 0:
            raise ValueError(f"cold_threshold must be >= 0, got {self.cold_threshold}")
        if self.fine_run and not self.use_fine:
            raise ValueError("idproxy fine_run (stored fine proxies) needs use_fine true")
        if self.fine_run and self.store:
            raise ValueError("idproxy fine_run and store cannot be combined: the store "
                             "holds the adaptor's inputs, fine_run fixes its outputs")
        if not self.history_grad and (not self.use_fine or self.fine_run
                                      or self.mode not in ("augment", "feature")):
            raise ValueError("idproxy history_grad false needs a trained fine proxy "
                             "(use_fine true, no fine_run) in mode 'augment' or 'feature' "
                             f"(got mode '{self.mode}', use_fine {self.use_fine}, "
                             f"fine_run {self.fine_run!r})")
        if self.history_refresh < 0:
            raise ValueError(f"history_refresh must be >= 0, got {self.history_refresh}")
        if self.history_refresh and (self.history_grad or self.store):
            raise ValueError("idproxy history_refresh (the history's proxies from a table "
                             "the adaptor rewrites) needs history_grad false and no store "
                             f"(got history_grad {self.history_grad}, store {self.store!r})")


@torch.fx.wrap
def _distinct_rows(ids: torch.Tensor, num_items: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """ids [n] -> (index [n], rows [u]) with ``rows[index] == ids``, ``rows`` the
    distinct ids, sorted. When n is not small against the catalogue (4n >= N) they are
    found with a mark table over the catalogue (O(n + N), no sort), else by a sort."""
    if ids.numel() * 4 >= num_items:
        mark = torch.zeros(num_items, dtype=torch.bool, device=ids.device)
        mark[ids] = True
        position = torch.cumsum(mark, 0) - 1
        return position[ids], mark.nonzero().squeeze(1)
    uniq, inverse = torch.unique(ids, return_inverse=True)
    return inverse, uniq


@torch.fx.wrap
def _gated_no_grad(fine: "FineProxy", pc: torch.Tensor, z_in: torch.Tensor) -> torch.Tensor:
    """``fine.gated(pc, z_in)`` [u, d] computed without autograd (a constant of the
    step; fx-wrapped so that a traced model keeps the no-grad block)."""
    with torch.no_grad():
        return fine.gated(pc, z_in)


@torch.fx.wrap
def _zero_absent(rows: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """rows [u, c] with the rows of absent items (``present`` [u] False) zeroed
    (returned as is when every item is present)."""
    if bool(present.all()):
        return rows
    return rows * present.unsqueeze(1).to(rows.dtype)


INPUT_TABLE = "t_idproxy_inputs"


@torch.fx.wrap
def _rows_kjt(rows: torch.Tensor, key: str) -> KeyedJaggedTensor:
    """rows [u] -> a KJT of one sample holding them under ``key`` (a frozen table's
    lookup)."""
    return KeyedJaggedTensor(keys=[key], values=rows.long(),
                             lengths=rows.new_full((1,), rows.numel(), dtype=torch.long))


@torch.fx.wrap
def _lookup_values(out: Dict[str, JaggedTensor], key: str) -> torch.Tensor:
    # detached: the table is frozen, and no gradient means no fused-optimizer update
    return out[key].values().detach()


def _padded(columns: int) -> int:
    """A table's embedding dim for ``columns`` values: a multiple of 4 (FBGEMM)."""
    return -(-columns // 4) * 4


def _frozen_weight(weight: torch.Tensor, columns: torch.Tensor,
                   present: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``weight`` [N, >= c] set to ``columns`` [N, c] (the padding columns zero) and
    frozen (no gradient, no optimizer state). With ``present`` ([N] bool, or True for
    all) column c holds it as 1 / 0 (see :func:`_split_presence`)."""
    with torch.no_grad():
        weight.zero_()
        weight[:, :columns.shape[1]].copy_(columns)
        if present is not None:
            weight[:, columns.shape[1]] = (1.0 if present is True
                                           else present.to(weight.dtype))
    return weight.requires_grad_(False)


def _split_presence(values: torch.Tensor, columns: int
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Looked-up rows of a table written with a presence column -> (values [.., c],
    present [..] bool)."""
    return values[:, :columns], values[:, columns] > 0.5


class ProxyInputs(nn.Module):
    """Frozen per-item vectors as one embedding table, so that
    ``DistributedModelParallel`` shards them with the planner (table ``t_idproxy_inputs``,
    an ``EmbeddingCollection`` child) instead of replicating them on every rank.

    Args:
        columns: [N, c] the vectors (copied; columns padded to a multiple of 4 for FBGEMM).
        present: [N] bool, items that have content (default all); stored as one more
            column of the table, so it is sharded with the vectors.
        name: the table's name (its feature: ``<name>_rows``).

    ``forward(rows [u]) -> (values [u, c], present [u] bool)``, detached: the table is
    frozen — its weight does not require grad (no optimizer state) and no gradient
    reaches a sharded lookup (no fused-optimizer update).
    """

    def __init__(self, columns: torch.Tensor, present: Optional[torch.Tensor] = None,
                 device: Optional[torch.device] = None, name: str = INPUT_TABLE) -> None:
        super().__init__()
        n, c = columns.shape
        self.columns = int(c)
        self.name = name
        self.feature = f"{name}_rows"
        # the table's random init is overwritten: do not consume the global RNG (the
        # rest of a seeded model initialises as it would without the table)
        with torch.random.fork_rng(devices=[]):
            self.table = EmbeddingCollection(tables=[EmbeddingConfig(
                name=name, embedding_dim=_padded(c + 1), num_embeddings=n,
                feature_names=[self.feature])], device=device)
        _frozen_weight(self.table.embeddings[name].weight, columns,
                       True if present is None else present)

    @property
    def weight(self) -> torch.Tensor:
        """[N, c] (unsharded module only)."""
        return self.table.embeddings[self.name].weight[:, :self.columns]

    def forward(self, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        values = _lookup_values(self.table(_rows_kjt(rows, self.feature)), self.feature)
        return _split_presence(values, self.columns)


STORED_TABLE = "t_idproxy_stored"
HISTORY_TABLE = "t_idproxy_history"


@torch.fx.wrap
def _item_kjt(keys: List[str], ids: List[torch.Tensor], lengths: List[torch.Tensor]
              ) -> KeyedJaggedTensor:
    """Per key its ids and lengths, as one KJT (the stored table's input)."""
    return KeyedJaggedTensor(keys=keys, values=torch.cat(ids).long(),
                             lengths=torch.cat(lengths).long())


@torch.fx.wrap
def _bag_values(kt: KeyedTensor, keys: List[str], width: int) -> List[torch.Tensor]:
    # detached: the table is frozen, and no gradient means no fused-optimizer update
    return [kt[k][:, :width].detach() for k in keys]


class StoredProxyBags(nn.Module):
    """Stored proxies (``fine_run``) for a pooled ranker: ``concat(p_coarse, p_fine)``
    [N, 2d] of every item as one frozen, MEAN-pooled table (``t_idproxy_stored``) of an
    ``EmbeddingBagCollection`` child serving the item and the history feature, so one
    pooled lookup (fbgemm TBE, sharded by the planner like the ID tables) gives the
    target's proxies and the history's mean — no distinct-item step, no gather.

    Args:
        columns: [N, c] the stored vectors, zero rows for items without content (their
            proxy slots are zero; a history's mean counts them as zeros, as the
            distinct-row path does).
        features: the item and the history feature.

    ``forward(t_ids [B], t_len [B], h_ids [n], h_len [B]) -> (target [B, c], history
    [B, c])``, detached (frozen: no gradient, no optimizer state); an empty history
    gives zeros.
    """

    def __init__(self, columns: torch.Tensor, features: List[str],
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        n, c = columns.shape
        self.columns = int(c)
        self.features = list(features)
        # the random init is overwritten: do not consume the global RNG
        with torch.random.fork_rng(devices=[]):
            self.bags = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
                name=STORED_TABLE, embedding_dim=_padded(c), num_embeddings=n,
                feature_names=self.features, pooling=PoolingType.MEAN)], device=device)
        _frozen_weight(self.bags.embedding_bags[STORED_TABLE].weight, columns)

    @property
    def weight(self) -> torch.Tensor:
        """[N, c] (unsharded module only)."""
        return self.bags.embedding_bags[STORED_TABLE].weight[:, :self.columns]

    def forward(self, t_ids: torch.Tensor, t_len: torch.Tensor, h_ids: torch.Tensor,
                h_len: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        kt = self.bags(_item_kjt(self.features, [t_ids, h_ids], [t_len, h_len]))
        t, h = _bag_values(kt, self.features, self.columns)
        return t, h


@torch.fx.wrap
def _one_id_bags(keys: List[str], rows: torch.Tensor) -> KeyedJaggedTensor:
    """rows [u] -> a KJT of u samples: ``keys[0]`` holds one row per sample, the other
    keys none (a pooled table read row by row)."""
    ones = torch.ones_like(rows, dtype=torch.long)
    zeros = torch.zeros_like(rows, dtype=torch.long)
    return KeyedJaggedTensor(keys=keys, values=rows.long(),
                             lengths=torch.cat([ones] + [zeros] * (len(keys) - 1)))


class CachedProxyBags(nn.Module):
    """``history_refresh`` in a pooled ranker (DLRM): the fine proxy's frozen inputs and
    the history cache as the two tables of one ``EmbeddingBagCollection`` child, so that
    one pooled lookup — one sharded call — gives each sample's target inputs and its
    history's mean.

    * ``t_idproxy_inputs`` [N, c] ``concat(p_coarse, adaptor inputs)`` plus a presence
      column (items with content), read by the item feature (one id per sample: its
      mean is its row; MEAN like the other table, so both are one fbgemm TBE);
    * ``t_idproxy_history`` [N, w] ``concat(p_coarse, p_fine)`` as the adaptor last
      wrote it (:meth:`_ProxySource.write_history_cache`), read MEAN-pooled by the
      history feature.

    Args:
        columns: [N, c] the inputs; present: [N] bool (default all).
        width: w, the history cache's columns (2d); zero until written.
        features: the item and the history feature.

    ``forward(rows [u]) -> (values [u, c], present [u] bool)``: the inputs of ``rows``
    (the :class:`FineProxy` inputs interface, used by the cache's writes);
    :meth:`pooled` is the step's lookup. Both detached (frozen: no gradient, no
    optimizer state).
    """

    def __init__(self, columns: torch.Tensor, present: Optional[torch.Tensor], width: int,
                 features: List[str], device: Optional[torch.device] = None) -> None:
        super().__init__()
        n, c = columns.shape
        self.columns, self.width, self.features = int(c), int(width), list(features)
        with torch.random.fork_rng(devices=[]):  # the random init is overwritten
            self.bags = EmbeddingBagCollection(tables=[
                EmbeddingBagConfig(name=INPUT_TABLE, embedding_dim=_padded(c + 1),
                                   num_embeddings=n, feature_names=self.features[:1],
                                   pooling=PoolingType.MEAN),
                EmbeddingBagConfig(name=HISTORY_TABLE, embedding_dim=_padded(width),
                                   num_embeddings=n, feature_names=self.features[1:],
                                   pooling=PoolingType.MEAN)], device=device)
        _frozen_weight(self.bags.embedding_bags[INPUT_TABLE].weight, columns,
                       True if present is None else present)
        _frozen_weight(self.bags.embedding_bags[HISTORY_TABLE].weight,
                       torch.zeros(n, width))

    @property
    def weight(self) -> torch.Tensor:
        """[N, c] the inputs (unsharded module only)."""
        return self.bags.embedding_bags[INPUT_TABLE].weight[:, :self.columns]

    def forward(self, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        (values,) = _bag_values(self.bags(_one_id_bags(self.features, rows)),
                               self.features[:1], self.columns + 1)
        return _split_presence(values, self.columns)

    def pooled(self, t_ids: torch.Tensor, t_len: torch.Tensor, h_ids: torch.Tensor,
               h_len: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(target inputs [B, c], target present [B] bool, history mean [B, w]); a
        sample without a target id is not present, an empty history is zero."""
        kt = self.bags(_item_kjt(self.features, [t_ids, h_ids], [t_len, h_len]))
        (t,) = _bag_values(kt, self.features[:1], self.columns + 1)
        (h,) = _bag_values(kt, self.features[1:], self.width)
        return (*_split_presence(t, self.columns), h)


@torch.fx.wrap
def _store_get(inputs: "StoreInputs", rows: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    return inputs.get(rows)


class StoreInputs(nn.Module):
    """The same frozen per-item vectors read from an online item store
    (``torchrec_mm.serving``, records of ``serving.fields.idproxy_schema``) at every call
    instead of a table: a new item written by ``torchrec-mm serve-items`` is served at
    once, and no rank holds the catalogue (each reads the rows its batch needs).

    Args:
        location: store location (``ItemStore.open``: a directory = embedded mmap store,
            ``redis://host:port/db?namespace=NS``, ``*.db`` = SQLite).
        dim / z_width: d and G*r (checked against the store's schema).
        fields: the store fields concatenated into the values (``p_coarse`` then ``z``,
            or ``p_coarse`` only).
        version: only records of this version count as present (None: any).

    ``forward(rows [u]) -> (values [u, c], present [u] bool)``; items missing from the
    store are not present (zeros), and the modules use their fallback for them.
    """

    def __init__(self, location: str, dim: int, z_width: int,
                 fields: Tuple[str, ...] = ("p_coarse", "z"),
                 version: Optional[str] = None) -> None:
        super().__init__()
        from torchrec_mm.serving.fields import idproxy_schema
        from torchrec_mm.serving.store import ItemStore

        self.location = location
        self.fields = list(fields)
        self.version = version
        self.store = ItemStore.open(location, idproxy_schema(dim, z_width), create=False,
                                    readonly=True)
        self.columns = dim + (z_width if "z" in self.fields else 0)

    def get(self, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        values, found = self.store.get(rows.detach().cpu(), self.fields, version=self.version)
        out = torch.cat([values[f] for f in self.fields], dim=1) if len(self.fields) > 1 \
            else values[self.fields[0]]
        return out.to(rows.device), found.to(rows.device)

    def forward(self, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return _store_get(self, rows)


class FineProxy(nn.Module):
    """Stage-2 fine proxy over frozen stage-1 outputs.

    Args:
        p_coarse: [N, d] stage-1 proxies (frozen buffer).
        z_groups: [N, G, D] layer-group states (frozen).
        hidden_dim: hidden size of the adaptor φ̃.
        z_rank: r > 0: the adaptor reads each group's states projected on its first r
            principal components (``z_basis``/``z_mean``, computed here when not
            given), i.e. φ̃'s first layer is restricted to the groups' principal
            subspaces — [N, G*r] frozen inputs instead of [N, G*D], for speed and
            memory; 0: the full states (the paper's form).
        z_mean / z_basis: [G, D] / [G, D, R >= r] stored with the proxies.
        inputs: builds the frozen inputs' module from ``(columns [N, d + G*r], has_content
            [N])`` (default :class:`ProxyInputs`; ignored with ``store``).

    ``forward(ids [n]) -> p_fine [n, d]``; :meth:`proxies` returns
    ``(p_coarse [n, d], p_fine [n, d])``; :meth:`rows` computes both for the distinct
    ids of a call (see there).
    """

    def __init__(self, p_coarse: torch.Tensor, z_groups: torch.Tensor, hidden_dim: int = 64,
                 device: Optional[torch.device] = None, z_rank: int = 0,
                 z_mean: Optional[torch.Tensor] = None,
                 z_basis: Optional[torch.Tensor] = None,
                 has_content: Optional[torch.Tensor] = None,
                 store: Optional[str] = None, store_version: Optional[str] = None,
                 inputs: Optional[Callable[[torch.Tensor, Optional[torch.Tensor]],
                                           nn.Module]] = None) -> None:
        super().__init__()
        if p_coarse.dim() != 2 or z_groups.dim() != 3 or p_coarse.shape[0] != z_groups.shape[0]:
            raise ValueError("FineProxy needs p_coarse [N, d] and z_groups [N, G, D] with the "
                             f"same N, got {tuple(p_coarse.shape)} and {tuple(z_groups.shape)}")
        if z_rank < 0:
            raise ValueError(f"z_rank must be >= 0, got {z_rank}")
        n, d = p_coarse.shape
        _, g, dc = z_groups.shape
        self._num_items = n
        z = z_groups.detach().float()
        if z_rank > 0:
            if z_basis is None or z_basis.shape[2] < min(z_rank, dc):
                z_mean, z_basis = group_basis(z, z_rank)
            r = min(z_rank, z_basis.shape[2])
            z_mean, z_basis = z_mean.float(), z_basis[:, :, :r].float().contiguous()
            z = torch.einsum("ngd,gdr->ngr", z - z_mean, z_basis)
            self.register_buffer("z_mean", z_mean.to(device), persistent=False)
            self.register_buffer("z_basis", z_basis.to(device), persistent=False)
        self.z_rank = int(z.shape[2]) if z_rank > 0 else 0
        # in the state dict so that a trained adaptor says which inputs it reads
        self.register_buffer("input_rank", torch.tensor(self.z_rank, dtype=torch.long,
                                                        device=device))
        self.dim = d
        self.z_width = int(z.shape[1] * z.shape[2])
        if store is not None:
            self.inputs: nn.Module = StoreInputs(store, d, self.z_width, version=store_version)
        else:
            columns = torch.cat([p_coarse.detach().float(), z.flatten(1)], dim=1)
            self.inputs = (inputs(columns, has_content) if inputs is not None
                           else ProxyInputs(columns, has_content, device=device))
        self.adaptor = nn.Sequential(nn.Linear(self.z_width, hidden_dim, device=device),
                                     nn.ReLU(), nn.Linear(hidden_dim, d, device=device))
        self.gate = nn.Linear(2 * d, d, device=device)
        self.coarse_map = nn.Linear(d, d, bias=False, device=device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in (self.adaptor[0], self.adaptor[2], self.gate):
            m.reset_parameters()
        with torch.no_grad():
            self.coarse_map.weight.copy_(torch.eye(self.coarse_map.weight.shape[0]))

    @property
    def num_items(self) -> int:
        return int(self._num_items)

    @property
    def p_coarse(self) -> torch.Tensor:
        """[N, d] the frozen coarse proxies (unsharded module only)."""
        return self.inputs.weight[:, :self.dim]

    @property
    def z_in(self) -> torch.Tensor:
        """[N, G*r] the adaptor's frozen inputs (unsharded module only)."""
        return self.inputs.weight[:, self.dim:self.dim + self.z_width]

    def lookup(self, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """rows [u] item ids -> (p_coarse [u, d], z [u, G*r], present [u]), detached."""
        values, present = self.inputs(rows)
        return values[:, :self.dim], values[:, self.dim:self.dim + self.z_width], present

    def compute(self, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """rows [u] item ids -> (p_coarse [u, d], p_fine [u, d], present [u] bool: the
        item has content; the proxies of the others must not be used)."""
        pc, z, present = self.lookup(rows)
        return pc, self._fine(pc, z), present

    def gated(self, pc: torch.Tensor, z_in: torch.Tensor) -> torch.Tensor:
        """The non-linear part of p_fine, ``r ⊙ p_raw_fine`` [u, d], from p_coarse
        [u, d] and the adaptor's inputs [u, G*r]. ``p_fine = coarse_map(pc) + gated``:
        the linear part commutes with pooling, so a pooled history applies
        ``coarse_map`` once to the pooled p_coarse instead of once per item."""
        raw = self.adaptor(z_in)
        # W_g [pc, raw] as two products: no gradient is computed for the frozen pc
        w_pc, w_raw = self.gate.weight.split(self.dim, dim=1)
        r = torch.sigmoid(nn.functional.linear(pc, w_pc)
                          + nn.functional.linear(raw, w_raw, self.gate.bias))
        return r * raw

    def _fine(self, pc: torch.Tensor, z_in: torch.Tensor) -> torch.Tensor:
        return self.coarse_map(pc) + self.gated(pc, z_in)

    def fine_of(self, p_coarse: torch.Tensor, z_groups: torch.Tensor) -> torch.Tensor:
        """p_fine [n, d] of items *outside* the buffers (new items) from their
        p_coarse [n, d] and layer-group states [n, G, D]."""
        z = z_groups.float()
        if self.z_rank:
            z = torch.einsum("ngd,gdr->ngr", z - self.z_mean, self.z_basis)
        if z.flatten(1).shape[1] != self.z_width:
            raise ValueError(f"states of shape {tuple(z_groups.shape)} do not fit the adaptor "
                             f"(input width {self.z_width})")
        return self._fine(p_coarse.float(), z.flatten(1))

    def proxies(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """ids [n] -> (p_coarse [n, d], p_fine [n, d])."""
        index, _, pc, pf, _ = self.rows(ids)
        return pc[index], pf[index]

    def rows(self, ids: torch.Tensor
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids [n] -> (index [n], rows [u], p_coarse [u, d], p_fine [u, d], present [u]):
        row ``index[i]`` holds item ``ids[i]``; ``rows`` are the items of the rows.

        The adaptor runs once per item of the call, not per occurrence (a batch's
        target and history ids repeat heavily): over the distinct ids when they are a
        small part of the catalogue, over the whole catalogue (no sort) when the call
        has at least half as many ids as there are items.
        """
        index, rows = _distinct_rows(ids, self.num_items)
        pc, pf, present = self.compute(rows)
        return index, rows, pc, pf, present

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proxies(ids)[1]


# --------------------------------------------------------------------- fx-wrapped helpers


@torch.fx.wrap
def _feature_ids(kjt: KeyedJaggedTensor, key: str) -> Tuple[torch.Tensor, torch.Tensor]:
    jt = kjt[key]
    return jt.values(), jt.lengths()


@torch.fx.wrap
def _check_ids(ids: torch.Tensor, num_items: int, table: str, feature: str) -> torch.Tensor:
    if ids.numel() and (int(ids.max()) >= num_items or int(ids.min()) < 0):
        bad = ids[(ids >= num_items) | (ids < 0)][0]
        raise ValueError(f"idproxy: item id {int(bad)} of feature '{feature}' is outside "
                         f"table '{table}' / the proxies (0..{num_items - 1})")
    return ids


@torch.fx.wrap
def _seq_values(seq: Dict[str, JaggedTensor], key: str) -> torch.Tensor:
    return seq[key].values()


@torch.fx.wrap
def _replace_seq(seq: Dict[str, JaggedTensor], keys: List[str], values: List[torch.Tensor]
                 ) -> Dict[str, JaggedTensor]:
    """New dict, same keys; ``values[i]`` are the new rows of ``keys[i]``."""
    out: Dict[str, JaggedTensor] = dict(seq)
    for k, v in zip(keys, values):
        jt = seq[k]
        out[k] = JaggedTensor(values=v, lengths=jt.lengths(), offsets=jt.offsets())
    return out


@torch.fx.wrap
def _drop_from_feature(kjt: KeyedJaggedTensor, key: str, drop: torch.Tensor
                       ) -> KeyedJaggedTensor:
    """The KJT with the values of ``key`` where ``drop`` ([len of key's values] bool) is
    True removed (lengths adjusted); other keys untouched."""
    keys = kjt.keys()
    idx = keys.index(key)
    stride = kjt.stride()
    lengths = kjt.lengths()
    offsets = kjt.offsets()
    start = int(offsets[idx * stride])
    end = int(offsets[(idx + 1) * stride])
    values = kjt.values()
    keep = torch.ones(values.shape[0], dtype=torch.bool, device=values.device)
    keep[start:end] = ~drop
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device),
                                  lengths.long(), output_size=values.shape[0])
    new_lengths = torch.zeros_like(lengths).index_add_(0, seg, keep.to(lengths.dtype))
    weights = kjt.weights_or_none()
    return KeyedJaggedTensor(keys=keys, values=values[keep], lengths=new_lengths,
                             weights=None if weights is None else weights[keep],
                             stride=stride)


@torch.fx.wrap
def _fine_no_grad(source: "_ProxySource", p_coarse: torch.Tensor, gated: torch.Tensor
                  ) -> torch.Tensor:
    """``p_fine = W_c p_coarse + gated`` [.., d] without autograd."""
    with torch.no_grad():
        return source.fine_map(p_coarse) + gated


@torch.fx.wrap
def _kt_value(kt: KeyedTensor, key: str) -> torch.Tensor:
    return kt[key]


@torch.fx.wrap
def _rebuild_kt(kt: KeyedTensor, replace: Dict[str, torch.Tensor], extra_keys: List[str],
                extra: List[torch.Tensor]) -> KeyedTensor:
    d = kt.to_dict()
    keys = kt.keys()
    values = [replace[k] if k in replace else d[k] for k in keys] + extra
    return KeyedTensor(keys=keys + extra_keys,
                       length_per_key=kt.length_per_key() + [v.shape[1] for v in extra],
                       values=torch.cat(values, dim=1), key_dim=1)


def _writable_shards(module: nn.Module, table: str
                     ) -> List[Tuple[int, int, torch.Tensor]]:
    """(row offset, column offset, rows) of this rank's part of the frozen table
    ``table`` of ``module``, plain or sharded by DMP: the local shards of its
    ``ShardedTensor`` weight — views of the fbgemm weights, so writing them changes
    the table — or the whole weight."""
    weights = [t for k, t in module.state_dict().items() if k.endswith(f".{table}.weight")]
    if len(weights) != 1:
        raise RuntimeError(f"idproxy: expected one table '{table}' in "
                           f"{type(module).__name__}, found {len(weights)}")
    weight = weights[0]
    if isinstance(weight, ShardedTensor):
        return [(int(sh.metadata.shard_offsets[0]), int(sh.metadata.shard_offsets[1]),
                 sh.tensor.detach()) for sh in weight.local_shards()]
    return [(0, 0, weight.detach())]


@torch.fx.wrap
def _split_parts(source: "_ProxySource", ids: torch.Tensor, n_target: int
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``source.split_parts`` as one leaf of a traced model (it sizes tensors by data:
    TrainPipelineSparseDist's tracer cannot step through it)."""
    return source.split_parts(ids, n_target)


@torch.fx.wrap
def _refresh_history(source: "_ProxySource", training: bool, ids: torch.Tensor) -> None:
    """``source.refresh_history(training)``. ``ids``, a tensor of the batch, is unused
    but makes a traced call (TrainPipelineSparseDist traces the model) a recorded node:
    fx runs a wrapped function whose arguments hold no proxy while tracing."""
    source.refresh_history(training)


# --------------------------------------------------------------------------- wrappers


class _ProxySource(nn.Module):
    """Shared state of both wrappers: frozen proxies, the optional fine proxy and the
    per-item masks ``use_proxy`` (the items whose ID embedding a proxy replaces)."""

    def __init__(self, proxies: Proxies, config: IDProxyConfig, table: str,
                 table_dim: int, table_rows: int, cold: Optional[torch.Tensor],
                 pooled: bool = False) -> None:
        super().__init__()
        if proxies.dim != table_dim:
            raise ValueError(f"idproxy: proxies have dim {proxies.dim} but table '{table}' "
                             f"has embedding_dim {table_dim}; refit the proxies for the "
                             "ranker's embedding dim")
        if proxies.num_items < table_rows:
            raise ValueError(f"idproxy: proxies cover {proxies.num_items} items but table "
                             f"'{table}' has {table_rows} rows")
        self.config = config
        self.table = table
        self.dim = table_dim
        n = proxies.num_items
        self._num_items = n
        # with a store, whether an item has content is known per call (is it in the store)
        has_content = (torch.ones(n, dtype=torch.bool) if config.store
                       else proxies.has_content.bool())
        if config.mode == "cold_only":
            if cold is None:
                raise ValueError("idproxy: mode 'cold_only' needs the cold-item mask")
            if cold.shape[0] != n:
                raise ValueError(f"idproxy: cold mask has {cold.shape[0]} items, proxies "
                                 f"{n} (table '{table}')")
            use_proxy = cold.bool() & has_content
        elif config.mode == "swap":
            use_proxy = has_content
        else:
            use_proxy = torch.zeros(n, dtype=torch.bool)
        self.register_buffer("use_proxy", use_proxy, persistent=False)
        self.fine: Optional[FineProxy] = None
        self.bags = None
        #: history_refresh in a sequence ranker: the history cache (pooled rankers keep
        #: it in the fine proxy's inputs, a CachedProxyBags)
        self.history_rows: Optional[ProxyInputs] = None
        #: p_fine stored with p_coarse in one frozen table (``fine_run``)
        self.fixed_fine = bool(config.fine_run)
        if self.fixed_fine:
            from torchrec_mm.idproxy.generate import catalogue_fine_proxies, load_fine_proxy

            p_fine = catalogue_fine_proxies(load_fine_proxy(config.fine_run, proxies), proxies)
            stored = torch.cat([proxies.p_coarse.float(), p_fine], 1)
            if pooled and config.mode in ("augment", "feature"):
                # the pooled slots need only the target's row and the history's mean
                self.bags: Optional[StoredProxyBags] = StoredProxyBags(
                    stored * has_content.unsqueeze(1).to(stored.dtype),
                    [config.item_feature, config.history_feature])
            else:
                self.coarse = ProxyInputs(stored, has_content)
        elif config.use_fine:
            features = [config.item_feature, config.history_feature]

            def cached_bags(columns: torch.Tensor, present: Optional[torch.Tensor]
                            ) -> nn.Module:
                return CachedProxyBags(columns, present, 2 * table_dim, features)

            self.fine = FineProxy(proxies.p_coarse, proxies.z_groups, config.hidden_dim,
                                  z_rank=config.z_rank, z_mean=proxies.z_mean,
                                  z_basis=proxies.z_basis, has_content=has_content,
                                  store=config.store, store_version=config.store_version,
                                  inputs=cached_bags if config.history_refresh and pooled
                                  else None)
            if config.history_refresh and not pooled:
                # written from the adaptor at the first forward (refresh_history)
                self.history_rows = ProxyInputs(torch.zeros(n, 2 * table_dim), has_content,
                                                name=HISTORY_TABLE)
            if config.history_refresh:
                # training forwards since the history cache was written (-1: never); in
                # the state dict, so a resumed run rewrites it when the run would have
                self.register_buffer("cache_age", torch.tensor(-1, dtype=torch.long))
        elif config.store:
            z_width = FineProxy(proxies.p_coarse[:1], proxies.z_groups[:1], 1,
                                z_rank=config.z_rank, z_mean=proxies.z_mean,
                                z_basis=proxies.z_basis).z_width
            self.coarse: nn.Module = StoreInputs(config.store, table_dim, z_width,
                                                 fields=("p_coarse",),
                                                 version=config.store_version)
        else:
            self.coarse = ProxyInputs(proxies.p_coarse.float(), has_content)

    def num_items(self) -> int:
        return self._num_items

    @property
    def width(self) -> int:
        """Columns of :meth:`rows`' table: 2d with the fine proxy, d without."""
        return 2 * self.dim if self.fine is not None or self.fixed_fine else self.dim

    def parts(self, ids: torch.Tensor
              ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """ids [n] → (index [n], p_coarse [u, d], gated [u, d] or None, present [u]):
        row ``index[i]`` belongs to item ``ids[i]``; ``p_fine = fine_map(p_coarse) +
        gated`` (:meth:`fine_map`); both zero for items without content (``present``
        False). ``gated`` is None without the fine proxy."""
        if self.fixed_fine:
            raise RuntimeError("idproxy: parts() splits a trained fine proxy; with stored "
                               "fine proxies (fine_run) use slot_tables()")
        index, rows = _distinct_rows(ids, self._num_items)
        if self.fine is None:
            pc, present = self.coarse(rows)
            return index, _zero_absent(pc, present), None, present
        pc, z, present = self.fine.lookup(rows)
        return (index, _zero_absent(pc, present),
                _zero_absent(self.fine.gated(pc, z), present), present)

    def split_parts(self, ids: torch.Tensor, n_target: int
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``history_grad`` False: ids [n] = the target ids [n_target] then the history
        ids → (index [n], p_coarse [u, d], gated_target [n_target, d], gated [u, d]).
        ``gated`` (every distinct item) is computed without gradient;
        ``gated_target``, row i for ``ids[i]``, carries the gradient and is computed
        once per distinct target item. Zero rows for items without content."""
        assert self.fine is not None
        index, rows = _distinct_rows(ids, self._num_items)
        pc, z, present = self.fine.lookup(rows)
        gated = _zero_absent(_gated_no_grad(self.fine, pc, z), present)
        # the distinct target items, as positions among the rows
        t_index, t_rows = _distinct_rows(index[:n_target], int(rows.shape[0]))
        t_gated = _zero_absent(self.fine.gated(pc[t_rows], z[t_rows]), present[t_rows])
        return index, _zero_absent(pc, present), t_gated.index_select(0, t_index), gated

    def _stored_rows(self, ids: torch.Tensor
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``fine_run``: (index [n], stored ``concat(p_coarse, p_fine)`` [u, 2d], present)."""
        index, rows = _distinct_rows(ids, self._num_items)
        table, present = self.coarse(rows)
        return index, _zero_absent(table, present), present

    def refresh_history(self, training: bool) -> None:
        """``history_refresh``: rewrites the history cache when it is due — never
        written, ``history_refresh`` training forwards since the last write, or an
        evaluation (``training`` False) after training forwards — then counts this
        forward. Every rank calls it at the same forwards (the rewrite's lookups are
        collectives when the inputs table is sharded)."""
        age, every = int(self.cache_age), self.config.history_refresh
        if age < 0 or (training and age >= every) or (not training and age > 0):
            self.write_history_cache()
            age = 0
        self.cache_age.fill_(age + 1 if training else age)

    @torch.no_grad()
    def write_history_cache(self, chunk: int = 65536) -> None:
        """Writes ``concat(p_coarse, p_fine)`` [.., 2d] of the current adaptor (zero for
        items without content) into the rows of the history cache that this rank
        holds (its local shards; the whole table unsharded or data-parallel), ``chunk``
        items per inputs lookup — the same number of lookups on every rank."""
        assert self.fine is not None and self.config.history_refresh
        width = 2 * self.dim
        shards = _writable_shards(self.history_rows if self.history_rows is not None
                                  else self.fine.inputs, HISTORY_TABLE)
        device = self.use_proxy.device
        for lo in range(0, self._num_items, chunk):
            hi = min(self._num_items, lo + chunk)
            spans = [(max(lo, r0), min(hi, r0 + t.shape[0])) for r0, _, t in shards]
            rows = torch.cat([torch.arange(a, b, device=device) for a, b in spans if a < b]
                             or [torch.zeros(0, dtype=torch.long, device=device)])
            pc, pf, present = self.fine.compute(rows)
            values = _zero_absent(torch.cat([pc, pf], dim=1), present)
            at = 0
            for (r0, c0, t), (a, b) in zip(shards, spans):
                if a >= b:
                    continue
                cols = min(t.shape[1], width - c0)
                if cols > 0:
                    t[a - r0:b - r0, :cols].copy_(values[at:at + b - a, c0:c0 + cols])
                at += b - a

    def fine_map(self, p_coarse: torch.Tensor) -> torch.Tensor:
        """The linear part of p_fine (``W_c p_coarse``), [.., d] -> [.., d]."""
        assert self.fine is not None
        return self.fine.coarse_map(p_coarse)

    def slot_tables(self, ids: torch.Tensor
                    ) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor]:
        """ids [n] → (index [n], [p_coarse [u, d], p_fine [u, d]] (``[p_coarse]``
        without the fine proxy), present [u] bool): row ``index[i]`` of each table
        belongs to item ``ids[i]``; zero rows for items without content."""
        if self.fixed_fine:
            index, table, present = self._stored_rows(ids)
            return index, [table[:, :self.dim], table[:, self.dim:]], present
        index, pc, gated, present = self.parts(ids)
        if gated is None:
            return index, [pc], present
        return index, [pc, self.fine_map(pc) + gated], present

    def rows(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids [n] → (index [n], table [u, width], present [u] bool): row ``index[i]``
        of the table is ``concat(p_coarse, p_fine)`` (or ``p_coarse``) of item
        ``ids[i]``, zero for items without content (``present`` False)."""
        if self.fixed_fine:
            return self._stored_rows(ids)
        index, tables, present = self.slot_tables(ids)
        return index, torch.cat(tables, dim=1) if len(tables) > 1 else tables[0], present

    def proxy_rows(self, ids: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids [n] → (index [n], table [u, d], use [n] bool): the proxy that *replaces*
        an ID embedding (p_fine, or p_coarse without the fine proxy) and, per id,
        whether it does (the mode's choice and the item has content)."""
        index, table, present = self.rows(ids)
        return index, table[:, -self.dim:], self.use_proxy[ids] & present[index]


class IDProxyEmbeddingCollection(nn.Module):
    """Wraps the target-attention ranker's ``EmbeddingCollection``.

    Args:
        embedding_collection: the EC (a child: DMP shards it).
        proxies: stage-1 artefact (``p_coarse`` [N, d], ``z_groups`` [N, G, D]).
        config: mode etc. (``augment``, ``swap`` or ``cold_only``).
        cold: [N] bool cold-item mask (``cold_only`` only).

    ``forward(kjt) -> Dict[str, JaggedTensor]`` with the EC's keys; the rows of
    ``item_feature`` and ``history_feature`` become, per item,
    ``concat(e_id, p_coarse[, p_fine])`` (augment, [n, 3d] / [n, 2d]), the proxy (swap)
    or ``e_id``/proxy by the cold mask (cold_only), [n, d].
    """

    def __init__(self, embedding_collection: nn.Module, proxies: Proxies,
                 config: IDProxyConfig, cold: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        if config.mode == "feature":
            raise ValueError("idproxy: mode 'feature' adds pooled features; it wraps the "
                             "EmbeddingBagCollection, not the EmbeddingCollection")
        self.embedding_collection = embedding_collection
        self.config = config
        table = _table_of(embedding_collection.embedding_configs(), config)
        self.table_name = table.name
        self.source = _ProxySource(proxies, config, table.name, table.embedding_dim,
                                   table.num_embeddings, cold)
        self.keys: List[str] = [config.item_feature, config.history_feature]
        out_dim = table.embedding_dim
        if config.mode == "augment":
            out_dim += self.source.width
        self._configs = [dataclasses.replace(c, embedding_dim=out_dim) if c.name == table.name
                         else c for c in embedding_collection.embedding_configs()]

    def embedding_configs(self) -> List[EmbeddingConfig]:
        return list(self._configs)

    def forward(self, features: KeyedJaggedTensor) -> Dict[str, JaggedTensor]:
        seq = self.embedding_collection(features)
        n_items = self.source.num_items()
        t_ids, _ = _feature_ids(features, self.keys[0])
        h_ids, _ = _feature_ids(features, self.keys[1])
        t_ids = _check_ids(t_ids, n_items, self.table_name, self.keys[0])
        h_ids = _check_ids(h_ids, n_items, self.table_name, self.keys[1])
        n_t = t_ids.shape[0]
        emb_t, emb_h = _seq_values(seq, self.keys[0]), _seq_values(seq, self.keys[1])
        if self.source.history_rows is not None:  # history_refresh (mode augment)
            # the targets' proxies live (gradient into the adaptor), the history's from
            # the table the adaptor rewrites every history_refresh steps
            _refresh_history(self.source, self.training, h_ids)
            index, tables, _ = self.source.slot_tables(t_ids)
            values_t = torch.cat([emb_t] + [t.index_select(0, index) for t in tables], dim=1)
            values_h = torch.cat([emb_h, self.source.history_rows(h_ids)[0]], dim=1)
            return _replace_seq(seq, self.keys, [values_t, values_h])
        ids = torch.cat([t_ids, h_ids])
        if self.config.mode == "augment" and not self.config.history_grad:
            index, pc, gated_t, gated = _split_parts(self.source, ids, n_t)
            i_t, i_h = index[:n_t], index[n_t:]
            pc_t = pc.index_select(0, i_t)
            values_t = torch.cat([emb_t, pc_t, self.source.fine_map(pc_t) + gated_t], dim=1)
            pf = _fine_no_grad(self.source, pc, gated)
            values_h = torch.cat([emb_h, pc.index_select(0, i_h), pf.index_select(0, i_h)],
                                 dim=1)
        elif self.config.mode == "augment":
            # per table: the frozen p_coarse's gather has no backward
            index, tables, _ = self.source.slot_tables(ids)
            i_t, i_h = index[:n_t], index[n_t:]
            values_t = torch.cat([emb_t] + [t.index_select(0, i_t) for t in tables], dim=1)
            values_h = torch.cat([emb_h] + [t.index_select(0, i_h) for t in tables], dim=1)
        else:
            index, table, use = self.source.proxy_rows(ids)
            use = use.unsqueeze(1)
            values_t = torch.where(use[:n_t], table.index_select(0, index[:n_t]), emb_t)
            values_h = torch.where(use[n_t:], table.index_select(0, index[n_t:]), emb_h)
        return _replace_seq(seq, self.keys, [values_t, values_h])


class IDProxyEmbeddingBagCollection(nn.Module):
    """Wraps an ``EmbeddingBagCollection``: DLRM's / DLRM_DCN's (pooled ``t_item_id``,
    MEAN history), or — mode ``feature`` — any ranker's pooled features.

    Args: as :class:`IDProxyEmbeddingCollection`, plus
        item_table: the config of the table serving the item features when the wrapped
            EBC does not hold it (mode ``feature`` with the target-attention ranker,
            whose item table is in its EC).

    ``forward(kjt) -> KeyedTensor``: augment / feature append ``<item>_coarse``,
    ``<item>_fine``, ``<hist>_coarse``, ``<hist>_fine`` [B, d] (history: mean of
    per-item proxies, zero if empty; ``feature_parts="fine"``: only the ``_fine`` keys); swap / cold_only keep the keys and replace the
    values of the item and history keys (history: mean over items of ID embedding or
    proxy, see the module docstring for how the per-item choice is made with a pooled
    EBC).
    """

    def __init__(self, embedding_bag_collection: nn.Module, proxies: Proxies,
                 config: IDProxyConfig, cold: Optional[torch.Tensor] = None,
                 item_table: Optional[EmbeddingConfig] = None) -> None:
        super().__init__()
        self.embedding_bag_collection = embedding_bag_collection
        self.config = config
        if item_table is not None:
            if config.mode != "feature":
                raise ValueError("idproxy: item_table (an item table outside the wrapped "
                                 f"EBC) only works with mode 'feature', not '{config.mode}'")
            table = item_table
        else:
            table = _table_of(embedding_bag_collection.embedding_bag_configs(), config)
            if table.pooling != PoolingType.MEAN:
                raise ValueError(f"idproxy: table '{table.name}' must be MEAN-pooled, "
                                 f"got {table.pooling}")
        self.table_name = table.name
        self.source = _ProxySource(proxies, config, table.name, table.embedding_dim,
                                   table.num_embeddings, cold, pooled=True)
        self.keys: List[str] = [config.item_feature, config.history_feature]
        self.extra_keys: List[str] = []
        self._extra: List[EmbeddingBagConfig] = []
        if config.mode in ("augment", "feature"):
            kinds = ["coarse", "fine"] if config.use_fine else ["coarse"]
            if config.feature_parts == "fine":
                kinds = ["fine"]
            for f in self.keys:
                for k in kinds:
                    name = f"{f}_{k}"
                    self.extra_keys.append(name)
                    self._extra.append(EmbeddingBagConfig(
                        name=f"t_{name}", num_embeddings=proxies.num_items,
                        embedding_dim=table.embedding_dim, feature_names=[name],
                        pooling=PoolingType.MEAN))

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return list(self.embedding_bag_collection.embedding_bag_configs()) + self._extra

    def _with_proxies(self, kt: KeyedTensor, t_pc: torch.Tensor, h_pc: torch.Tensor,
                      t_pf: Optional[torch.Tensor] = None,
                      h_pf: Optional[torch.Tensor] = None) -> KeyedTensor:
        """``kt`` with the proxy keys appended (``extra_keys``' order): p_coarse / p_fine
        [B, d] of the target (``t_``) and the pooled history (``h_``)."""
        item, hist = self.keys
        value = {f"{item}_coarse": t_pc, f"{hist}_coarse": h_pc, f"{item}_fine": t_pf,
                 f"{hist}_fine": h_pf}
        return _rebuild_kt(kt, {}, self.extra_keys, [value[k] for k in self.extra_keys])

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        n_items = self.source.num_items()
        t_ids, t_len = _feature_ids(features, self.keys[0])
        h_ids, h_len = _feature_ids(features, self.keys[1])
        t_ids = _check_ids(t_ids, n_items, self.table_name, self.keys[0])
        h_ids = _check_ids(h_ids, n_items, self.table_name, self.keys[1])
        n_t = t_ids.shape[0]
        if self.config.mode in ("augment", "feature"):
            kt = self.embedding_bag_collection(features)
            d = self.source.dim
            if self.source.bags is not None:
                # stored p_coarse | p_fine, frozen: one pooled lookup, no backward
                t, h = self.source.bags(t_ids, t_len, h_ids, h_len)
                return self._with_proxies(kt, t[:, :d], h[:, :d], t[:, d:], h[:, d:])
            if self.config.history_refresh:
                # one pooled lookup: the targets' inputs (their proxies are computed
                # live, gradient into the adaptor) and the history's mean from the
                # table the adaptor rewrites
                _refresh_history(self.source, self.training, h_ids)
                fine = self.source.fine
                t_in, present, h = fine.inputs.pooled(t_ids, t_len, h_ids, h_len)
                t_pc = _zero_absent(t_in[:, :d], present)
                t_gated = _zero_absent(fine.gated(t_pc, t_in[:, d:]), present)
                return self._with_proxies(kt, t_pc, h[:, :d],
                                          self.source.fine_map(t_pc) + t_gated, h[:, d:])
            ids = torch.cat([t_ids, h_ids])
            if self.config.history_grad:
                index, pc, gated, _ = self.source.parts(ids)
                t_gated = None if gated is None else gated.index_select(0, index[:n_t])
            else:
                index, pc, t_gated, gated = _split_parts(self.source, ids, n_t)
            # p_coarse is frozen: its pooling has no backward
            t_pc = pc.index_select(0, index[:n_t])
            h_pc = jagged.gather_pool(pc, index[n_t:], h_len, "mean")
            if gated is None:
                return self._with_proxies(kt, t_pc, h_pc)
            # p_fine = W_c p_coarse + gated, W_c linear: pooled once, after the mean;
            # without history_grad the history's gated rows are constants (no backward)
            h_gated = jagged.gather_pool(gated, index[n_t:], h_len, "mean")
            h_pf = (self.source.fine_map(h_pc) + h_gated if self.config.history_grad
                    else _fine_no_grad(self.source, h_pc, h_gated))
            return self._with_proxies(kt, t_pc, h_pc, self.source.fine_map(t_pc) + t_gated,
                                      h_pf)
        index, table, use = self.source.proxy_rows(torch.cat([t_ids, h_ids]))
        h_use = use[n_t:]
        kt = self.embedding_bag_collection(
            _drop_from_feature(features, self.keys[1], h_use))
        t_use = use[:n_t].unsqueeze(1)
        target = torch.where(t_use, table[index[:n_t]], _kt_value(kt, self.keys[0]))
        kept_mean = _kt_value(kt, self.keys[1])
        w = h_use.to(kept_mean.dtype)
        n_proxy = jagged.segment_sum(w.unsqueeze(1), h_len)
        n_kept = h_len.unsqueeze(1).to(kept_mean.dtype) - n_proxy
        proxy_sum = jagged.gather_pool(table, index[n_t:], h_len, "sum", w)
        hist = (n_kept * kept_mean + proxy_sum) / \
            h_len.clamp(min=1).unsqueeze(1).to(kept_mean.dtype)
        return _rebuild_kt(kt, {self.keys[0]: target, self.keys[1]: hist}, [], [])


def _table_of(configs: List[object], config: IDProxyConfig) -> object:
    """The table serving both item features (they must share one)."""
    for c in configs:
        if config.item_feature in c.feature_names:
            if config.history_feature not in c.feature_names:
                raise ValueError(f"idproxy: table '{c.name}' serves '{config.item_feature}' "
                                 f"but not '{config.history_feature}'")
            return c
    raise ValueError(f"idproxy: no table serves feature '{config.item_feature}' (tables: "
                     f"{[c.name for c in configs]})")
