"""``idproxy`` plugin: content proxies (IDProxy stage 1 + 2) in the item-ID slots.

Phase 2 of the plugin contract (``torchrec_mm.plugins``): ``wrap_collections`` wraps
the target-attention ranker's ``EmbeddingCollection`` by
:class:`~torchrec_mm.idproxy.modules.IDProxyEmbeddingCollection`, or DLRM's /
DLRM_DCN's ``EmbeddingBagCollection`` by
:class:`~torchrec_mm.idproxy.modules.IDProxyEmbeddingBagCollection`. The inner
collection stays a child, so DMP shards it as usual; the fine-proxy adaptor is dense
(DDP-replicated) and the proxies' frozen inputs are one more embedding table
(``t_idproxy_inputs``) that the planner shards like the ID tables.

Spec (``plugins/idproxy.yaml``)::

    plugins:
      - name: idproxy
        options: {proxies: out/idproxy, mode: augment}

Cold items (``cold_only``): an item is cold when it has fewer than ``cold_threshold``
training impressions (interactions of the ``train`` split; items of the cold split
have 0). Counts come from ``ctx.extras["samples"]`` (a ``RankingSamples``) when given,
else from the dataset ``ctx.data_dir`` (its interactions and ``split.json``).
"""

import os
import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from torchrec_mm.idproxy.artifacts import Proxies, load_proxies
from torchrec_mm.idproxy.modules import (
    IDProxyConfig,
    IDProxyEmbeddingBagCollection,
    IDProxyEmbeddingCollection,
)
from torchrec_mm.plugins import PluginContext, RankerPlugin, register_plugin


@dataclass
class IDProxyOptions:
    """Options of the ``idproxy`` plugin.

    Attributes:
        proxies: directory written by ``torchrec-mm idproxy fit`` (relative paths are
            resolved against the dataset directory's parent first, then the cwd).
        mode: ``augment`` | ``feature`` | ``swap`` | ``cold_only`` (see
            ``IDProxyConfig``).
        use_fine: train the stage-2 fine proxy (else stage-1 ``p_coarse`` only).
        cold_threshold: training impressions below which an item is cold.
        hidden_dim: hidden size of the fine-proxy adaptor.
        z_rank: principal components per layer group the adaptor reads (0: all).
        feature_parts: mode ``feature``: ``coarse_fine`` or ``fine`` (only p_fine as
            features; see ``IDProxyConfig``).
        fine_run: a ranker run trained with this plugin (stage 2): its adaptor's p_fine
            of every item becomes a frozen table (continual training of the deployed
            ranker with stored proxies; see ``IDProxyConfig``). Resolved like
            ``proxies``.
        store: online item store (``torchrec_mm.serving``) the proxies' inputs are read
            from at every step instead of the artefact's table (new items written by
            ``torchrec-mm serve-items`` are served at once); ``store_version``: only
            records of that version. The artefact still gives the dims and the basis.
        history_grad: false: the history items' fine proxies are computed without
            gradient, the adaptor learns from the target items' alone (faster stage 2;
            see ``IDProxyConfig``).
        history_refresh: k > 0 (with history_grad false): the history items' proxies
            are read from a table the adaptor rewrites every k training steps
            (``t_idproxy_history``), the target items' computed live (see
            ``IDProxyConfig``).
    """

    proxies: str = "idproxy"
    mode: str = "augment"
    use_fine: bool = True
    cold_threshold: int = 5
    hidden_dim: int = 64
    z_rank: int = 32
    store: Optional[str] = None
    store_version: Optional[str] = None
    feature_parts: str = "coarse_fine"
    fine_run: Optional[str] = None
    history_grad: bool = True
    history_refresh: int = 0


def train_impression_counts(ctx: PluginContext, num_items: int) -> np.ndarray:
    """[num_items] int64: training impressions per item (0 for cold-split items)."""
    from torchrec_mm.data.batching import SPLIT_TRAIN

    samples = ctx.extras.get("samples")
    if samples is not None:
        item, split = samples.item, samples.split
    else:
        if not ctx.data_dir or not os.path.isdir(ctx.data_dir):
            raise ValueError("idproxy mode 'cold_only' needs the training impressions: give "
                             "the dataset directory (ctx.data_dir) or ctx.extras['samples']")
        from torchrec_mm.data.io import load_interaction_columns
        from torchrec_mm.data.split import load_split

        cols = load_interaction_columns(ctx.data_dir, ["user_id", "item_id", "timestamp"])
        item = cols["item_id"]
        split = load_split(ctx.data_dir).assign(cols["item_id"], cols["timestamp"],
                                                cols["user_id"])
    item = np.asarray(item, dtype=np.int64)
    train = item[np.asarray(split) == SPLIT_TRAIN]
    if train.size and int(train.max()) >= num_items:
        raise ValueError(f"idproxy: training item {int(train.max())} is outside the "
                         f"{num_items} proxies")
    return np.bincount(train, minlength=num_items).astype(np.int64)


@register_plugin("idproxy")
class IDProxyPlugin(RankerPlugin):
    Options = IDProxyOptions

    def config(self) -> IDProxyConfig:
        o = self.options
        return IDProxyConfig(mode=o.mode, use_fine=o.use_fine, cold_threshold=o.cold_threshold,
                             hidden_dim=o.hidden_dim, z_rank=o.z_rank, store=o.store,
                             store_version=o.store_version, feature_parts=o.feature_parts,
                             fine_run=o.fine_run, history_grad=o.history_grad,
                             history_refresh=o.history_refresh)

    def cold_mask(self, ctx: PluginContext, num_items: int) -> torch.Tensor:
        counts = train_impression_counts(ctx, num_items)
        return torch.from_numpy(counts < self.options.cold_threshold)

    def wrap_collections(self, collections: Any, ctx: PluginContext) -> Any:
        config = self.config()
        if config.store and "://" not in config.store and not config.store.endswith(".db"):
            config = dataclasses.replace(config, store=ctx.resolve_path(config.store))
        if config.fine_run:
            config = dataclasses.replace(config, fine_run=ctx.resolve_path(config.fine_run))
        proxies: Proxies = ctx.extras.get("idproxy_proxies") or load_proxies(
            ctx.resolve_path(self.options.proxies))
        cold: Optional[torch.Tensor] = None
        if config.mode == "cold_only":
            cold = self.cold_mask(ctx, proxies.num_items)
        if config.mode == "feature":
            item_table = None
            ec = collections.ec
            while isinstance(ec, IDProxyEmbeddingCollection):  # stacked on a slot plugin:
                ec = ec.embedding_collection                   # the ID table's own dim
            if ec is not None:
                item_table = next((c for c in ec.embedding_configs()
                                   if config.item_feature in c.feature_names), None)
            collections.ebc = IDProxyEmbeddingBagCollection(collections.ebc, proxies, config,
                                                            cold, item_table=item_table)
        elif collections.ec is not None:
            collections.ec = IDProxyEmbeddingCollection(collections.ec, proxies, config, cold)
        else:
            collections.ebc = IDProxyEmbeddingBagCollection(collections.ebc, proxies, config,
                                                            cold)
        return collections
