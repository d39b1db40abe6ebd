"""The item tower's output cached for serving (paper ``001_42c7267e32b49bc6`` §4.3: item
embeddings are computed offline for the catalogue and indexed; only the user tower
runs per request).

``torchrec-mm redrec embed-items --run RUN --out DIR [--index HNSW32]`` writes::

    DIR/
      items.safetensors   # vectors [N, d] float32, unit norm (the item side of RUN's
                          # latest checkpoint: learned item-ID rows, or the item tower
                          # -- frozen content vectors or the jointly trained top layers
                          # -- through the projection), for every catalogue id
                          # and, for a run with an item bias, bias [N]
      manifest.json       # written last: run, config_hash, checkpoint, step, N, d,
                          # item side, the index factory, item_bias / query_scale
                          # (1/τ: the index scores scale · cos + bias)

:func:`load_item_index` rebuilds the faiss :class:`~torchrec_mm.redrec.index.ItemIndex`
from it (exact ``"Flat"`` or any ``index_factory`` string); a run whose ``config.json``
changed since (another ``config_hash``) is refused, so served vectors always belong to
the user tower that queries them. Re-running with the same run and checkpoint reuses
the output.
"""

import json
import os
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from torchrec_mm.utils.io import load_tensors, read_manifest, save_tensors, write_json

__all__ = ["catalogue_vectors", "embed_items", "load_item_index"]

FORMAT = "torchrec-mm/redrec-items/v1"
VECTORS_FILE = "items.safetensors"
MANIFEST_FILE = "manifest.json"


@torch.no_grad()
def catalogue_vectors(tower: nn.Module, batch_size: int = 1024,
                      progress: bool = False) -> torch.Tensor:
    """``[num_items, d]`` unit item vectors of an (unsharded) :class:`UserTower`: the
    same vectors its ``forward_with_items`` gives candidates."""
    cfg = tower.config
    n = int(cfg.num_items)
    if cfg.item_embedding == "id":
        table = tower.embeddings.embeddings[f"{cfg.table_prefix}_item"].weight
        return F.normalize(table.detach().float(), dim=-1)
    parts = []
    for lo in tqdm(range(0, n, batch_size), desc="redrec embed-items", disable=not progress,
                   leave=False):
        ids = torch.arange(lo, min(lo + batch_size, n))
        parts.append(F.normalize(tower.encoder.content_items(ids).float(), dim=-1))
    return torch.cat(parts)


def embed_items(run: str, out: str, index: str = "Flat", batch_size: int = 1024,
                progress: bool = True) -> Dict[str, Any]:
    """Writes the catalogue vectors of ``run``'s latest checkpoint to ``out`` (module
    doc) and returns the manifest. ``index`` is recorded as the default of
    :func:`load_item_index` (checked by building it on the vectors)."""
    from torchrec_mm.redrec.index import IndexConfig, ItemIndex
    from torchrec_mm.redrec.user_features import load_model

    model, cfg, info = load_model(run)
    tower = model.tower
    manifest_path = os.path.join(out, MANIFEST_FILE)
    key = {"run": os.path.abspath(run), "config_hash": info["config_hash"],
           "checkpoint": info["checkpoint"], "index": index}
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            old = json.load(f)
        if {k: old.get(k) for k in key} == key:
            return old
    vectors = catalogue_vectors(tower, batch_size, progress)
    if not bool(torch.isfinite(vectors).all()):
        row = int((~torch.isfinite(vectors)).any(1).nonzero()[0, 0])
        raise ValueError(f"{run}: item {row} has a NaN/Inf vector (checkpoint "
                         f"{info['checkpoint']}); not written")
    tensors = {"vectors": vectors}
    scale = None
    if cfg.item_bias != "none":
        tensors["bias"] = model.item_bias.weight.detach().float().cpu()
        scale = 1.0 / float(model.tau().detach())
    # a bad factory fails before writing
    ItemIndex(vectors, IndexConfig(factory=index), item_bias=tensors.get("bias"),
              query_scale=scale or 1.0)
    save_tensors(os.path.join(out, VECTORS_FILE), tensors)
    manifest = {"format": FORMAT, **key, "step": info["step"],
                "item_bias": scale is not None, "query_scale": scale,
                "num_items": int(vectors.shape[0]), "dim": int(vectors.shape[1]),
                "item_embedding": cfg.item_embedding,
                "item_side": ("item_states" if cfg.item_states else
                              "content_store" if cfg.item_embedding == "content" else "id"),
                "source": cfg.item_states or cfg.content_store}
    write_json(manifest_path, manifest)
    return manifest


def load_item_index(path: str, index: Optional[str] = None,
                    check_run: bool = True) -> Tuple[Any, Dict[str, Any]]:
    """``(ItemIndex, manifest)`` of an ``embed-items`` directory; ``index`` overrides
    the recorded factory. With ``check_run`` the run's ``config.json`` must still hash
    to the manifest's ``config_hash``."""
    from torchrec_mm.redrec.index import IndexConfig, ItemIndex
    from torchrec_mm.redrec.user_features import run_config_hash

    manifest = read_manifest(path, MANIFEST_FILE, FORMAT,
                             "run `torchrec-mm redrec embed-items --run RUN --out DIR`")
    if check_run:
        _, digest = run_config_hash(manifest["run"])
        if digest != manifest["config_hash"]:
            raise ValueError(f"{path}: made from {manifest['run']} with config_hash "
                             f"{manifest['config_hash'][:12]}, the run's config.json now "
                             f"hashes to {digest[:12]}: run embed-items again")
    tensors = load_tensors(os.path.join(path, VECTORS_FILE))
    vectors = tensors["vectors"]
    if tuple(vectors.shape) != (manifest["num_items"], manifest["dim"]):
        raise ValueError(f"{path}: {VECTORS_FILE} is {tuple(vectors.shape)}, the manifest "
                         f"says [{manifest['num_items']}, {manifest['dim']}]")
    bias = None
    if manifest.get("item_bias"):
        bias = tensors.get("bias")
        if bias is None or tuple(bias.shape) != (manifest["num_items"],):
            raise ValueError(f"{path}: the manifest says the run has an item bias, "
                             f"{VECTORS_FILE} holds no [{manifest['num_items']}] 'bias'")
    return ItemIndex(vectors, IndexConfig(factory=index or manifest["index"]),
                     item_bias=bias, query_scale=manifest.get("query_scale") or 1.0), manifest
