"""The store records of the two methods — one contract between the writer
(``torchrec-mm serve-items``, the backfill of trained artefacts) and the readers (the
``idproxy`` and ``qarm`` plugins with a ``store`` option, the scorer).

IDProxy store (:func:`idproxy_schema`), one record per item:

* ``p_coarse`` float32[d] — the stage-1 proxy (ℓ2-normalised);
* ``z`` float32[G*r] — the layer-group states the stage-2 adaptor reads, already
  projected exactly as :class:`~torchrec_mm.idproxy.modules.FineProxy` projects them
  (the artefact's per-group principal basis, ``z_rank`` r; the flattened ``G*D``
  states for ``z_rank`` 0), so a reader feeds them to φ̃ as they are. The ranker's
  ``idproxy`` ``z_rank`` and the writer's must be equal (the schema width checks it).

QARM store (:func:`qarm_schema`): ``vq`` int32[K] (the item's K nearest codebook items;
``fill`` -1 = no code) and ``rq`` int32[L] (the residual codes; ``fill`` -1).

A record's ``version`` names the artefact that produced it (:func:`artifact_version`):
readers may ask for that version only, so a store holding records of a newer model is
not silently mixed with an older ranker.
"""

import hashlib
import os
from typing import TYPE_CHECKING

import numpy as np
import torch

from torchrec_mm.serving.schema import FieldSpec, StoreSchema

if TYPE_CHECKING:
    from torchrec_mm.idproxy.artifacts import Proxies
    from torchrec_mm.qarm.codes import QARMCodes
    from torchrec_mm.serving.store import ItemStore

IDPROXY_FIELDS = ("p_coarse", "z")
QARM_FIELDS = ("vq", "rq")


def idproxy_schema(dim: int, z_width: int) -> StoreSchema:
    """``p_coarse`` float32[dim], ``z`` float32[z_width]."""
    return StoreSchema.of(p_coarse=FieldSpec("float32", (int(dim),)),
                          z=FieldSpec("float32", (int(z_width),)))


def qarm_schema(vq_k: int, levels: int) -> StoreSchema:
    """``vq`` int32[vq_k] and ``rq`` int32[levels], missing = -1."""
    return StoreSchema.of(vq=FieldSpec("int32", (int(vq_k),), fill=-1),
                          rq=FieldSpec("int32", (int(levels),), fill=-1))


def project_states(z_groups: torch.Tensor, z_mean: "torch.Tensor | None",
                   z_basis: "torch.Tensor | None", z_rank: int) -> torch.Tensor:
    """[n, G, D] layer-group states -> [n, G*r] adaptor inputs (the ``z`` field):
    centred and projected on each group's first r principal components, or flattened
    when ``z_rank`` is 0 / there is no basis."""
    z = z_groups.float()
    if z_rank > 0:
        if z_basis is None or z_mean is None:
            raise ValueError("project_states: z_rank > 0 needs the artefact's per-group basis "
                             "(z_mean, z_basis; written by `torchrec-mm idproxy fit`)")
        r = min(int(z_rank), z_basis.shape[2])
        z = torch.einsum("ngd,gdr->ngr", z - z_mean.float(), z_basis[:, :, :r].float())
    return z.flatten(1)


def idproxy_projection(proxies: "Proxies", z_rank: int
                       ) -> "tuple[torch.Tensor | None, torch.Tensor | None, int]":
    """(z_mean, z_basis, r) of the ``z`` field, chosen as the ranker's
    :class:`~torchrec_mm.idproxy.modules.FineProxy` chooses them: the artefact's basis
    when it has at least ``min(z_rank, D)`` columns, else the (deterministic)
    ``group_basis`` of the artefact's states; r = 0 (the flattened states) for
    ``z_rank`` 0."""
    from torchrec_mm.idproxy.artifacts import group_basis

    if z_rank <= 0:
        return None, None, 0
    mean, basis = proxies.z_mean, proxies.z_basis
    if basis is None or basis.shape[2] < min(z_rank, int(proxies.z_groups.shape[2])):
        mean, basis = group_basis(proxies.z_groups.float(), z_rank)
    return mean, basis, min(int(z_rank), int(basis.shape[2]))


def idproxy_catalogue_ids(proxies: "Proxies", ids: np.ndarray) -> np.ndarray:
    """The ids (of ``ids``) the artefact has a record for: inside it, with content."""
    ids = as_ids(ids)
    inside = ids[(ids >= 0) & (ids < proxies.num_items)]
    return inside[proxies.has_content.numpy().astype(bool)[inside]]


def idproxy_catalogue(proxies: "Proxies", ids: np.ndarray,
                      projection: "tuple[torch.Tensor | None, torch.Tensor | None, int]"
                      ) -> "dict[str, torch.Tensor]":
    """The records of catalogue ``ids`` from the artefact (``projection``:
    :func:`idproxy_projection`)."""
    rows = torch.from_numpy(as_ids(ids))
    return {"p_coarse": proxies.p_coarse[rows].float(),
            "z": project_states(proxies.z_groups[rows], *projection)}


def qarm_catalogue_ids(codes: "QARMCodes", ids: np.ndarray) -> np.ndarray:
    """The ids (of ``ids``) the codes artefact has a code for."""
    ids = as_ids(ids)
    inside = ids[(ids >= 0) & (ids < codes.num_items)]
    return inside[codes.has_code.numpy().astype(bool)[inside]]


def qarm_catalogue(codes: "QARMCodes", ids: np.ndarray) -> "dict[str, torch.Tensor]":
    """The ``vq`` / ``rq`` records of catalogue ``ids``."""
    rows = torch.from_numpy(as_ids(ids))
    return {"vq": codes.vq[rows].to(torch.int32), "rq": codes.rq[rows].to(torch.int32)}


def write_idproxy_records(store: "ItemStore", proxies: "Proxies", ids: np.ndarray,
                          version: str, z_rank: int = 32) -> int:
    """Puts the records of ``ids`` (items with content only) from a stage-1 artefact;
    returns how many were written."""
    ids = idproxy_catalogue_ids(proxies, ids)
    if not len(ids):
        return 0
    return store.put(ids, idproxy_catalogue(proxies, ids, idproxy_projection(proxies, z_rank)),
                     version)


def write_qarm_records(store: "ItemStore", codes: "QARMCodes", ids: np.ndarray,
                       version: str) -> int:
    """Puts the VQ/RQ codes of ``ids`` (items with a code only) from a codes artefact."""
    ids = qarm_catalogue_ids(codes, ids)
    if not len(ids):
        return 0
    return store.put(ids, qarm_catalogue(codes, ids), version)


def artifact_version(path: str) -> str:
    """A short content hash of an artefact directory's metadata files (``meta.json``,
    ``codes_meta.json``, ...): the ``version`` of the records it produces."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name.endswith(".json"):
            with open(os.path.join(path, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    return f"{os.path.basename(os.path.normpath(path))}-{h.hexdigest()[:12]}"


def as_ids(ids: "np.ndarray | torch.Tensor | list") -> np.ndarray:
    """int64 numpy ids."""
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    return np.asarray(ids, dtype=np.int64)


__all__ = ["IDPROXY_FIELDS", "QARM_FIELDS", "artifact_version", "as_ids", "idproxy_catalogue",
           "idproxy_catalogue_ids", "idproxy_projection", "idproxy_schema", "project_states",
           "qarm_catalogue", "qarm_catalogue_ids", "qarm_schema", "write_idproxy_records",
           "write_qarm_records"]
