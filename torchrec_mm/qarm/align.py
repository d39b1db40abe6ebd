"""QARM item alignment: batch-contrastive fine-tuning of the content encoder on
business item2item pairs (paper ``002_93e7adf76829e098`` §2.2).

Pairs come from :func:`torchrec_mm.qarm.pairs.mine_pairs` (the user's most similar
earlier positive in the ranker's item-ID space, and Swing neighbours). The model is the
content encoder ``M`` (top ``trainable_layers`` layers and the attention pooling
trainable) + an MLP head ``φ`` with ℓ2 normalisation; the loss is the symmetric
in-batch InfoNCE over pairs ``(a_i, b_i)`` (the other pairs' items are negatives):

    L = ½ [CE(h_a h_bᵀ / τ, I) + CE(h_b h_aᵀ / τ, I)]

Output (``out_dir``)::

    aligned.safetensors   reps [N, d] float32 ℓ2-normalised aligned representations of
                          every item (new ones too), has_rep [N] bool
    align_metrics.json    pair recall@K on held-out pairs before (the pre-trained
                          pooled content) and after every epoch, loss, counts
    fit_state/            per-epoch checkpoints (a rerun resumes)

``aligned.safetensors`` is what ``torchrec-mm qarm codes --reps`` reads.
With ``trainable_layers: 0`` the encoder is frozen: its pooled states are computed once
and only ``φ`` trains (seconds on CPU) — the CB2CF-style lower bound of alignment.
"""

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from torchrec_mm.content.encoder import ContentEncoder, ContentEncoderConfig
from torchrec_mm.idproxy.coarse import (
    CoarseProxyModel,
    ProxyHead,
    _Encoded,
    _proxies_of,
    resume_fit_state,
)
from torchrec_mm.training import checkpoint as ckpt
from torchrec_mm.utils.io import save_tensors, write_json

logger = logging.getLogger(__name__)

REPS_FILE = "aligned.safetensors"
METRICS_FILE = "align_metrics.json"
FIT_STATE_DIR = "fit_state"


@dataclass
class AlignConfig:
    """Alignment fine-tuning.

    Attributes:
        model_path: content encoder checkpoint (default: the bundled MiniLM).
        trainable_layers: top encoder layers fine-tuned (0: frozen encoder, head only).
        dim: d of the aligned representation.
        hidden: hidden width of φ.
        temperature: τ of the InfoNCE.
        lr_encoder / lr_head / weight_decay: AdamW.
        batch_size: pairs per step (2 × items per forward).
        epochs: passes over the training pairs.
        max_pairs: at most this many pairs (seeded sample) per epoch (0: all).
        max_length: prompt tokens.
        holdout_frac: pairs held out for recall@K.
        recall_ks: K of pair recall@K.
        sources / window: pair mining (``mine_pairs``).
        seed: seed.
        eval_batch_size: items per forward in evaluation / the final encoding.
        content_store: with ``trainable_layers: 0``, read the frozen pooled states
            from this content store (``torchrec-mm encode``) instead of encoding again.
    """

    model_path: Optional[str] = None
    trainable_layers: int = 1
    dim: int = 64
    hidden: int = 256
    temperature: float = 0.07
    lr_encoder: float = 1e-4
    lr_head: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 64
    epochs: int = 2
    max_pairs: int = 20_000
    max_length: int = 64
    holdout_frac: float = 0.1
    recall_ks: Tuple[int, ...] = (10, 50)
    sources: Tuple[str, ...] = ("history", "swing")
    window: int = 50
    seed: int = 0
    eval_batch_size: int = 64
    content_store: Optional[str] = None

    def __post_init__(self) -> None:
        self.recall_ks = tuple(int(k) for k in self.recall_ks)
        self.sources = tuple(self.sources)
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (in-batch negatives)")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.holdout_frac < 1.0:
            raise ValueError(f"holdout_frac must be in (0, 1), got {self.holdout_frac}")
        if self.trainable_layers < 0 or self.epochs < 0 or self.dim < 1:
            raise ValueError("trainable_layers and epochs must be >= 0, dim >= 1")

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["recall_ks"], d["sources"] = list(self.recall_ks), list(self.sources)
        return d


