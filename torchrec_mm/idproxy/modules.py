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
``swap``
    The proxy (``p_fine``, or ``p_coarse`` with ``use_fine=False``) takes the place of
    the ID embedding, same keys and dims.
``cold_only``
    The proxy replaces the ID embedding only for *cold* items (training impressions
    below a threshold, given as a ``cold`` mask), as at serving time; warm items keep
    their ID embedding.

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
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from torchrec_mm.utils import jagged
from torchrec_mm.idproxy.artifacts import Proxies

MODES = ("augment", "swap", "cold_only")


@dataclass
class IDProxyConfig:
    """How proxies enter the ranker.

    Attributes:
        mode: ``augment`` (ID + p_coarse + p_fine, the paper's setting), ``swap``
            (proxy instead of the ID embedding) or ``cold_only`` (proxy instead of the ID
            embedding for cold items only).
        use_fine: use the stage-2 fine proxy (else only ``p_coarse``: stage 1 alone).
        item_feature / history_feature: KJT keys of the target item and the history,
            both served by the item table.
        cold_threshold: items with fewer training impressions than this are cold
            (the plugin turns counts into the ``cold`` mask given to the wrappers).
        hidden_dim: hidden size of the adaptor φ̃.
        fallback: what an item without content gets where a proxy would replace its ID
            embedding; only ``id_embedding`` (keep the ID embedding) is supported.
    """

    mode: str = "augment"
    use_fine: bool = True
    item_feature: str = "item_id"
    history_feature: str = "hist_item_id"
    cold_threshold: int = 5
    hidden_dim: int = 64
    fallback: str = "id_embedding"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown idproxy mode '{self.mode}', expected one of {MODES}")
        if self.fallback != "id_embedding":
            raise ValueError(f"unknown idproxy fallback '{self.fallback}' "
                             "(supported: id_embedding)")
        if self.cold_threshold < 0:
            raise ValueError(f"cold_threshold must be >= 0, got {self.cold_threshold}")


