"""Aligned representations of new items from their content: QARM's online side (§3:
new items are encoded by the aligned model, quantised with the trained codebooks).

``torchrec-mm qarm align`` writes the aligned representation of every catalogue item
(``aligned.safetensors``) and checkpoints the trained model (``fit_state/``).
:class:`AlignedRepresenter` rebuilds that model — the content encoder ``M`` with the
fine-tuned top layers and pooling, and the head ``φ`` — from the alignment directory,
so that a new item's representation is what ``qarm align`` would have written for it::

    rep = AlignedRepresenter.load("out/qarm/aligned")
    reps = rep.represent(["Title: ... Genres: ..."])          # [n, d], ℓ2-normalised
    vq, rq = load_codes("out/qarm/codes").assign_new(reps)    # [n, K], [n, L]

With a frozen encoder (``trainable_layers: 0``) the alignment may have read the
pooled states from a content store (``content_store``); the encoder is then the
store's own (:meth:`~torchrec_mm.content.store.ContentStore.build_encoder`: its model,
prompt, max length and pooling weights) and the pooled states are rounded to the
store's dtype before ``φ``, exactly as the catalogue's were.
"""

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import torch

from torchrec_mm.content.encoder import ContentEncoder, ContentEncoderConfig
from torchrec_mm.idproxy.coarse import CoarseProxyModel, ProxyHead
from torchrec_mm.qarm.align import FIT_STATE_DIR, METRICS_FILE, AlignConfig
from torchrec_mm.training import checkpoint as ckpt

__all__ = ["AlignedRepresenter", "load_align_config"]

_STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float32": torch.float32}


def load_align_config(align_dir: str) -> AlignConfig:
    """The :class:`AlignConfig` of a finished ``qarm align`` (from ``align_metrics.json``,
    which is written last)."""
    path = os.path.join(align_dir, METRICS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: no finished alignment in {align_dir!r}; "
                                "run `torchrec-mm qarm align`")
    with open(path) as f:
        raw = json.load(f)
    try:
        return AlignConfig(**raw["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: unreadable alignment config: {e}") from None


@dataclass
class AlignedRepresenter:
    """The trained alignment model ``φ ∘ g ∘ M`` for items outside the catalogue.

    Attributes:
        model: encoder (with pooling) + head, eval mode.
        pooled_dtype: the dtype the catalogue's pooled states were stored in before
            ``φ`` (a content store's, e.g. float16), or None (used as computed).
        batch_size: items per encoder forward.
        source: the alignment directory.
    """

    model: CoarseProxyModel
    pooled_dtype: Optional[torch.dtype] = None
    batch_size: int = 64
    source: str = ""

    @property
    def dim(self) -> int:
        """d of the aligned representations."""
        return int(self.model.head.mlp[2].out_features)

    @property
    def encoder(self) -> ContentEncoder:
        return self.model.encoder

    @classmethod
    def load(cls, align_dir: str, device: str = "cpu",
             batch_size: int = 64) -> "AlignedRepresenter":
        """Rebuilds the model of a finished ``qarm align`` run in ``align_dir``.

        Raises:
            FileNotFoundError: no ``align_metrics.json`` / no checkpoint (nor ``epochs:
                0``), or the content store of a frozen alignment is gone.
            ValueError: the checkpoint's parameters do not fit the configured model.
        """
        config = load_align_config(align_dir)
        pooled_dtype: Optional[torch.dtype] = None
        frozen = config.trainable_layers == 0
        if frozen and config.content_store:
            from torchrec_mm.content.store import ContentStore

            store = ContentStore(config.content_store)
            encoder = store.build_encoder(device=device)
            dtype = store.fields.get("pooled", {}).get("dtype", "float32")
            pooled_dtype = _STORE_DTYPES.get(dtype)
            if pooled_dtype is None:
                raise ValueError(f"{config.content_store}: unsupported pooled dtype {dtype!r}")
        else:
            encoder = ContentEncoder(ContentEncoderConfig(model_path=config.model_path,
                                                          max_length=config.max_length,
                                                          device=device))
        encoder.set_trainable_layers(config.trainable_layers)
        if frozen:  # align_items trains φ only: nothing of M is in the checkpoint
            for p in encoder.parameters():
                p.requires_grad_(False)
        latest = ckpt.latest_checkpoint(os.path.join(align_dir, FIT_STATE_DIR))
        if latest is None and config.epochs > 0:
            raise FileNotFoundError(f"{align_dir}/{FIT_STATE_DIR} has no checkpoint")
        params: Dict[str, torch.Tensor] = {}
        if latest is not None:
            _, _, tensors = ckpt.read_checkpoint(latest)
            params = {k[len("/params/"):]: v for k, v in tensors.items()
                      if k.startswith("/params/")}
        if params:
            w0, w2 = params.get("head.mlp.0.weight"), params.get("head.mlp.2.weight")
            if w0 is None or w2 is None:
                raise ValueError(f"{latest}: no head parameters (head.mlp.*)")
            head = ProxyHead(int(w0.shape[1]), int(w2.shape[0]), int(w0.shape[0]))
        else:  # epochs: 0 — the head as align_items initialised it
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                head = ProxyHead(encoder.hidden_size, config.dim, config.hidden)
        model = CoarseProxyModel(encoder, head.to(encoder.device))
        if params:
            live = dict(model.trainable_named_parameters())
            missing = sorted(set(live) - set(params))
            extra = sorted(set(params) - set(live))
            if missing or extra:
                raise ValueError(f"{latest}: the checkpoint does not fit the model of "
                                 f"{align_dir}/{METRICS_FILE} (missing {missing[:3]}, "
                                 f"unexpected {extra[:3]})")
            with torch.no_grad():
                for name, p in live.items():
                    if tuple(p.shape) != tuple(params[name].shape):
                        raise ValueError(f"{latest}: parameter {name} has shape "
                                         f"{tuple(params[name].shape)}, the model "
                                         f"{tuple(p.shape)}")
                    p.copy_(params[name])
        model.train(False)
        for p in model.parameters():
            p.requires_grad_(False)
        return cls(model=model, pooled_dtype=pooled_dtype, batch_size=batch_size,
                   source=align_dir)

    @torch.no_grad()
    def head_of(self, pooled: torch.Tensor) -> torch.Tensor:
        """[n, D] pooled content states -> [n, d] aligned representations."""
        if self.pooled_dtype is not None:
            pooled = pooled.to(self.pooled_dtype)
        return self.model.head(pooled.float().to(self.encoder.device)).cpu().float()

    @torch.no_grad()
    def represent(self, texts: Sequence[str], images: Optional[Sequence[Any]] = None,
                  progress: bool = False) -> torch.Tensor:
        """texts [n] (and images for a vision-language encoder) -> [n, d] float32
        ℓ2-normalised aligned representations, rows in input order."""
        out = self.encoder.encode_texts(list(texts), images, batch_size=self.batch_size,
                                        bucket=True, progress=progress)
        return self.head_of(out.pooled)
