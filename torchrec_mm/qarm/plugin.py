"""``qarm`` plugin: quantitative codes of aligned content as sparse features.

Paper ``002_93e7adf76829e098`` §2.4 — from the item ids already in a batch:

* item side: the target's VQ codes (``qarm_vq``, K ids, MEAN-pooled, table of N + 1
  rows: codes are item ids of the codebook) and RQ codes (``qarm_rq``, L ids, MEAN-pooled,
  one table of ``L * (codebook_size + 1)`` rows, level-offset);
* user side: the codes of the user's latest ``user_len`` history items
  (``qarm_hist_rq``, and ``qarm_hist_vq`` with ``user_vq``), MEAN-pooled;
* target-aware: for l = 1..L', the latest ``match_len`` history items sharing the
  target's first l RQ codes (``qarm_match_l<l>``), either through the CrossNet (target
  attention, ``cross: attention``, :class:`~torchrec_mm.qarm.modules.QARMCrossCollection`)
  or MEAN-pooled (``cross: pooled``).

Mechanics (``torchrec_mm.plugins``): the **batch transform** appends the code features
to every batch's KJT when it is built (``code_feature_kjt``; data-loader side, before the
input distribution); **phase 1** adds their tables to the ranker's pooled tables (so DLRM
and DLRM_DCN take them unmodified, and DMP shards them); **phase 2** (``cross:
attention``) wraps the EBC with the CrossNet, whose own code table DMP shards too.

Spec (``plugins/qarm.yaml``)::

    plugins:
      - name: qarm
        options: {codes: out/qarm/codes}

Items without codes (no content) carry the reserved "no code" index of each table
(one trained row), so a batch never holds an invalid id.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mm.plugins import PluginContext, RankerPlugin, register_plugin
from torchrec_mm.qarm.matching import CodeFeatureConfig, code_feature_kjt

CROSS = ("attention", "pooled", "none")


@dataclass
class QARMOptions:
    """Options of the ``qarm`` plugin.

    Attributes:
        codes: directory written by ``torchrec-mm qarm codes`` (relative paths resolve
            against the dataset's parent first, then the cwd).
        use_vq: VQ code features: the target's (and, with ``user_vq``, the history's).
        vq_k: use the first (nearest) k of the stored K VQ codes (0: all K) — the K
            sweep of the paper's Table 7 without rebuilding the codes.
        use_rq: RQ code features: the target's, the history's and the target-aware
            matching sequences (which are defined by RQ code prefixes).
        user_len: history items whose codes form the user-side features (0: none).
        user_vq: user-side VQ codes too (K values per history item: costly).
        levels: L' target-aware matching levels (0: all L; ``cross: none`` or
            ``use_rq: false`` disables them).
        match_len: n, latest matching items per level.
        cross: ``attention`` (CrossNet), ``pooled`` (mean of matched items' codes) or
            ``none``.
        embedding_dim: d of the code tables (0: the ranker's embedding dim; DLRM needs
            them equal).
        store: online item store (``torchrec_mm.serving``, records of
            ``serving.fields.qarm_schema``) the codes of each batch's items are read from
            instead of the artefact (new items written by ``torchrec-mm serve-items``
            get their codes at once; items missing from it get the no-code index);
            ``store_version``: only records of that version. The artefact still gives
            the vocabulary sizes.
    """

    codes: str = "qarm_codes"
    use_vq: bool = True
    vq_k: int = 0
    use_rq: bool = True
    user_len: int = 32
    user_vq: bool = False
    levels: int = 0
    match_len: int = 8
    cross: str = "attention"
    embedding_dim: int = 0
    store: Optional[str] = None
    store_version: Optional[str] = None

    def __post_init__(self) -> None:
        if not (self.use_vq or self.use_rq):
            raise ValueError("qarm: use_vq and use_rq are both off: no feature")
        if self.cross not in CROSS:
            raise ValueError(f"qarm: unknown cross '{self.cross}', expected one of {CROSS}")
        for name in ("user_len", "levels", "match_len", "embedding_dim", "vq_k"):
            if getattr(self, name) < 0:
                raise ValueError(f"qarm: option {name} must be >= 0, got {getattr(self, name)}")


class _CodeTransform:
    """``Batch -> Batch``: the batch's KJT with the QARM code features appended
    (picklable, so data-loader workers can run it).

    Without ``user_vq`` the target's VQ codes are built by a second, VQ-only call, so
    the history's VQ expansion (K values per history item) is never computed."""

    def __init__(self, rq: torch.Tensor, vq: Optional[torch.Tensor],
                 cfg: CodeFeatureConfig, user_vq: bool) -> None:
        self.rq, self.vq = rq, vq
        self.configs = [cfg]
        if cfg.use_vq and cfg.user_len and not user_vq:
            self.configs = [dataclasses.replace(cfg, use_vq=False),
                            dataclasses.replace(cfg, use_rq=False, user_len=0, levels=0)]

    def __call__(self, batch: Any) -> Any:
        kjt = batch.sparse_features
        extra = [code_feature_kjt(kjt, self.rq, self.vq if c.use_vq else None, c)
                 for c in self.configs]
        return dataclasses.replace(batch, sparse_features=KeyedJaggedTensor.concat([kjt] + extra))


class _StoreCodeTransform(_CodeTransform):
    """:class:`_CodeTransform` reading the codes of the batch's distinct items from an
    online item store: the item ids of the batch are renumbered to rows of a per-batch
    code table (the output features hold codes only, so they are unchanged). The store
    is opened lazily in each process (data-loader workers included)."""

    def __init__(self, location: str, version: Optional[str], vq_k: int,
                 cfg: CodeFeatureConfig, user_vq: bool) -> None:
        super().__init__(torch.empty(0, dtype=torch.long), None, cfg, user_vq)
        self.location, self.version, self.vq_k = location, version, vq_k
        self._store: Any = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None}

    def store(self) -> Any:
        if self._store is None:
            from torchrec_mm.serving.store import ItemStore

            self._store = ItemStore.open(self.location, create=False, readonly=True)
        return self._store

    def __call__(self, batch: Any) -> Any:
        kjt = batch.sparse_features
        cfg = self.configs[0]
        keys = [cfg.item_feature, cfg.history_feature]
        ids = torch.cat([kjt[k].values() for k in keys])
        uniq, inverse = torch.unique(ids, return_inverse=True)
        fields = ["rq"] + (["vq"] if self.vq_k else [])
        got, found = self.store().get(uniq, fields, version=self.version)
        rq = torch.where(found.unsqueeze(1) & (got["rq"] >= 0), got["rq"],
                         torch.full_like(got["rq"], cfg.rq_none))
        vq = None
        if self.vq_k:
            v = got["vq"][:, :self.vq_k]
            vq = torch.where(found.unsqueeze(1) & (v >= 0), v, torch.full_like(v, cfg.vq_none))
        local = _renumbered(kjt, keys, inverse)
        extra = [code_feature_kjt(local, rq, vq if c.use_vq else None, c)
                 for c in self.configs]
        return dataclasses.replace(batch, sparse_features=KeyedJaggedTensor.concat([kjt] + extra))