def pair_loss(ha: torch.Tensor, hb: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric in-batch InfoNCE of ℓ2-normalised pair sides ``[B, d]``."""
    logits = ha @ hb.t() / temperature
    labels = torch.arange(ha.shape[0], device=ha.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def pair_recall(reps: torch.Tensor, a: np.ndarray, b: np.ndarray, candidates: np.ndarray,
                ks: Sequence[int]) -> Dict[str, float]:
    """Pair recall@K: share of held-out pairs whose ``b`` is among the K nearest
    (cosine) candidates of ``a``, ``a`` itself excluded (faiss, exact).

    Args:
        reps: [N, d] representations (any scale; normalised here).
        a / b: [P] item ids of the pairs; candidates: item ids searched.
    """
    import faiss

    x = F.normalize(reps.float(), dim=1).numpy()
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(np.ascontiguousarray(x[candidates]))
    kmax = min(max(ks) + 1, len(candidates))
    _, nb = index.search(np.ascontiguousarray(x[a]), kmax)
    nb = candidates[nb]
    valid = nb != a[:, None]  # drop the query item itself
    rank = np.cumsum(valid, axis=1)  # 1-based rank among the other items
    hit = valid & (nb == b[:, None])
    out = {f"recall@{k}": float((hit & (rank <= k)).any(1).mean()) if len(b) else 0.0
           for k in ks}
    out["chance@" + str(max(ks))] = min(max(ks), len(candidates) - 1) / max(len(candidates) - 1, 1)
    return out


def _fingerprint(config: AlignConfig, a: np.ndarray, b: np.ndarray, n_items: int) -> str:
    d = config.to_dict()
    d.pop("epochs")
    d.pop("eval_batch_size")
    h = hashlib.sha256(json.dumps(d, sort_keys=True).encode())
    h.update(a.tobytes())
    h.update(b.tobytes())
    h.update(str(n_items).encode())
    return h.hexdigest()[:16]


def align_items(data_dir: str, out_dir: str, config: Optional[AlignConfig] = None,
                item_emb: Optional[np.ndarray] = None, pairs: Optional[Dict[str, Any]] = None,
                encoder: Optional[ContentEncoder] = None, progress: bool = True
                ) -> Dict[str, Any]:
    """Mines pairs (unless given), fine-tunes, writes ``aligned.safetensors``.

    Args:
        data_dir: the dataset.
        out_dir: output directory (resumable).
        config: :class:`AlignConfig`.
        item_emb: [N, d_id] item-ID embeddings for the ``history`` pair source.
        pairs: precomputed ``{"a", "b"}`` (skips mining).
        encoder: an already built encoder.
        progress: tqdm bars.

    Returns:
        the metrics (also ``align_metrics.json``).
    """
    from tqdm.auto import tqdm

    from torchrec_mm.content.encode_job import read_items
    from torchrec_mm.qarm.pairs import mine_pairs

    config = config or AlignConfig()
    t0 = time.time()
    items = read_items(data_dir)
    n_items = items.num_items
    if pairs is None:
        sources = [s for s in config.sources if s != "history" or item_emb is not None]
        if not sources:
            raise ValueError("qarm align: no pair source (history needs the item-ID "
                             "embeddings of a ranker run)")
        pairs = mine_pairs(data_dir, sources, item_emb=item_emb, window=config.window)
    a_all, b_all = np.asarray(pairs["a"], np.int64), np.asarray(pairs["b"], np.int64)
    if encoder is None:
        encoder = ContentEncoder(ContentEncoderConfig(model_path=config.model_path,
                                                      max_length=config.max_length))
    encoder.set_trainable_layers(config.trainable_layers)
    texts = [""] * n_items
    images: List[Any] = [None] * n_items
    for i, t, im in zip(items.item_ids.tolist(), items.texts, items.image_paths):
        texts[i], images[i] = t, im
    use_images = encoder.is_multimodal and any(im is not None for im in images)
    has_rep = np.array([bool(t.strip()) or (use_images and im is not None)
                        for t, im in zip(texts, images)])
    keep = has_rep[a_all] & has_rep[b_all]
    a_all, b_all = a_all[keep], b_all[keep]
    if len(a_all) < 4:
        raise ValueError(f"qarm align: only {len(a_all)} pairs with content on both sides")
    rng = np.random.default_rng(config.seed)
    perm = rng.permutation(len(a_all))
    n_hold = max(1, int(round(config.holdout_frac * len(perm))))
    hold, train = np.sort(perm[:n_hold]), np.sort(perm[n_hold:])
    candidates = np.nonzero(has_rep)[0]
    enc = _Encoded(encoder, texts, images if use_images else None)
    torch.manual_seed(config.seed)
    head = ProxyHead(encoder.hidden_size, config.dim, config.hidden).to(encoder.device)
    model = CoarseProxyModel(encoder, head)
    frozen = config.trainable_layers == 0
    cached: Optional[torch.Tensor] = None
    if frozen:  # pooled states once; only φ (and nothing of M) trains
        for p in encoder.parameters():
            p.requires_grad_(False)
        cached = torch.zeros(n_items, encoder.hidden_size)
        if config.content_store:
            from torchrec_mm.content.store import ContentStore

            store = ContentStore(config.content_store)
            ids = torch.from_numpy(candidates)
            present = store.contains(ids)
            if not bool(present.all()):
                raise ValueError(f"content store {config.content_store} lacks item "
                                 f"{int(ids[~present][0])} (has content in {data_dir})")
            pooled = store.get(ids, "pooled").float()
            if pooled.shape[1] != encoder.hidden_size:
                raise ValueError(f"content store {config.content_store} has dim "
                                 f"{pooled.shape[1]}, the encoder {encoder.hidden_size}")
            cached[candidates] = pooled
        else:
            out = encoder.encode_texts([texts[i] for i in candidates],
                                       [images[i] for i in candidates] if use_images else None,
                                       batch_size=config.eval_batch_size, progress=progress)
            cached[candidates] = out.pooled.float()
    optimizer = torch.optim.AdamW(model.param_groups(config.lr_encoder, config.lr_head,
                                                     config.weight_decay))
    ks = config.recall_ks

    def reps_of(rows: np.ndarray) -> torch.Tensor:
        if cached is not None:
            with torch.no_grad():
                return head(cached[torch.from_numpy(rows)].to(encoder.device)).cpu()
        return _proxies_of(model, enc, rows, config.eval_batch_size)

    def evaluate() -> Dict[str, float]:
        reps = torch.zeros(n_items, config.dim)
        reps[candidates] = reps_of(candidates)
        return pair_recall(reps, a_all[hold], b_all[hold], candidates, ks)

    fingerprint = _fingerprint(config, a_all, b_all, n_items)
    state_root = os.path.join(out_dir, FIT_STATE_DIR)
    state: Dict[str, Any] = {"epoch": 0, "epochs": [], "fingerprint": fingerprint}
    saved = resume_fit_state(state_root, fingerprint, model, optimizer, "an alignment",
                             "pairs")
    if saved is not None:
        state = saved
    else:
        # before alignment: the pre-trained pooled content representation itself
        raw = cached if cached is not None else encoder.encode_texts(
            [texts[i] for i in candidates], batch_size=config.eval_batch_size).pooled
        if cached is None:
            full = torch.zeros(n_items, encoder.hidden_size)
            full[candidates] = raw.float()
            raw = full
        state["epochs"].append({"epoch": 0, **pair_recall(raw, a_all[hold], b_all[hold],
                                                          candidates, ks)})

    while state["epoch"] < config.epochs:
        epoch = state["epoch"] + 1
        torch.manual_seed(config.seed * 1000 + epoch)
        erng = np.random.default_rng([config.seed, epoch])
        rows = erng.permutation(train)
        if config.max_pairs and len(rows) > config.max_pairs:
            rows = rows[:config.max_pairs]
        batches = [rows[i:i + config.batch_size] for i in range(0, len(rows), config.batch_size)]
        batches = [bt for bt in batches if len(bt) >= 2]
        model.train(True)
        losses = []
        bar = tqdm(batches, desc=f"qarm align epoch {epoch}/{config.epochs}",
                   disable=not progress, dynamic_ncols=True)
        for bt in bar:
            ia, ib = a_all[bt], b_all[bt]
            if cached is not None:
                h = head(cached[torch.from_numpy(np.concatenate([ia, ib]))].to(encoder.device))
            else:
                h = model(**enc.inputs(encoder, np.concatenate([ia, ib])))
            loss = pair_loss(h[:len(bt)], h[len(bt):], config.temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.close()
        model.train(False)
        state["epoch"] = epoch
        state["epochs"].append({"epoch": epoch, "loss": float(np.mean(losses)), **evaluate()})
        ckpt.save_checkpoint(state_root, epoch, {
            "params": {n: p.detach() for n, p in model.trainable_named_parameters()},
            "optimizer": optimizer.state_dict(), "progress": state})
        logger.info("qarm align epoch %d: %s", epoch, state["epochs"][-1])

    reps = torch.zeros(n_items, config.dim)
    reps[candidates] = reps_of(candidates)
    os.makedirs(out_dir, exist_ok=True)
    save_tensors(os.path.join(out_dir, REPS_FILE),
                 {"reps": reps.contiguous(), "has_rep": torch.from_numpy(has_rep)})
    metrics = {
        "epochs": state["epochs"], "before": state["epochs"][0], "after": state["epochs"][-1],
        "num_pairs": int(len(a_all)), "num_train_pairs": int(len(train)),
        "num_holdout_pairs": int(len(hold)), "pair_stats": pairs.get("stats", {}),
        "num_items": n_items, "num_without_content": int((~has_rep).sum()),
        "config": config.to_dict(), "total_seconds": time.time() - t0,
    }
    write_json(os.path.join(out_dir, METRICS_FILE), metrics)
    return metrics
