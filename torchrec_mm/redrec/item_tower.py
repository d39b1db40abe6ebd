"""The RED-Rec item tower trained jointly with the user tower (paper
``001_42c7267e32b49bc6`` appendix C, "Item encoder"; Table A3).

The paper's item tower is an LLM that reads an item's text behind a special token and
whose hidden state at that token is the item embedding; it is fine-tuned *jointly* with
the user tower, and freezing it ("Item LLM frozen", Table A3) costs more than half of
the recall. On a CPU the whole item LM cannot run for every item of every step, so the
tower is split where the content encoder's layers are (as IDProxy and QARM choose their
trainable layers): the bottom ``L - k`` layers stay frozen and run **once**, the top
``k`` layers train.

**Prepare** (:func:`build_item_states`, ``torchrec-mm redrec item-states``, experiment
step ``redrec_item_states``): every catalogue item's prompt (the
:class:`~torchrec_mm.content.encoder.ContentEncoder` template with its ``[EMB]``
token; an item without a row in ``items.parquet`` gets the prompt of an empty text)
runs through the frozen encoder — with a vision-language encoder (LLaVA-style) and an
``image_path``, the item's image through its vision path, so the states hold the image
tokens — and the hidden states that enter its top ``k`` layers are stored, with the top
``k`` layers (of the language model) as a Hugging Face checkpoint::

    OUT/
      lm/                    # HF checkpoint: the encoder backbone's top k layers
      states.safetensors     # states [n_tokens, H] fp16 (the valid tokens of every
                             # item, item after item), offsets [N + 1], readout [N]
                             # (position of [EMB] within its item)
      item_states.json       # written last: settings, sizes, the parity check

A dataset of N items with T tokens each takes ``N * T * H * 2`` bytes (MovieLens
100K, MiniLM, k = 1: ~40 MB); the file is memory-mapped, not loaded. The build checks
that the top ``k`` layers run from the stored states reproduce the full encoder's
``[EMB]`` state (``parity_max_abs_err``, fp16 rounding only) and refuses an
architecture for which they do not (the states are read as ``inputs_embeds``; for
encoder models whose embedding layer adds positions, BERT, that layer is replaced by a
pass-through: the positions are already in the states; a model whose positions depend
on the image layout, Qwen2-VL's M-RoPE, fails the check and is refused).

**Train** (:class:`ItemTower`, ``RedRecConfig.item_states``): ``forward(ids)`` pads the
stored states of the distinct items of a step, runs the top ``k`` layers and reads the
``[EMB]`` position: ``[n, H]``. The user tower projects them to ``d``
(``UserTowerEncoder.item_proj``) for history events, window items, negatives and the
evaluated catalogue alike; the gradient of the retrieval loss reaches the item layers.
Only the ``[EMB]`` position of the last layer is read, so that layer runs at that
position only (:func:`~torchrec_mm.redrec.readout.forward_at`; for a BERT-family LM
in the absorbed form, which projects no key or value): with ``k = 1`` a step costs the
query, output and feed-forward of one token per distinct item plus ``O(T H)`` per
head for its attention, 1/13 of running the layer over every token
(``benchmarks/bench_redrec_readout.py``); a MovieLens 100K joint run takes about 1.4x a run
with frozen item vectors.
"""

import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from torchrec_mm.redrec.readout import forward_at
from torchrec_mm.utils.io import read_manifest, save_tensors, write_json

logger = logging.getLogger(__name__)

__all__ = ["ITEM_INITS", "ITEM_STATES_FORMAT", "ItemTower", "build_item_states",
           "read_item_states_manifest"]

ITEM_STATES_FORMAT = "torchrec-mm/redrec-item-states/v1"
#: how the trained item layers start (``RedRecConfig.item_init``)
ITEM_INITS = ("pretrained", "scratch")
MANIFEST_FILE = "item_states.json"
STATES_FILE = "states.safetensors"
LM_DIR = "lm"
PARITY_TOL = 5e-2  # max |Δ| of the [EMB] state, fp16-stored inputs (values are O(1))


