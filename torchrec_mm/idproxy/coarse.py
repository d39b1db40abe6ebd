"""IDProxy stage 1: coarse proxies aligned to the ranker's item-ID embeddings (3.1).

An item's content goes through the content encoder ``M`` (IDProxy prompt with
``[EMB]``, attention pooling ``g``) and an MLP ``φ`` with ℓ2 normalisation::

    h̃_i = normalize(φ(g(M(x_i))))                                   [d]

trained with the Proxy Alignment Loss, in-batch InfoNCE against the ℓ2-normalised
ID embeddings ``e_i`` (eq. 1)::

    L_PAL = -1/|B| Σ_i log( exp(h̃_i·e_i/τc) / Σ_j exp(h̃_i·e_j/τc) )

``M`` (its top ``trainable_layers`` layers and ``g``) and ``φ`` are trained jointly
with AdamW. :func:`fit_coarse` trains, evaluates proxy→ID recall@K on held-out
target items (each item's own ID embedding ranked among all target embeddings by
cosine, faiss ``IndexFlatIP``), checkpoints every epoch (resumable) and writes the
proxies artefact (:mod:`torchrec_mm.idproxy.artifacts`) for *every* item of the
dataset: ``p_coarse = h̃`` and the layer-group states ``z_groups`` of the trained
encoder, the input of stage 2.
"""

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from torchrec_mm.content.encoder import ContentEncoder, ContentEncoderConfig
from torchrec_mm.idproxy.artifacts import Proxies, group_basis, save_proxies
from torchrec_mm.idproxy.targets import ItemTargets, load_item_targets
from torchrec_mm.training import checkpoint as ckpt
from torchrec_mm.utils.io import write_json

logger = logging.getLogger(__name__)

FIT_STATE_DIR = "fit_state"
METRICS_FILE = "fit_metrics.json"