def _renumbered(kjt: KeyedJaggedTensor, keys: Any, rows: torch.Tensor) -> KeyedJaggedTensor:
    """A KJT of ``keys`` only whose values are ``rows`` (the keys' values concatenated,
    renumbered), same lengths."""
    lengths = torch.cat([kjt[k].lengths() for k in keys])
    return KeyedJaggedTensor(keys=list(keys), values=rows, lengths=lengths,
                             stride=kjt.stride())


@register_plugin("qarm")
class QARMPlugin(RankerPlugin):
    Options = QARMOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._codes: Any = None

    # ------------------------------------------------------------------ helpers
    def codes(self, ctx: PluginContext) -> Any:
        """The code artefact (``ctx.extras["qarm_codes"]`` or ``options.codes``)."""
        if self._codes is None:
            from torchrec_mm.qarm.codes import load_codes

            self._codes = ctx.extras.get("qarm_codes") or load_codes(
                ctx.resolve_path(self.options.codes))
            n = self._codes.rq.shape[0]
            if ctx.layout is not None and n < ctx.layout.num_items:
                raise ValueError(f"qarm: codes cover {n} items but the dataset has "
                                 f"{ctx.layout.num_items} ({self.options.codes})")
        return self._codes

    def feature_config(self, ctx: PluginContext) -> CodeFeatureConfig:
        codes = self.codes(ctx)
        o = self.options
        num_levels = int(codes.rq.shape[1])
        levels = 0 if (o.cross == "none" or not o.use_rq) else (o.levels or num_levels)
        if levels > num_levels:
            raise ValueError(f"qarm: levels {levels} > the codes' {num_levels} RQ levels")
        user_len = o.user_len if (o.use_rq or (o.use_vq and o.user_vq)) else 0
        return CodeFeatureConfig.from_codes(
            codes, levels=levels, match_len=o.match_len, user_len=user_len,
            use_vq=o.use_vq, use_rq=o.use_rq)

    def _dim(self, ctx: PluginContext) -> int:
        if self.options.embedding_dim:
            return self.options.embedding_dim
        if ctx.ranker is None:
            raise ValueError("qarm: needs the ranker config (or option embedding_dim)")
        return int(ctx.ranker.embedding_dim)

    # ------------------------------------------------------------------ contract
    def batch_transform(self, ctx: PluginContext) -> Optional[Callable[[Any], Any]]:
        codes = self.codes(ctx)
        cfg = self.feature_config(ctx)
        vq = None
        if cfg.use_vq:
            k = self.options.vq_k or int(codes.vq.shape[1])
            if k > codes.vq.shape[1]:
                raise ValueError(f"qarm: vq_k {k} > the {codes.vq.shape[1]} stored VQ codes")
            vq = codes.vq[:, :k].long().contiguous()
        o = self.options
        if o.store:
            store = o.store
            if "://" not in store and not store.endswith(".db"):
                store = ctx.resolve_path(store)
            return _StoreCodeTransform(store, o.store_version,
                                       (o.vq_k or int(codes.vq.shape[1])) if cfg.use_vq else 0,
                                       cfg, o.user_vq)
        return _CodeTransform(codes.rq.long(), vq, cfg, o.user_vq)

    def configure_tables(self, tables: Any, ctx: PluginContext) -> Any:
        cfg = self.feature_config(ctx)
        o = self.options
        d = self._dim(ctx)
        p = cfg.prefix
        num_levels = int(self.codes(ctx).rq.shape[1])
        vq_features = ([f"{p}_vq"] if o.use_vq else []) + \
            ([f"{p}_hist_vq"] if o.use_vq and o.user_vq and cfg.user_len else [])
        rq_features = ([f"{p}_rq"] if o.use_rq else []) + \
            ([f"{p}_hist_rq"] if o.use_rq and cfg.user_len else [])
        if o.cross == "pooled":
            rq_features += [f"{p}_match_l{lv}" for lv in range(1, cfg.levels + 1)]
        if vq_features:
            tables.pooled.append(EmbeddingBagConfig(
                name=f"t_{p}_vq", num_embeddings=cfg.vq_table_rows, embedding_dim=d,
                feature_names=vq_features, pooling=PoolingType.MEAN))
        if rq_features:
            tables.pooled.append(EmbeddingBagConfig(
                name=f"t_{p}_rq", num_embeddings=cfg.rq_table_rows(num_levels),
                embedding_dim=d, feature_names=rq_features, pooling=PoolingType.MEAN))
        return tables

    def wrap_collections(self, collections: Any, ctx: PluginContext) -> Any:
        if self.options.cross != "attention" or not self.feature_config(ctx).levels:
            return collections
        from torchrec_mm.qarm.modules import QARMCrossCollection

        cfg = self.feature_config(ctx)
        num_levels = int(self.codes(ctx).rq.shape[1])
        collections.ebc = QARMCrossCollection(
            collections.ebc, cfg.levels, num_levels, cfg.rq_table_rows(num_levels),
            self._dim(ctx), cfg.match_len, prefix=cfg.prefix)
        return collections