class _PassThroughEmbeddings(nn.Module):
    """Stands in for a BERT-style embedding layer: returns ``inputs_embeds`` unchanged
    (the stored states already hold the positions and token types)."""

    def forward(self, input_ids: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None, **_: Any) -> torch.Tensor:
        if inputs_embeds is None:
            raise ValueError("the item tower's LM takes inputs_embeds (stored states) only")
        return inputs_embeds


def read_item_states_manifest(path: str) -> Dict[str, Any]:
    """The manifest of an item-states directory; raises naming the directory if it is
    not a finished one."""
    return read_manifest(path, MANIFEST_FILE, ITEM_STATES_FORMAT,
                         "make one with `torchrec-mm redrec item-states --data DIR --out OUT "
                         "--layers K`")


def _items_fingerprint(ids: np.ndarray, texts: list, images: Optional[list] = None) -> str:
    h = hashlib.sha256(ids.astype(np.int64).tobytes())
    h.update("\x00".join(texts).encode("utf-8", "surrogatepass"))
    for path in images or []:  # each image file's path, size and modification time
        if path is None:
            h.update(b"\x00-")
        else:
            st = os.stat(path)
            h.update(f"\x00{path}:{st.st_size}:{st.st_mtime_ns}".encode("utf-8",
                                                                         "surrogatepass"))
    return h.hexdigest()