@dataclass
class CoarseFitConfig:
    """Configuration of :func:`fit_coarse` (``torchrec-mm idproxy fit`` flags).

    Attributes:
        model_path: local HF checkpoint of the content encoder; ``None`` = MiniLM.
        trainable_layers: top transformer layers of ``M`` trained (0: only ``g``
            and ``φ``; -1: all).
        hidden: hidden width of ``φ``.
        temperature: τc of the InfoNCE loss.
        lr_encoder: AdamW learning rate of the encoder layers (paper: 1e-4).
        lr_head: AdamW learning rate of ``φ`` and the pooling ``g`` (newly
            initialised parts).
        weight_decay: AdamW weight decay.
        batch_size: items per step (the in-batch negatives).
        epochs: passes over the training target items.
        max_length: max prompt tokens.
        holdout_frac: fraction of the target items held out for recall@K.
        recall_ks: K of the recall metrics.
        seed: seed of the hold-out split, the batch order, dropout and ``φ``'s init.
        tau: minimum training impressions of a target item.
        eval_batch_size: items per forward pass in evaluation / the final encoding.
        group_sample: items sampled to compute the layer groups (0: equal split).
        basis_rank: principal components per layer group saved with the states
            (``z_basis``), from which the stage-2 adaptor takes its ``z_rank``.
        select_best: the proxies (and the model ``load_coarse_model`` returns) come
            from the epoch with the best held-out recall@max(recall_ks), not
            necessarily the last (the alignment overfits the training items of a small
            catalogue: training loss keeps falling while held-out recall turns down).
    """

    model_path: Optional[str] = None
    trainable_layers: int = 2
    hidden: int = 512
    temperature: float = 0.07
    lr_encoder: float = 1e-4
    lr_head: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 64
    epochs: int = 3
    max_length: int = 128
    holdout_frac: float = 0.1
    recall_ks: Tuple[int, ...] = (1, 10, 50)
    seed: int = 0
    tau: int = 5
    eval_batch_size: int = 64
    group_sample: int = 256
    basis_rank: int = 64
    select_best: bool = True

    def __post_init__(self) -> None:
        self.recall_ks = tuple(int(k) for k in self.recall_ks)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.holdout_frac < 1.0:
            raise ValueError(f"holdout_frac must be in (0, 1), got {self.holdout_frac}")
        for name in ("batch_size", "epochs", "hidden", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (in-batch negatives)")
        if not self.recall_ks or min(self.recall_ks) < 1:
            raise ValueError(f"recall_ks must be positive, got {self.recall_ks}")

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["recall_ks"] = list(self.recall_ks)
        return d


class ProxyHead(nn.Module):
    """``φ``: MLP ``D → hidden → d`` with GELU, then ℓ2 normalisation.

    Args:
        in_dim: D, content dim.
        out_dim: d, ID-embedding dim.
        hidden: hidden width.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 512) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` → ``[B, d]`` unit-norm proxies."""
        return F.normalize(self.mlp(z.float()), dim=-1)


class CoarseProxyModel(nn.Module):
    """Content encoder ``M`` (with pooling ``g``) + :class:`ProxyHead` ``φ``."""

    def __init__(self, encoder: ContentEncoder, head: ProxyHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Tokenized inputs (``encoder.tokenize``) → ``[B, d]`` proxies ``h̃``."""
        out = self.encoder(**inputs, return_all_layers=False)
        return self.head(out.pooled)

    def trainable_named_parameters(self) -> List[Tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def param_groups(self, lr_encoder: float, lr_head: float, weight_decay: float
                     ) -> List[Dict[str, Any]]:
        """AdamW groups: encoder layers at ``lr_encoder``; ``φ`` and the pooling ``g``
        (zero-initialised) at ``lr_head``."""
        enc, head = [], []
        for name, p in self.trainable_named_parameters():
            (head if name.startswith(("head.", "encoder.pooling.")) else enc).append(p)
        groups = [{"params": head, "lr": lr_head, "weight_decay": weight_decay}]
        if enc:
            groups.append({"params": enc, "lr": lr_encoder, "weight_decay": weight_decay})
        return groups


def proxy_alignment_loss(proxies: torch.Tensor, targets: torch.Tensor,
                         temperature: float) -> torch.Tensor:
    """In-batch InfoNCE (IDProxy eq. 1).

    Args:
        proxies: ``[B, d]`` ℓ2-normalised ``h̃``.
        targets: ``[B, d]`` ℓ2-normalised ID embeddings, row ``i`` the positive of
            proxy ``i``, the other rows its negatives.
        temperature: τc.

    Returns:
        scalar mean loss.
    """
    logits = proxies @ targets.t() / temperature
    labels = torch.arange(proxies.shape[0], device=proxies.device)
    return F.cross_entropy(logits, labels)


def recall_at_k(proxies: torch.Tensor, own: torch.Tensor, targets: torch.Tensor,
                ks: Sequence[int]) -> Dict[str, float]:
    """Proxy→ID recall@K: the share of proxies whose own ID embedding is among the K
    nearest (inner product) of all targets.

    Args:
        proxies: ``[n, d]`` query proxies.
        own: ``[n]`` int64 row of each proxy's own embedding in ``targets``.
        targets: ``[M, d]`` all target embeddings.
        ks: the K values (clipped to M).
    """
    import faiss

    m = int(targets.shape[0])
    kmax = min(max(ks), m)
    index = faiss.IndexFlatIP(int(targets.shape[1]))
    index.add(np.ascontiguousarray(targets.detach().float().cpu().numpy()))
    _, nn_ids = index.search(np.ascontiguousarray(proxies.detach().float().cpu().numpy()), kmax)
    hit = nn_ids == own.cpu().numpy()[:, None]  # [n, kmax]
    return {f"recall@{k}": float(hit[:, :min(k, m)].any(1).mean()) for k in ks}


def _length_bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                             pool: int = 16) -> List[np.ndarray]:
    """Shuffled batches of similar prompt lengths: a random permutation cut into pools
    of ``pool`` batches, each pool sorted by length and cut into batches, batch order
    shuffled. Batches of fewer than 2 items are dropped (no negative)."""
    perm = rng.permutation(len(lengths))
    batches = []
    for start in range(0, len(perm), pool * batch_size):
        chunk = perm[start:start + pool * batch_size]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    batches = [b for b in batches if len(b) >= 2]
    return [batches[i] for i in rng.permutation(len(batches))]


def _state_fingerprint(config: CoarseFitConfig, targets: ItemTargets, n_items: int) -> str:
    d = config.to_dict()
    d.pop("epochs")
    d.pop("eval_batch_size")
    d.pop("select_best", None)
    h = hashlib.sha256(json.dumps(d, sort_keys=True).encode())
    h.update(targets.item_ids.numpy().tobytes())
    h.update(targets.embeddings.numpy().tobytes())
    h.update(str(n_items).encode())
    return h.hexdigest()[:16]


class _Encoded:
    """Prompts of a set of items, rendered once."""

    def __init__(self, encoder: ContentEncoder, texts: List[str],
                 images: Optional[List[Any]]) -> None:
        flags = [im is not None for im in images] if images is not None else None
        self.prompts, self.lengths = encoder.render_prompts(texts, flags)
        self.images = images

    def inputs(self, encoder: ContentEncoder, idx: np.ndarray) -> Dict[str, torch.Tensor]:
        images = None if self.images is None else [self.images[i] for i in idx]
        return encoder._tokenize_prompts([self.prompts[i] for i in idx], images)


@torch.no_grad()
def _proxies_of(model: CoarseProxyModel, enc: _Encoded, rows: np.ndarray,
                batch_size: int) -> torch.Tensor:
    """``[len(rows), d]`` proxies in eval mode, length-bucketed."""
    was = model.training
    model.train(False)
    order = rows[np.argsort(-enc.lengths[rows], kind="stable")]
    out = []
    for start in range(0, len(order), batch_size):
        out.append(model(**enc.inputs(model.encoder, order[start:start + batch_size])).cpu())
    model.train(was)
    h = torch.cat(out)
    pos = np.empty(len(rows), dtype=np.int64)
    pos[np.argsort(-enc.lengths[rows], kind="stable")] = np.arange(len(rows))
    return h[torch.from_numpy(pos)]


def resume_fit_state(state_root: str, fingerprint: str, model: nn.Module,
                     optimizer: torch.optim.Optimizer, what: str, data: str
                     ) -> Optional[Dict[str, Any]]:
    """Loads the last per-epoch checkpoint of a fit (``/params/<name>`` of the model's
    trainable parameters, ``/optimizer``, ``/progress``) into ``model``/``optimizer``.

    Returns the saved progress dict, or None when there is no checkpoint. Raises
    ``FileExistsError`` when the checkpoint's fingerprint differs (``what`` / ``data``
    name the fit and its inputs in the message) and ``ValueError`` when a parameter
    is missing.
    """
    latest = ckpt.latest_checkpoint(state_root) if os.path.isdir(state_root) else None
    if latest is None:
        return None
    _, skeleton, tensors = ckpt.read_checkpoint(latest)
    saved = ckpt.restore(None, ckpt.child(skeleton, "progress"), tensors, "/progress")
    if saved.get("fingerprint") != fingerprint:
        raise FileExistsError(f"{state_root} holds {what} with other settings or {data}; "
                              "use another output directory or delete it")
    with torch.no_grad():
        for name, p in model.trainable_named_parameters():
            key = f"/params/{name}"
            if key not in tensors:
                raise ValueError(f"{latest}: no tensor '{key}'")
            p.copy_(tensors[key])
    optimizer.load_state_dict(ckpt.restore(None, ckpt.child(skeleton, "optimizer"),
                                           tensors, "/optimizer"))
    logger.info("resumed %s from %s (epoch %d)", what, latest, saved["epoch"])
    return saved


def fit_coarse(data_dir: str, run_dir: Optional[str], out_dir: str,
               config: Optional[CoarseFitConfig] = None, progress: bool = True, *,
               targets: Optional[ItemTargets] = None, table_file: Optional[str] = None,
               table_key: Optional[str] = None, encoder: Optional[ContentEncoder] = None,
               max_epochs_this_call: Optional[int] = None) -> Dict[str, Any]:
    """Trains stage 1 and writes the proxies artefact to ``out_dir``.

    Args:
        data_dir: the dataset (``items.parquet``, ``split.json``).
        run_dir: the ranker's ``torchrec-mm train`` run (targets source).
        out_dir: output: ``proxies.safetensors``/``proxies.json``,
            ``fit_metrics.json``, ``fit_state/`` (per-epoch checkpoints; a rerun
            resumes from the last one).
        config: :class:`CoarseFitConfig`.
        progress: tqdm bars.
        targets: explicit targets (instead of reading ``run_dir``).
        table_file / table_key: read the ID table from a safetensors file.
        encoder: an already built encoder (its trainable layers are set from
            ``config``); default: built from ``config.model_path``.
        max_epochs_this_call: stop after this many epochs and return without
            writing the artefact (for tests of resuming).

    Returns:
        the metrics dict (also in ``fit_metrics.json``): per-epoch ``loss`` and
        ``recall@K`` on held-out items (epoch 0 = before training), chance levels,
        counts and timings.
    """
    from tqdm.auto import tqdm

    from torchrec_mm.content.encode_job import compute_layer_grouping, read_items

    config = config or CoarseFitConfig()
    t0 = time.time()
    items = read_items(data_dir)
    n_items = items.num_items
    if targets is None:
        targets = load_item_targets(run_dir, config.tau, data_dir, table_file, table_key)
    if int(targets.item_ids.max()) >= n_items:
        raise ValueError(f"target item {int(targets.item_ids.max())} of {targets.table} is "
                         f"not an item of {data_dir} ({n_items} items)")
    if encoder is None:
        encoder = ContentEncoder(ContentEncoderConfig(model_path=config.model_path,
                                                      max_length=config.max_length))
    encoder.set_trainable_layers(config.trainable_layers)

    # items, indexed by dense item id (ids absent from items.parquet have no content)
    texts = [""] * n_items
    images: List[Any] = [None] * n_items
    for i, t, im in zip(items.item_ids.tolist(), items.texts, items.image_paths):
        texts[i], images[i] = t, im
    use_images = encoder.is_multimodal and any(im is not None for im in images)
    has_content = np.array([bool(t.strip()) or (use_images and im is not None)
                            for t, im in zip(texts, images)])

    ids = targets.item_ids.numpy()
    with_content = has_content[ids]
    if not with_content.all():
        logger.warning("%d target items have no content and are not trained on (e.g. item %d)",
                       int((~with_content).sum()), int(ids[~with_content][0]))
    t_rows = np.nonzero(with_content)[0]  # rows of targets used
    if len(t_rows) < 4:
        raise ValueError(f"only {len(t_rows)} target items with content: too few to train")
    rng = np.random.default_rng(config.seed)
    perm = rng.permutation(t_rows)
    n_hold = max(1, int(round(config.holdout_frac * len(perm))))
    hold_rows, train_rows = np.sort(perm[:n_hold]), np.sort(perm[n_hold:])

    enc_items = _Encoded(encoder, [texts[i] for i in ids],
                         [images[i] for i in ids] if use_images else None)
    torch.manual_seed(config.seed)
    head = ProxyHead(encoder.hidden_size, targets.dim, config.hidden).to(encoder.device)
    model = CoarseProxyModel(encoder, head)
    optimizer = torch.optim.AdamW(model.param_groups(config.lr_encoder, config.lr_head,
                                                     config.weight_decay))
    emb = targets.embeddings.to(encoder.device)
    ks = config.recall_ks

    def evaluate() -> Dict[str, float]:
        h = _proxies_of(model, enc_items, hold_rows, config.eval_batch_size)
        return recall_at_k(h, torch.from_numpy(hold_rows), targets.embeddings, ks)

    fingerprint = _state_fingerprint(config, targets, n_items)
    state_root = os.path.join(out_dir, FIT_STATE_DIR)
    progress_state: Dict[str, Any] = {"epoch": 0, "epochs": [], "fingerprint": fingerprint}
    saved = resume_fit_state(state_root, fingerprint, model, optimizer, "a fit", "targets")
    select_key = f"recall@{max(ks)}"
    # the trainable parameters of the best epoch so far (None: the current ones)
    best: Optional[Dict[str, torch.Tensor]] = None
    if saved is not None:
        progress_state = saved
        best = _saved_best(state_root)
    else:
        progress_state["epochs"].append({"epoch": 0, **evaluate()})

    epochs_run = 0
    step_seconds: List[float] = []
    while progress_state["epoch"] < config.epochs:
        if max_epochs_this_call is not None and epochs_run >= max_epochs_this_call:
            break
        epoch = progress_state["epoch"] + 1
        torch.manual_seed(config.seed * 1000 + epoch)  # dropout: same on resume
        batches = _length_bucketed_batches(enc_items.lengths[train_rows], config.batch_size,
                                           np.random.default_rng([config.seed, epoch]))
        model.train(True)
        losses = []
        bar = tqdm(batches, desc=f"idproxy fit epoch {epoch}/{config.epochs}",
                   disable=not progress, dynamic_ncols=True)
        for b in bar:
            rows = train_rows[b]
            t_step = time.time()
            h = model(**enc_items.inputs(encoder, rows))
            loss = proxy_alignment_loss(h, emb[torch.from_numpy(rows).to(emb.device)],
                                        config.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step_seconds.append(time.time() - t_step)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.close()
        model.train(False)
        progress_state["epoch"] = epoch
        progress_state["epochs"].append({"epoch": epoch, "loss": float(np.mean(losses)),
                                         "steps": len(losses), **evaluate()})
        params = {n: p.detach() for n, p in model.trainable_named_parameters()}
        best_epoch = int(progress_state.get("best_epoch", 0))
        if epoch == 1 or progress_state["epochs"][-1][select_key] > \
                progress_state["epochs"][best_epoch][select_key]:
            progress_state["best_epoch"] = epoch
            best = {n: p.clone() for n, p in params.items()}
        ckpt.save_checkpoint(state_root, epoch, {
            "params": params, "best": best if best is not None else params,
            "optimizer": optimizer.state_dict(), "progress": progress_state})
        epochs_run += 1
        logger.info("epoch %d: %s", epoch, progress_state["epochs"][-1])

    metrics: Dict[str, Any] = {
        "epochs": progress_state["epochs"],
        "epochs_run_this_call": epochs_run,
        "baseline": progress_state["epochs"][0],
        "final": progress_state["epochs"][-1],
        "chance": {f"recall@{k}": min(k, len(targets)) / len(targets) for k in ks},
        "num_targets": len(targets), "num_train": int(len(train_rows)),
        "num_holdout": int(len(hold_rows)), "num_items": n_items,
        "targets": {**targets.info, "table": targets.table},
        "config": config.to_dict(),
        "train_step_seconds": float(np.mean(step_seconds)) if step_seconds else None,
    }
    if progress_state["epoch"] < config.epochs:
        metrics["complete"] = False
        return metrics
    if config.select_best and best is not None:
        selected = int(progress_state["best_epoch"])
        with torch.no_grad():
            for name, p in model.trainable_named_parameters():
                p.copy_(best[name])
        metrics["final"] = progress_state["epochs"][selected]
        logger.info("proxies from epoch %d (best held-out %s)", selected, select_key)
    else:
        selected = int(progress_state["epoch"])
    metrics["selected_epoch"] = selected

    # -------------------------------------------------------- every item's proxies
    t_enc = time.time()
    grouping = compute_layer_grouping(encoder, items, config.group_sample, config.seed,
                                      config.eval_batch_size, use_images)
    encoder.set_layer_groups(grouping["layer_groups"])
    rows = np.nonzero(has_content)[0]
    p = torch.zeros(n_items, targets.dim)
    z = torch.zeros(n_items, len(encoder.layer_groups), encoder.hidden_size)
    if rows.size:
        model.train(False)
        out = encoder.encode_texts([texts[i] for i in rows],
                                   [images[i] for i in rows] if use_images else None,
                                   batch_size=config.eval_batch_size, bucket=True,
                                   progress=progress)
        with torch.no_grad():
            p[rows] = head(out.pooled.to(encoder.device)).cpu()
        z[rows] = out.layer_groups.float()
    metrics["encode_seconds"] = time.time() - t_enc
    metrics["layer_groups"] = grouping["layer_groups"]
    metrics["num_without_content"] = int((~has_content).sum())
    metrics["complete"] = True
    metrics["total_seconds"] = time.time() - t0
    z_mean, z_basis = group_basis(z, config.basis_rank, torch.from_numpy(has_content),
                                  seed=config.seed)
    save_proxies(out_dir, Proxies(
        p_coarse=p, z_groups=z, has_content=torch.from_numpy(has_content),
        z_mean=z_mean, z_basis=z_basis,
        meta={"tau": targets.info.get("tau", config.tau),
              "source_run": targets.info.get("source_run", run_dir),
              "table": targets.table,
              "encoder": {"model_path": encoder.config.model_path,
                          "trainable_layers": config.trainable_layers,
                          "max_length": encoder.max_length,
                          "layer_groups": grouping["layer_groups"]},
              "temperature": config.temperature,
              "selected_epoch": selected if config.select_best else None,
              "metrics": {"baseline": metrics["baseline"], "final": metrics["final"],
                          "chance": metrics["chance"]}}))
    write_json(os.path.join(out_dir, METRICS_FILE), metrics)
    return metrics


def _saved_best(state_root: str) -> Optional[Dict[str, torch.Tensor]]:
    """The ``/best/`` parameters of the latest fit checkpoint (None if it has none)."""
    latest = ckpt.latest_checkpoint(state_root)
    if latest is None:
        return None
    _, _, tensors = ckpt.read_checkpoint(latest)
    best = {k[len("/best/"):]: v for k, v in tensors.items() if k.startswith("/best/")}
    return best or None


def load_coarse_model(out_dir: str, device: str = "cpu") -> CoarseProxyModel:
    """The trained stage-1 model ``φ ∘ g ∘ M`` of a finished fit in ``out_dir``, to
    compute coarse proxies of new items from raw content::

        model = load_coarse_model("proxies/")
        out = model.encoder.encode_texts(texts)
        p_coarse = model.head(out.pooled)            # [n, d]

    The encoder is rebuilt from ``proxies.json`` (model path, max length, layer
    groups) and its trained parameters (and ``φ``) come from ``fit_state/``: those of
    the epoch the proxies were written from (``select_best``), else the last.
    """
    from torchrec_mm.idproxy.artifacts import META_FILE

    meta_path = os.path.join(out_dir, META_FILE)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{meta_path} not found: run `torchrec-mm idproxy fit` first")
    with open(meta_path) as f:
        meta = json.load(f)
    enc_info = meta.get("encoder") or {}
    latest = ckpt.latest_checkpoint(os.path.join(out_dir, FIT_STATE_DIR))
    if latest is None:
        raise FileNotFoundError(f"{out_dir}/{FIT_STATE_DIR} has no checkpoint")
    _, _, tensors = ckpt.read_checkpoint(latest)
    prefix = "/best/" if meta.get("selected_epoch") is not None and any(
        k.startswith("/best/") for k in tensors) else "/params/"
    params = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    encoder = ContentEncoder(ContentEncoderConfig(
        model_path=enc_info.get("model_path"), max_length=int(enc_info.get("max_length", 128)),
        layer_groups=enc_info.get("layer_groups"), device=device))
    encoder.set_trainable_layers(int(enc_info.get("trainable_layers", 0)))
    w0, w2 = params["head.mlp.0.weight"], params["head.mlp.2.weight"]
    head = ProxyHead(int(w0.shape[1]), int(w2.shape[0]), int(w0.shape[0])).to(encoder.device)
    model = CoarseProxyModel(encoder, head)
    live = dict(model.trainable_named_parameters())
    missing = sorted(set(live) - set(params))
    if missing:
        raise ValueError(f"{latest}: no saved parameter(s) {missing[:3]}")
    with torch.no_grad():
        for name, p in live.items():
            p.copy_(params[name])
    model.train(False)
    return model


def format_metrics(metrics: Dict[str, Any]) -> str:
    """A short human summary of :func:`fit_coarse`'s metrics."""
    lines = [f"targets: {metrics['num_targets']} items ({metrics['num_train']} train, "
             f"{metrics['num_holdout']} held out) of {metrics['num_items']}"]
    keys = [k for k in metrics["final"] if k.startswith("recall@")]
    for e in metrics["epochs"]:
        loss = f"loss {e['loss']:.4f}  " if "loss" in e else "(before training)  "
        lines.append(f"epoch {e['epoch']}: {loss}" + "  ".join(f"{k} {e[k]:.3f}" for k in keys))
    lines.append("chance: " + "  ".join(f"{k} {metrics['chance'][k]:.3f}" for k in keys))
    if metrics.get("selected_epoch") is not None:
        lines.append(f"proxies from epoch {metrics['selected_epoch']}")
    return "\n".join(lines)
