"""Proxies for new items from raw content: IDProxy's generation service (§3.2.4).

A new item arrives with text (and an image); the frozen stage-1 model gives its
coarse proxy and layer-group states, and the stage-2 adaptor trained with the ranker
turns them into the fine proxy::

    gen = ProxyGenerator.load("proxies/", run="runs/v5")     # run: optional
    out = gen.generate(["Title: ... Genres: ..."])
    out.p_coarse   # [n, d]
    out.z_groups   # [n, G, D]
    out.p_fine     # [n, d]   (None without a run)

``gen.fine`` is the ranker's :class:`~torchrec_mm.idproxy.modules.FineProxy` with its
trained weights (read from the run's last checkpoint), so ``p_fine`` is exactly what the
ranker would compute for the item had its states been in the artefact.
"""

import os
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch

from torchrec_mm.idproxy.artifacts import Proxies, load_proxies
from torchrec_mm.idproxy.coarse import CoarseProxyModel, load_coarse_model
from torchrec_mm.idproxy.artifacts import group_basis
from torchrec_mm.idproxy.modules import FineProxy

FINE_KEY = ".source.fine."


@dataclass
class GeneratedProxies:
    """Proxies of n new items, rows in input order."""

    p_coarse: torch.Tensor
    z_groups: torch.Tensor
    p_fine: Optional[torch.Tensor]


def load_fine_weights(run_dir: str) -> Dict[str, torch.Tensor]:
    """The trained stage-2 adaptor (``adaptor.*``, ``gate.*``, ``coarse_map.*``) from the
    last checkpoint of a ranker run trained with the ``idproxy`` plugin."""
    from torchrec_mm.training import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    if latest is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints has no checkpoint")
    _, _, tensors = ckpt.read_checkpoint(latest)
    found: Dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key.startswith("/model/") and FINE_KEY in key:
            found[key.split(FINE_KEY, 1)[1]] = t
    if not found:
        raise ValueError(f"{latest}: no fine-proxy weights ('*{FINE_KEY}*'); was the run "
                         "trained with the idproxy plugin and use_fine: true?")
    return found


def load_fine_proxy(run_dir: str, proxies: Proxies) -> FineProxy:
    """The trained stage-2 adaptor + gate of ``run_dir`` (eval mode) for items given by
    their states (:meth:`FineProxy.fine_of`): the run's weights and layer-group basis,
    not its frozen input table (the run's catalogue)."""
    weights = load_fine_weights(run_dir)
    hidden = int(weights["adaptor.0.weight"].shape[0])
    z_rank = int(weights["input_rank"])
    z_mean, z_basis = proxies.z_mean, proxies.z_basis
    if z_rank and (z_basis is None or z_basis.shape[2] < min(z_rank, proxies.z_groups.shape[2])):
        # an artefact without a stored basis: the run's FineProxy computed it from the
        # whole catalogue's states (non-persistent buffers), so do the same
        z_mean, z_basis = group_basis(proxies.z_groups.float(), z_rank)
    fine = FineProxy(proxies.p_coarse[:1], proxies.z_groups[:1], hidden, z_rank=z_rank,
                     z_mean=z_mean, z_basis=z_basis)
    wanted = [k for k in fine.state_dict() if not k.startswith("inputs.")]
    missing = sorted(set(wanted) - set(weights))
    if missing:
        raise ValueError(f"{run_dir}: fine-proxy weights lack {missing}")
    fine.load_state_dict({k: weights[k] for k in wanted}, strict=False)
    return fine.train(False)


@torch.no_grad()
def catalogue_fine_proxies(fine: FineProxy, proxies: Proxies, batch_size: int = 65536
                           ) -> torch.Tensor:
    """[N, d] p_fine of every item of the artefact (zero for items without content),
    as the deployment writes them to online storage (paper §3.2.4)."""
    n = proxies.num_items
    out = torch.zeros(n, proxies.dim)
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        out[lo:hi] = fine.fine_of(proxies.p_coarse[lo:hi], proxies.z_groups[lo:hi])
    out[~proxies.has_content.bool()] = 0.0
    return out


class ProxyGenerator:
    """Stage-1 model + (optionally) the trained stage-2 adaptor, for new items.

    Args:
        coarse: the stage-1 model (``load_coarse_model``).
        proxies: the artefact (for the layer-group basis and the dims).
        fine: a FineProxy with trained weights, or None (coarse proxies only).
        batch_size: items per encoder forward.
    """

    def __init__(self, coarse: CoarseProxyModel, proxies: Proxies,
                 fine: Optional[FineProxy] = None, batch_size: int = 64) -> None:
        self.coarse = coarse
        self.proxies = proxies
        self.fine = fine
        self.batch_size = batch_size

    @classmethod
    def load(cls, proxies_dir: str, run: Optional[str] = None, device: str = "cpu",
             batch_size: int = 64) -> "ProxyGenerator":
        proxies = load_proxies(proxies_dir)
        coarse = load_coarse_model(proxies_dir, device=device)
        # the trained adaptor only: new items' inputs come from their text
        fine = load_fine_proxy(run, proxies) if run is not None else None
        return cls(coarse, proxies, fine, batch_size)

    @torch.no_grad()
    def generate(self, texts: Sequence[str], images: Optional[Sequence] = None,
                 progress: bool = False) -> GeneratedProxies:
        """texts [n] (and images) → proxies of the n items."""
        out = self.coarse.encoder.encode_texts(list(texts), images, batch_size=self.batch_size,
                                              bucket=True, progress=progress)
        p_coarse = self.coarse.head(out.pooled.to(self.coarse.encoder.device)).cpu().float()
        z = out.layer_groups.float()
        p_fine = None
        if self.fine is not None:
            p_fine = self.fine.fine_of(p_coarse, z)
        return GeneratedProxies(p_coarse=p_coarse, z_groups=z, p_fine=p_fine)