@torch.inference_mode()
def build_item_states(data_dir: str, out: str, layers: int = 1,
                      encoder_config: Optional[Any] = None, batch_size: int = 64,
                      num_items: Optional[int] = None, progress: bool = True,
                      use_images: bool = True) -> Dict[str, Any]:
    """Stores the item tower's frozen part for every catalogue item (module doc).

    Args:
        data_dir: dataset directory (``items.parquet``, ``meta.json``).
        out: output directory; written under a temporary name and renamed, so it is
            complete or absent. A finished ``out`` of the same settings is reused.
        layers: k, the top encoder layers that train (``1 <= k <= L``).
        encoder_config: :class:`~torchrec_mm.content.encoder.ContentEncoderConfig`
            (model, prompt with ``[EMB]``, ``max_length``); ``None`` = the defaults
            (MiniLM).
        batch_size: items per encoder forward.
        num_items: the catalogue size; ``None`` = ``meta.num_items`` of ``data_dir``.
        use_images: with a vision-language encoder, run each item's ``image_path``
            image through its vision path (the stored states then hold the image
            tokens too); text-only encoders ignore images (with a warning), as
            ``content encode`` does.

    Returns:
        the manifest.

    Raises:
        ValueError: ``layers`` out of range, or the model's top layers do not
            reproduce its output from stored states (architecture not supported).
        DataError: an ``image_path`` that is not a file (naming the row).
    """
    from transformers import AutoConfig

    from torchrec_mm.content.encode_job import _check_image_files, read_items
    from torchrec_mm.content.encoder import ContentEncoder, ContentEncoderConfig, \
        _quiet_transformers
    from torchrec_mm.data.io import load_meta
    from torchrec_mm.redrec.tower import keep_layers

    cfg = dataclasses.replace(encoder_config) if encoder_config is not None \
        else ContentEncoderConfig()
    cfg.trainable_layers = 0
    cfg.return_all_layers = False
    items = read_items(data_dir)
    n = int(load_meta(data_dir).num_items if num_items is None else num_items)
    if items.num_items > n:
        raise ValueError(f"{items.path}: item_id {items.num_items - 1} is not below the "
                         f"catalogue size {n} (meta.num_items of {data_dir})")
    texts = [""] * n
    images: list = [None] * n
    for i, t, im in zip(items.item_ids.tolist(), items.texts, items.image_paths):
        texts[i], images[i] = t, im
    has_images = any(im is not None for im in images)
    multimodal = getattr(AutoConfig.from_pretrained(cfg.resolved_model_path()),
                         "vision_config", None) is not None
    use_images = bool(use_images and has_images and multimodal)
    if has_images and not use_images:
        logger.warning("%s: image_path is ignored (%s)", items.path,
                       "use_images=False" if multimodal else
                       f"{cfg.resolved_model_path()} is a text-only model")
    if use_images:
        _check_image_files(items, np.arange(len(items.item_ids)))
    else:
        images = [None] * n
    settings = {"format": ITEM_STATES_FORMAT, "layers": int(layers),
                "encoder": cfg.to_dict(), "model_path": cfg.resolved_model_path(),
                "num_items": n, "use_images": use_images,
                "items_fingerprint": _items_fingerprint(np.arange(n), texts,
                                                        images if use_images else None)}
    manifest_path = os.path.join(out, MANIFEST_FILE)
    if os.path.exists(manifest_path):
        old = read_item_states_manifest(out)
        if {k: old.get(k) for k in settings} == json.loads(json.dumps(settings)):
            return old

    encoder = ContentEncoder(cfg).eval()
    total = encoder.num_layers
    if not 1 <= int(layers) <= total:
        raise ValueError(f"item states: layers must be in [1, {total}] for "
                         f"{cfg.resolved_model_path()}, got {layers}")
    k = int(layers)
    lengths = np.zeros(n, np.int64)
    readout = np.zeros(n, np.int64)
    flags = [im is not None for im in images]
    prompts, _ = encoder.render_prompts(texts, flags)
    order = np.argsort([len(p) for p in prompts], kind="stable")  # similar lengths together
    chunks: Dict[int, torch.Tensor] = {}
    for lo in tqdm(range(0, n, batch_size), desc="redrec item-states", disable=not progress,
                   leave=False):
        rows = order[lo:lo + batch_size]
        enc = encoder._tokenize_prompts([prompts[i] for i in rows],
                                        [images[i] for i in rows] if use_images else None)
        out_hf = encoder.backbone(**enc, output_hidden_states=True, return_dict=True)
        h = out_hf.hidden_states[total - k]                                  # [b, T, H]
        mask = enc["attention_mask"].to(torch.bool)
        is_emb = enc["input_ids"] == encoder.emb_token_id
        for j, i in enumerate(rows.tolist()):
            valid = mask[j].nonzero().squeeze(1)
            emb_pos = int(is_emb[j].nonzero()[0, 0])
            lengths[i] = valid.numel()
            readout[i] = int((valid == emb_pos).nonzero()[0, 0])
            chunks[i] = h[j, valid].to(torch.float16)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    states = torch.cat([chunks[i] for i in range(n)])

    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # a vision-language model's top layers are its language model's: the image
        # tokens are already in the stored states
        lm_part = getattr(encoder.backbone, "language_model", None) \
            if encoder.is_multimodal else None
        lm_part = encoder.backbone if lm_part is None else lm_part
        top = keep_layers(copy.deepcopy(lm_part), k, "top")
        with _quiet_transformers():
            top.save_pretrained(os.path.join(tmp, LM_DIR))
        save_tensors(os.path.join(tmp, STATES_FILE), {
            "states": states, "offsets": torch.from_numpy(offsets),
            "readout": torch.from_numpy(readout)})
        # parity: the top k layers from the stored states vs the full encoder
        check = np.linspace(0, n - 1, num=min(n, 16)).round().astype(np.int64)
        tower = ItemTower(tmp, _manifest={**settings, "hidden_size": int(states.shape[1])})
        tower.eval()
        got = tower(torch.from_numpy(check))
        enc = encoder.tokenize([texts[i] for i in check.tolist()],
                               [images[i] for i in check.tolist()] if use_images else None)
        want = encoder(**enc).emb_token.float()
        err = float((got - want).abs().max())
        if not err <= PARITY_TOL:
            raise ValueError(
                f"item states: {cfg.resolved_model_path()}'s top {k} layer(s) run from the "
                f"stored states differ from its full forward by {err:.3g} (> {PARITY_TOL}): "
                "this architecture cannot be split there (use the frozen item vectors, "
                "item_embedding=content with content_store)")
        manifest = {**settings, "hidden_size": int(states.shape[1]),
                    "num_tokens": int(states.shape[0]), "total_layers": int(total),
                    "tokens_per_item_mean": float(lengths.mean()),
                    "tokens_per_item_max": int(lengths.max()),
                    "emb_token": cfg.emb_token, "parity_max_abs_err": err,
                    "parity_items": check.tolist()}
        write_json(os.path.join(tmp, MANIFEST_FILE), manifest)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("redrec item-states: %d items, %d tokens, top %d of %d layers -> %s "
                "(parity %.2g)", n, states.shape[0], k, total, out, err)
    return manifest