class FineProxy(nn.Module):
    """Stage-2 fine proxy over frozen stage-1 outputs.

    Args:
        p_coarse: [N, d] stage-1 proxies (frozen buffer).
        z_groups: [N, G, D] layer-group states (frozen buffer).
        hidden_dim: hidden size of the adaptor φ̃.

    ``forward(ids [n]) -> p_fine [n, d]``; :meth:`proxies` returns
    ``(p_coarse [n, d], p_fine [n, d])``.
    """

    def __init__(self, p_coarse: torch.Tensor, z_groups: torch.Tensor, hidden_dim: int = 64,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        if p_coarse.dim() != 2 or z_groups.dim() != 3 or p_coarse.shape[0] != z_groups.shape[0]:
            raise ValueError("FineProxy needs p_coarse [N, d] and z_groups [N, G, D] with the "
                             f"same N, got {tuple(p_coarse.shape)} and {tuple(z_groups.shape)}")
        n, d = p_coarse.shape
        _, g, dc = z_groups.shape
        self.register_buffer("p_coarse", p_coarse.detach().float().to(device), persistent=False)
        self.register_buffer("z_groups", z_groups.detach().float().to(device), persistent=False)
        self.adaptor = nn.Sequential(nn.Linear(g * dc, hidden_dim, device=device), nn.ReLU(),
                                     nn.Linear(hidden_dim, d, device=device))
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
        return int(self.p_coarse.shape[0])

    def proxies(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """ids [n] -> (p_coarse [n, d], p_fine [n, d]).

        The adaptor runs once per *distinct* id of the call (a batch's target and
        history ids repeat heavily), then the rows are gathered back.
        """
        uniq, inverse = torch.unique(ids, return_inverse=True)
        pc = self.p_coarse[uniq]
        raw = self.adaptor(self.z_groups[uniq].flatten(1))
        r = torch.sigmoid(self.gate(torch.cat([pc, raw], dim=1)))
        fine = self.coarse_map(pc) + r * raw
        return pc[inverse], fine[inverse]

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
def _replace_seq(seq: Dict[str, JaggedTensor], keys: List[str], values: torch.Tensor,
                 first: int) -> Dict[str, JaggedTensor]:
    """New dict, same keys; ``values`` holds keys[0]'s rows then keys[1]'s."""
    out: Dict[str, JaggedTensor] = dict(seq)
    parts = [values[:first], values[first:]]
    for k, v in zip(keys, parts):
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


# --------------------------------------------------------------------------- wrappers


class _ProxySource(nn.Module):
    """Shared state of both wrappers: frozen proxies, the optional fine proxy and the
    per-item masks ``use_proxy`` (the items whose ID embedding a proxy replaces)."""

    def __init__(self, proxies: Proxies, config: IDProxyConfig, table: str,
                 table_dim: int, table_rows: int, cold: Optional[torch.Tensor]) -> None:
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
        n = proxies.num_items
        self._num_items = n
        has_content = proxies.has_content.bool()
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
        self.register_buffer("has_content", has_content, persistent=False)
        self.fine: Optional[FineProxy] = None
        if config.use_fine:
            self.fine = FineProxy(proxies.p_coarse, proxies.z_groups, config.hidden_dim)
        else:
            self.register_buffer("p_coarse", proxies.p_coarse.float(), persistent=False)

    def num_items(self) -> int:
        return self._num_items

    def coarse_fine(self, ids: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """ids [n] → (p_coarse [n, d], p_fine [n, d] or None), zero for no-content items."""
        mask = self.has_content[ids].unsqueeze(1).float()
        if self.fine is not None:
            pc, pf = self.fine.proxies(ids)
            return pc * mask, pf * mask
        return self.p_coarse[ids] * mask, None

    def proxy(self, ids: torch.Tensor) -> torch.Tensor:
        """The proxy that replaces an ID embedding: p_fine (or p_coarse)."""
        pc, pf = self.coarse_fine(ids)
        return pf if pf is not None else pc


class IDProxyEmbeddingCollection(nn.Module):
    """Wraps the target-attention ranker's ``EmbeddingCollection``.

    Args:
        embedding_collection: the EC (a child: DMP shards it).
        proxies: stage-1 artefact (``p_coarse`` [N, d], ``z_groups`` [N, G, D]).
        config: mode etc.
        cold: [N] bool cold-item mask (``cold_only`` only).

    ``forward(kjt) -> Dict[str, JaggedTensor]`` with the EC's keys; the rows of
    ``item_feature`` and ``history_feature`` become, per item,
    ``concat(e_id, p_coarse[, p_fine])`` (augment, [n, 3d] / [n, 2d]), the proxy (swap)
    or ``e_id``/proxy by the cold mask (cold_only), [n, d].
    """

    def __init__(self, embedding_collection: nn.Module, proxies: Proxies,
                 config: IDProxyConfig, cold: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.embedding_collection = embedding_collection
        self.config = config
        table = _table_of(embedding_collection.embedding_configs(), config)
        self.table_name = table.name
        self.source = _ProxySource(proxies, config, table.name, table.embedding_dim,
                                   table.num_embeddings, cold)
        self.keys: List[str] = [config.item_feature, config.history_feature]
        out_dim = table.embedding_dim
        if config.mode == "augment":
            out_dim *= 3 if config.use_fine else 2
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
        ids = torch.cat([t_ids, h_ids])
        emb = torch.cat([_seq_values(seq, self.keys[0]), _seq_values(seq, self.keys[1])])
        if self.config.mode == "augment":
            pc, pf = self.source.coarse_fine(ids)
            parts = [emb, pc] + ([pf] if pf is not None else [])
            values = torch.cat(parts, dim=1)
        else:
            use = self.source.use_proxy[ids].unsqueeze(1)
            values = torch.where(use, self.source.proxy(ids), emb)
        return _replace_seq(seq, self.keys, values, t_ids.shape[0])


class IDProxyEmbeddingBagCollection(nn.Module):
    """Wraps DLRM's ``EmbeddingBagCollection`` (pooled ``t_item_id``, MEAN history).

    Args: as :class:`IDProxyEmbeddingCollection`.

    ``forward(kjt) -> KeyedTensor``: augment appends ``<item>_coarse``, ``<item>_fine``,
    ``<hist>_coarse``, ``<hist>_fine`` [B, d] (history: mean of per-item proxies, zero
    if empty); swap / cold_only keep the keys and replace the values of the item and
    history keys (history: mean over items of ID embedding or proxy, see the module
    docstring for how the per-item choice is made with a pooled EBC).
    """

    def __init__(self, embedding_bag_collection: nn.Module, proxies: Proxies,
                 config: IDProxyConfig, cold: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.embedding_bag_collection = embedding_bag_collection
        self.config = config
        table = _table_of(embedding_bag_collection.embedding_bag_configs(), config)
        if table.pooling != PoolingType.MEAN:
            raise ValueError(f"idproxy: table '{table.name}' must be MEAN-pooled, "
                             f"got {table.pooling}")
        self.table_name = table.name
        self.source = _ProxySource(proxies, config, table.name, table.embedding_dim,
                                   table.num_embeddings, cold)
        self.keys: List[str] = [config.item_feature, config.history_feature]
        self.extra_keys: List[str] = []
        self._extra: List[EmbeddingBagConfig] = []
        if config.mode == "augment":
            kinds = ["coarse", "fine"] if config.use_fine else ["coarse"]
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

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        n_items = self.source.num_items()
        t_ids, _ = _feature_ids(features, self.keys[0])
        h_ids, h_len = _feature_ids(features, self.keys[1])
        t_ids = _check_ids(t_ids, n_items, self.table_name, self.keys[0])
        h_ids = _check_ids(h_ids, n_items, self.table_name, self.keys[1])
        if self.config.mode == "augment":
            kt = self.embedding_bag_collection(features)
            tc, tf = self.source.coarse_fine(t_ids)
            hc, hf = self.source.coarse_fine(h_ids)
            extra = [tc] + ([tf] if tf is not None else [])
            extra += [jagged.segment_mean(hc, h_len)]
            if hf is not None:
                extra.append(jagged.segment_mean(hf, h_len))
            return _rebuild_kt(kt, {}, self.extra_keys, extra)
        h_use = self.source.use_proxy[h_ids]
        kt = self.embedding_bag_collection(
            _drop_from_feature(features, self.keys[1], h_use))
        t_use = self.source.use_proxy[t_ids].unsqueeze(1)
        target = torch.where(t_use, self.source.proxy(t_ids), _kt_value(kt, self.keys[0]))
        kept_mean = _kt_value(kt, self.keys[1])
        h_proxy = self.source.proxy(h_ids) * h_use.unsqueeze(1).to(kept_mean.dtype)
        n_proxy = jagged.segment_sum(h_use.unsqueeze(1).to(kept_mean.dtype), h_len)
        n_kept = h_len.unsqueeze(1).to(kept_mean.dtype) - n_proxy
        hist = (n_kept * kept_mean + jagged.segment_sum(h_proxy, h_len)) / \
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
