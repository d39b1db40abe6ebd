"""The artefact that ``torchrec-mm idproxy fit`` writes and the plugin reads.

A proxies directory holds::

    proxies.safetensors   item_id   [N] int64   every item of the dataset (new ones too)
                          p_coarse  [N, d] float32, l2-normalised stage-1 proxies
                          z_groups  [N, G, D] float16, pooled hidden states of the G
                                    layer groups of the (stage-1 trained) encoder — the
                                    stage-2 adaptor's input
                          has_content [N] bool, False for items without text/image
                          z_mean    [G, D] float32 \  optional: per-group principal
                          z_basis   [G, D, R] float32 / subspace of z_groups (PCA, columns
                                    by decreasing variance); the stage-2 adaptor reads
                                    the states projected on the first r <= R columns
    proxies.json          {"dim": d, "content_dim": D, "num_groups": G, "num_items": N,
                           "tau": ..., "source_run": ..., "encoder": ..., "version": 1}

Both files are written atomically (safetensors first, the JSON last), so a reader
that finds ``proxies.json`` finds a complete artefact.
"""

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch

from torchrec_mm.utils.io import load_tensors, save_tensors, write_json

TENSORS_FILE = "proxies.safetensors"
META_FILE = "proxies.json"
VERSION = 1


@dataclass
class Proxies:
    """In-memory proxies, rows indexed by dense item id (``item_id == arange(N)``).

    Attributes:
        p_coarse: [N, d] float32 stage-1 proxies.
        z_groups: [N, G, D] layer-group states (float16 on disk, float32 here).
        has_content: [N] bool.
        meta: the JSON metadata.
    """

    p_coarse: torch.Tensor
    z_groups: torch.Tensor
    has_content: torch.Tensor
    meta: Dict[str, Any] = field(default_factory=dict)
    z_mean: Optional[torch.Tensor] = None
    z_basis: Optional[torch.Tensor] = None

    @property
    def num_items(self) -> int:
        return int(self.p_coarse.shape[0])

    @property
    def dim(self) -> int:
        return int(self.p_coarse.shape[1])


def group_basis(z_groups: torch.Tensor, rank: int, has: Optional[torch.Tensor] = None,
                sample: int = 20_000, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-group principal subspace of the layer-group states.

    Args:
        z_groups: [N, G, D] states.
        rank: R, components kept per group (capped at D and at the sample size).
        has: [N] bool rows to use (items with content); default all.
        sample: at most this many rows (seeded) enter the SVD.

    Returns:
        ``(mean [G, D], basis [G, D, R])``, float32, columns by decreasing variance:
        ``(z[:, g] - mean[g]) @ basis[g]`` are the first R principal coordinates of
        group g. Deterministic for a given input (float64 SVD on a seeded sample).
    """
    n, g, d = z_groups.shape
    rows = torch.arange(n) if has is None else torch.nonzero(has.bool()).flatten()
    if rows.numel() > sample:
        gen = torch.Generator().manual_seed(seed)
        rows = rows[torch.randperm(rows.numel(), generator=gen)[:sample]].sort().values
    x = z_groups[rows].double()
    r = max(1, min(rank, d, max(int(rows.numel()), 1)))
    mean = x.mean(dim=0) if rows.numel() else torch.zeros(g, d, dtype=torch.float64)
    basis = torch.zeros(g, d, r, dtype=torch.float64)
    for j in range(g):
        if rows.numel() < 2:
            basis[j] = torch.eye(d, r, dtype=torch.float64)
            continue
        _, _, vh = torch.linalg.svd(x[:, j] - mean[j], full_matrices=False)
        k = min(r, vh.shape[0])
        basis[j, :, :k] = vh[:k].T
    return mean.float(), basis.float()


def save_proxies(out_dir: str, proxies: Proxies) -> None:
    n = proxies.num_items
    for name, t in (("z_groups", proxies.z_groups), ("has_content", proxies.has_content)):
        if t.shape[0] != n:
            raise ValueError(f"{name} has {t.shape[0]} rows, p_coarse has {n}")
    if not torch.isfinite(proxies.p_coarse).all():
        bad = int(torch.nonzero(~torch.isfinite(proxies.p_coarse).all(dim=1))[0])
        raise ValueError(f"p_coarse of item {bad} is not finite")
    os.makedirs(out_dir, exist_ok=True)
    save_tensors(os.path.join(out_dir, TENSORS_FILE), {
        "item_id": torch.arange(n, dtype=torch.long),
        "p_coarse": proxies.p_coarse.float(),
        "z_groups": proxies.z_groups.half(),
        "has_content": proxies.has_content.bool(),
        **({} if proxies.z_basis is None else {"z_mean": proxies.z_mean.float(),
                                                "z_basis": proxies.z_basis.float()}),
    })
    meta = {**proxies.meta, "dim": proxies.dim, "content_dim": int(proxies.z_groups.shape[-1]),
            "num_groups": int(proxies.z_groups.shape[1]), "num_items": n, "version": VERSION}
    write_json(os.path.join(out_dir, META_FILE), meta)


def load_proxies(out_dir: str) -> Proxies:
    """Reads a proxies directory; clear errors for missing or inconsistent files."""
    meta_path = os.path.join(out_dir, META_FILE)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{meta_path} not found: run `torchrec-mm idproxy fit` first")
    with open(meta_path) as f:
        meta = json.load(f)
    t = load_tensors(os.path.join(out_dir, TENSORS_FILE))
    n = int(meta["num_items"])
    if not torch.equal(t["item_id"], torch.arange(n)):
        raise ValueError(f"{out_dir}/{TENSORS_FILE}: item_id must be 0..{n - 1}")
    z = t["z_groups"].float()
    if not torch.isfinite(z).all():
        bad = int(torch.nonzero(~torch.isfinite(z).flatten(1).all(dim=1))[0])
        raise ValueError(f"{out_dir}/{TENSORS_FILE}: z_groups of item {bad} has NaN/Inf")
    basis = t.get("z_basis")
    if basis is not None and tuple(basis.shape[:2]) != tuple(z.shape[1:]):
        raise ValueError(f"{out_dir}/{TENSORS_FILE}: z_basis has shape {tuple(basis.shape)}, "
                         f"expected [{z.shape[1]}, {z.shape[2]}, R]")
    return Proxies(p_coarse=t["p_coarse"].float(), z_groups=z,
                   has_content=t["has_content"].bool(), meta=meta,
                   z_mean=t.get("z_mean"), z_basis=basis)