class ItemTower(nn.Module):
    """The trainable top ``k`` layers of the item LM over stored states (module doc).

    Args:
        path: an item-states directory (:func:`build_item_states`).
        init: ``"pretrained"`` (the encoder's top layers), ``"scratch"`` (the same
            architecture, randomly initialised: Table A3's "Item LLM from scratch" for
            the layers that train; the frozen bottom layers whose outputs are stored
            stay pretrained) or ``"frozen"`` (pretrained, not trained: the same vectors
            as a frozen content store's ``emb_token``).
        dropout: overrides the LM's dropout probabilities (``None``: keep).

    ``forward(ids [n] int64) -> [n, H]`` float32, the ``[EMB]`` hidden state of each
    item after the top layers. ``num_items`` / ``hidden_size`` describe the catalogue.
    The stored states are a read-only memory map, not a buffer: they are neither in
    the ``state_dict`` nor broadcast by DDP.
    """

    def __init__(self, path: str, init: str = "pretrained", dropout: Optional[float] = None,
                 _manifest: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        from torchrec_mm.content.store import mmap_safetensors
        from torchrec_mm.redrec.tower import load_lm

        if init not in ITEM_INITS + ("frozen",):
            raise ValueError(f"ItemTower: init must be one of {ITEM_INITS + ('frozen',)}, "
                             f"got {init!r}")
        manifest = _manifest if _manifest is not None else read_item_states_manifest(path)
        self.path = path
        self.num_items = int(manifest["num_items"])
        self.hidden_size = int(manifest["hidden_size"])
        self.lm = load_lm(os.path.join(path, LM_DIR), init, dropout)
        if isinstance(getattr(self.lm, "embeddings", None), nn.Module):
            self.lm.embeddings = _PassThroughEmbeddings()
        arrays = mmap_safetensors(os.path.join(path, STATES_FILE))
        self._states = arrays["states"][0]                     # [n_tokens, H] fp16 memmap
        self._offsets = torch.from_numpy(np.array(arrays["offsets"][0]))     # [N + 1]
        self._readout = torch.from_numpy(np.array(arrays["readout"][0]))     # [N]
        if self._offsets.numel() != self.num_items + 1 or \
                self._states.shape[1] != self.hidden_size:
            raise ValueError(f"{path}: {STATES_FILE} does not match {MANIFEST_FILE} "
                             f"(offsets {self._offsets.numel()}, states "
                             f"{tuple(self._states.shape)})")

    def inputs(self, ids: torch.Tensor):
        """``[n]`` ids -> ``([n, T, H]`` float32 stored states, right-padded, ``[n, T]``
        attention mask, ``[n]`` readout positions)."""
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_items):
            bad = int(ids[(ids < 0) | (ids >= self.num_items)][0])
            raise ValueError(f"ItemTower {self.path}: item id {bad} is not in "
                             f"[0, {self.num_items})")
        ids = ids.to(torch.long).cpu()
        start, end = self._offsets[ids], self._offsets[ids + 1]
        lengths = end - start
        n, t_max = ids.numel(), int(lengths.max()) if ids.numel() else 0
        rows = torch.repeat_interleave(torch.arange(n), lengths)
        cols = torch.arange(int(lengths.sum())) - torch.repeat_interleave(
            torch.cumsum(lengths, 0) - lengths, lengths)
        flat = (start[rows] + cols).numpy()
        values = torch.from_numpy(np.asarray(self._states[flat])).float()
        x = values.new_zeros(n, t_max, self.hidden_size).index_put((rows, cols), values)
        mask = torch.arange(t_max)[None, :] < lengths[:, None]
        return x, mask, self._readout[ids]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``[n]`` item ids -> ``[n, H]`` item-LM states at ``[EMB]``."""
        device = next(self.lm.parameters()).device
        x, mask, readout = self.inputs(ids)
        if ids.numel() == 0:
            return x.new_zeros(0, self.hidden_size).to(device)
        rows = torch.arange(x.shape[0], device=device)[:, None]
        return forward_at(self.lm, x.to(device), mask.to(device), rows,
                          readout.to(device)[:, None])[:, 0]
