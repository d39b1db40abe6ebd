"""The offline encode job: item content of a dataset → per-item states on disk.

Output directory (read it with :class:`~torchrec_mm.content.store.ContentStore`)::

    OUT/
      job.json                 # settings + layer groups, fixed at the first start
      pooling.safetensors      # the pooling g used (to rebuild the encoder online)
      chunks/w002-r001-000003.safetensors   # world size, rank, chunk index
      parts/rank-00001-of-00002.json        # a rank's chunk list, written when it is done
      manifest.json            # written last: everything a reader needs

Each chunk holds ``item_id`` int64 ``[n]``, ``pooled`` ``[n, D]``, ``emb_token``
``[n, D]``, ``layer_groups`` ``[n, G, D]`` (and ``per_layer`` ``[n, L+1, D]`` with
``all_layers``) in ``store_dtype`` (fp16 by default).

**Sharding.** Rank ``r`` of ``W`` (``RANK``/``WORLD_SIZE`` of ``torchrun``) encodes the
items with ``item_id % W == r``, in ``item_id`` order, in chunks of ``chunk_size``.
Ranks coordinate through files only, no process group (so no collective timeout
when shards take hours): rank 0 computes the layer groups once, on a seeded sample
of all items, and writes ``job.json``; the other ranks wait for it. Each rank writes
its part file when its chunks are done, and whichever rank finds all parts present
merges them into ``manifest.json`` (identical content whoever writes it).

**Crash safety and resume.** Every file is written to a temporary name and renamed
(``utils.io``), so a chunk either exists complete or not at all. Re-running the same
command skips the chunks already written (checked: same settings fingerprint and
item ids), deletes this rank's stale temporary files, and encodes the rest. Settings
that change the output (model, prompt, max length, chunking, world size, the items
table, ...) must match ``job.json``; otherwise the job stops with the differing keys
(use a fresh ``--out``, or ``overwrite=True`` on a single rank).
"""

import dataclasses
import glob
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow.parquet as pq
import torch

from torchrec_mm.content.encoder import ContentEncoder, ContentEncoderConfig
from torchrec_mm.content.layer_groups import (contiguous_kmeans, default_layer_groups,
                                              kmeans_layer_labels, layer_similarity)
from torchrec_mm.data.schema import ITEMS_FILE, DataError
from torchrec_mm.utils.io import save_tensors, write_json

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "torchrec-mm/content/v1"
MANIFEST_FILE = "manifest.json"
JOB_FILE = "job.json"
POOLING_FILE = "pooling.safetensors"
CHUNKS_DIR = "chunks"
PARTS_DIR = "parts"
FIELDS = ("pooled", "emb_token", "layer_groups")
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclasses.dataclass
class Items:
    """The item table of a dataset (``items.parquet``), sorted by ``item_id``."""

    item_ids: np.ndarray  # int64 [N]
    texts: List[str]
    image_paths: List[Optional[str]]  # absolute paths or None
    rows: np.ndarray  # int64 [N]: row of each item in items.parquet
    path: str
    num_items: int  # max item_id + 1

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(self.item_ids.tobytes())
        for start in range(0, len(self.texts), 8192):
            h.update("\x00".join(self.texts[start:start + 8192]).encode("utf-8", "surrogatepass"))
            h.update("\x00".join(p or "" for p in self.image_paths[start:start + 8192]).encode())
        return h.hexdigest()


def read_items(data_dir: str) -> Items:
    """Reads and validates ``DIR/items.parquet`` (columns ``item_id``, ``text`` and
    optionally ``image_path``, relative to ``DIR``). Raises :class:`DataError` naming
    the file, row and field of the first bad record."""
    path = os.path.join(data_dir, ITEMS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: '{data_dir}' is not a torchrec-mm dataset "
                                "directory (create one with `torchrec-mm data synth` or "
                                "`data import`)")
    schema = pq.read_schema(path)
    for name in ("item_id", "text"):
        if name not in schema.names:
            raise DataError(path, 0, name, "missing column")
    columns = ["item_id", "text"] + (["image_path"] if "image_path" in schema.names else [])
    table = pq.read_table(path, columns=columns)
    if table.num_rows == 0:
        raise DataError(path, 0, "item_id", "no items")
    for name in columns[:2]:
        col = table.column(name)
        if col.null_count:
            row = int(np.nonzero(col.is_null().to_numpy(zero_copy_only=False))[0][0])
            raise DataError(path, row, name, "null value")
    try:
        ids = table.column("item_id").to_numpy().astype(np.int64, casting="safe")
    except TypeError:
        raise DataError(path, 0, "item_id",
                        f"expected integers, got {schema.field('item_id').type}")
    if (ids < 0).any():
        row = int(np.nonzero(ids < 0)[0][0])
        raise DataError(path, row, "item_id", f"negative id {ids[row]}")
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    dup = np.nonzero(sorted_ids[1:] == sorted_ids[:-1])[0]
    if dup.size:
        row = int(order[dup[0] + 1])
        raise DataError(path, row, "item_id", f"duplicate id {ids[row]}")
    texts = table.column("text").to_pylist()
    if not all(isinstance(t, str) for t in texts):
        row = next(i for i, t in enumerate(texts) if not isinstance(t, str))
        raise DataError(path, row, "text", f"expected a string, got {type(texts[row]).__name__}")
    if "image_path" in columns:
        images = table.column("image_path").to_pylist()
        images = [None if not p else os.path.normpath(os.path.join(data_dir, p)) for p in images]
    else:
        images = [None] * len(texts)
    return Items(item_ids=sorted_ids, texts=[texts[i] for i in order],
                 image_paths=[images[i] for i in order], rows=order.astype(np.int64), path=path,
                 num_items=int(sorted_ids[-1]) + 1)


def _env_rank() -> Tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _chunk_prefix(world_size: int, rank: int) -> str:
    return f"w{world_size:03d}-r{rank:03d}-"


def _part_file(out_dir: str, rank: int, world_size: int) -> str:
    return os.path.join(out_dir, PARTS_DIR, f"rank-{rank:05d}-of-{world_size:05d}.json")


def _pooling_hash(encoder: ContentEncoder) -> str:
    return hashlib.sha256(encoder.pooling.query.detach().float().cpu().numpy().tobytes()
                          ).hexdigest()[:16]


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _fingerprint(settings: Dict[str, Any], layer_groups: List[List[int]]) -> str:
    blob = json.dumps({"settings": settings, "layer_groups": layer_groups}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def compute_layer_grouping(encoder: ContentEncoder, items: Items, sample_size: int,
                           seed: int, batch_size: int, use_images: bool) -> Dict[str, Any]:
    """Layer groups of ``encoder`` by contiguous k-means on the linear-CKA geometry of
    the transformer layers over a seeded sample of items (see ``layer_groups``).

    Returns:
        dict with ``layer_groups`` (hidden-state indices 1..L), ``sample_size``,
        ``similarity`` (CKA ``[L, L]``) and the unconstrained ``kmeans_labels``.
    """
    n = len(items.texts)
    k = encoder.config.num_layer_groups
    if sample_size < 2 or n < 2:
        groups = default_layer_groups(encoder.num_layers, k, first=1)
        return {"method": "equal-split", "layer_groups": groups, "sample_size": 0}
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=min(sample_size, n), replace=False))
    images = [items.image_paths[i] for i in idx] if use_images else None
    out = encoder.encode_texts([items.texts[i] for i in idx], images, batch_size=batch_size,
                               return_all_layers=True)
    per_layer = out.per_layer[:, 1:]  # transformer layers 1..L (0 = embedding output)
    sim = layer_similarity(per_layer).numpy()  # what group_layers clusters
    groups = [[i + 1 for i in g] for g in contiguous_kmeans(sim, k)]
    return {
        "method": "contiguous k-means on linear CKA (exact DP)",
        "layer_groups": groups,
        "sample_size": int(len(idx)),
        "seed": seed,
        "similarity": np.round(sim, 5).tolist(),
        "kmeans_labels": kmeans_layer_labels(sim, k, seed=seed),
    }


def _chunk_is_valid(path: str, fingerprint: str, expected_ids: np.ndarray) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != fingerprint:
                return False
            ids = f.get_tensor("item_id").numpy()
    except Exception as e:  # unreadable: re-encode
        logger.warning("%s is unreadable (%s): re-encoding it", path, e)
        return False
    return ids.shape == expected_ids.shape and bool((ids == expected_ids).all())


def _to_store_dtype(t: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    if dtype == torch.float16:
        limit = torch.finfo(torch.float16).max
        over = int((t.abs() > limit).sum())
        if over:
            logger.warning("%d values of '%s' exceed the float16 range and are clipped "
                           "(use store_dtype='bfloat16' or 'float32')", over, name)
            t = t.clamp(-limit, limit)
    return t.to(dtype).contiguous()


def encode_items(data_dir: str, out_dir: str, config: Optional[ContentEncoderConfig] = None,
                 batch_size: int = 32, rank: Optional[int] = None,
                 world_size: Optional[int] = None, *, bucket: bool = True,
                 chunk_size: int = 4096, group_sample: int = 256, seed: int = 0,
                 layer_groups: Optional[List[List[int]]] = None, store_dtype: str = "float16",
                 all_layers: bool = False, use_images: bool = True,
                 encoder: Optional[ContentEncoder] = None, overwrite: bool = False,
                 progress: bool = True, wait_timeout: float = 7200.0) -> Optional[str]:
    """Encodes the items of dataset ``data_dir`` into ``out_dir`` (see module doc).

    Args:
        data_dir: dataset directory with ``items.parquet``.
        out_dir: output directory (created; resumed if it holds the same job).
        config: encoder config (ignored when ``encoder`` is given); its
            ``layer_groups``, if set, are used instead of computing them.
        batch_size: items per forward pass.
        rank / world_size: this process's shard; default ``RANK`` / ``WORLD_SIZE``.
        bucket: length-bucketed batching (sorted by prompt length, padded per batch).
        chunk_size: items per output chunk (the unit of resume).
        group_sample: items sampled (seeded, from all items) to compute the layer
            groups; 0 = equal split of the layers.
        seed: seed of that sample.
        layer_groups: explicit groups (hidden-state indices 1..L), skipping k-means.
        store_dtype: ``float16`` (default), ``bfloat16`` or ``float32``.
        all_layers: also store ``per_layer`` ``[n, L+1, D]``.
        use_images: pass ``image_path`` images to vision-language encoders.
        encoder: an already built encoder to use; its layer groups are set by this
            job. Its pooling weights are saved with the output, but its backbone is
            recorded only as ``config.model_path``: save a fine-tuned encoder with
            ``save_pretrained`` and load it from there first, so that
            ``ContentStore.build_encoder()`` reproduces it.
        overwrite: delete a previous job in ``out_dir`` first (single rank only).
        progress: tqdm progress bar.
        wait_timeout: seconds ranks > 0 wait for rank 0's ``job.json``.

    Returns:
        the manifest path if this rank completed the job (all parts present), else
        ``None`` (other ranks still running).
    """
    env_rank, env_world = _env_rank()
    rank = env_rank if rank is None else int(rank)
    world_size = env_world if world_size is None else int(world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"store_dtype must be one of {sorted(STORE_DTYPES)}, got {store_dtype!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out_dir = os.path.abspath(out_dir)
    t_start = time.time()

    items = read_items(data_dir)
    if encoder is None:
        config = config or ContentEncoderConfig()
        if layer_groups is None and config.layer_groups is not None:
            layer_groups = config.layer_groups
        encoder = ContentEncoder(config)
    has_images = any(p is not None for p in items.image_paths)
    use_images = bool(use_images and has_images and encoder.is_multimodal)
    if has_images and not use_images:
        logger.warning("%s: image_path is ignored (%s)", items.path,
                       "use_images=False" if encoder.is_multimodal
                       else f"{encoder.config.model_path} is a text-only model")
    if use_images:
        _check_image_files(items, np.nonzero(items.item_ids % world_size == rank)[0])

    enc_cfg = encoder.config.to_dict()
    settings = {
        "format": MANIFEST_FORMAT,
        "model_path": enc_cfg["model_path"],
        "encoder": {k: enc_cfg[k] for k in ("prompt_template", "emb_token", "image_prompt",
                                            "max_length", "num_layer_groups", "dtype")},
        "pooling_sha256": _pooling_hash(encoder),
        "fields": list(FIELDS) + (["per_layer"] if all_layers else []),
        "store_dtype": store_dtype,
        "chunk_size": int(chunk_size),
        "world_size": world_size,
        "items_sha256": items.fingerprint(),
        "num_items": items.num_items,
        "use_images": use_images,
        "group_sample": int(group_sample) if layer_groups is None else 0,
        "seed": int(seed),
        "explicit_layer_groups": layer_groups,
    }

    job_path = os.path.join(out_dir, JOB_FILE)
    if overwrite:
        if world_size > 1:
            raise ValueError("overwrite=True needs a single rank; delete the output "
                             "directory before a multi-rank run instead")
        for name in (MANIFEST_FILE, JOB_FILE, POOLING_FILE):
            if os.path.exists(os.path.join(out_dir, name)):
                os.unlink(os.path.join(out_dir, name))
        for name in (CHUNKS_DIR, PARTS_DIR):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    job = _read_json(job_path)
    if job is not None and job.get("settings") != settings:
        raise FileExistsError(_mismatch_message(out_dir, job.get("settings") or {}, settings))
    if job is None and rank == 0:
        if layer_groups is not None:
            encoder.set_layer_groups(layer_groups)
            grouping = {"method": "explicit", "layer_groups": encoder.layer_groups}
        else:
            grouping = compute_layer_grouping(encoder, items, group_sample, seed, batch_size,
                                              use_images)
        save_tensors(os.path.join(out_dir, POOLING_FILE), encoder.pooling.state_dict())
        job = {"settings": settings, "layer_grouping": grouping,
               "layer_groups": grouping["layer_groups"],
               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_json(job_path, job)
        logger.info("layer groups %s (%s)", job["layer_groups"], grouping["method"])
    elif job is None:
        job = _wait_for_job(job_path, settings, wait_timeout)
    encoder.set_layer_groups(job["layer_groups"])
    fingerprint = _fingerprint(settings, job["layer_groups"])

    chunks = _encode_shard(encoder, items, out_dir, rank, world_size, fingerprint,
                           chunk_size=chunk_size, batch_size=batch_size, bucket=bucket,
                           store_dtype=STORE_DTYPES[store_dtype], all_layers=all_layers,
                           use_images=use_images, progress=progress)
    write_json(_part_file(out_dir, rank, world_size),
               {"fingerprint": fingerprint, "rank": rank, "world_size": world_size,
                "chunks": chunks, "num_items": int(sum(c["num_items"] for c in chunks))})
    logger.info("rank %d/%d: %d items in %.1fs", rank, world_size,
                sum(c["num_items"] for c in chunks), time.time() - t_start)
    return _maybe_write_manifest(out_dir, job, fingerprint, encoder, items, world_size, data_dir)


def _check_image_files(items: Items, rows: np.ndarray) -> None:
    for i in rows:
        image = items.image_paths[i]
        if image is not None and not os.path.isfile(image):
            raise DataError(items.path, int(items.rows[i]), "image_path",
                            f"image file {image!r} not found")


def _mismatch_message(out_dir: str, old: Dict[str, Any], new: Dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    detail = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:4])
    return (f"{out_dir} holds an encode job with different settings ({detail}); "
            "use another output directory or overwrite=True (--overwrite)")


def _wait_for_job(job_path: str, settings: Dict[str, Any], timeout: float) -> Dict[str, Any]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = _read_json(job_path)
        if job is not None:
            if job.get("settings") != settings:
                raise FileExistsError(_mismatch_message(os.path.dirname(job_path),
                                                        job.get("settings") or {}, settings))
            return job
        time.sleep(1.0)
    raise TimeoutError(f"waited {timeout:.0f}s for rank 0 to write {job_path}")


def _encode_shard(encoder: ContentEncoder, items: Items, out_dir: str, rank: int,
                  world_size: int, fingerprint: str, *, chunk_size: int, batch_size: int,
                  bucket: bool, store_dtype: torch.dtype, all_layers: bool, use_images: bool,
                  progress: bool) -> List[Dict[str, Any]]:
    from tqdm.auto import tqdm

    chunk_dir = os.path.join(out_dir, CHUNKS_DIR)
    os.makedirs(chunk_dir, exist_ok=True)
    prefix = _chunk_prefix(world_size, rank)
    for stale in glob.glob(os.path.join(chunk_dir, f".{prefix}*.tmp")):
        os.unlink(stale)  # left by a killed run of this rank
    shard = np.nonzero(items.item_ids % world_size == rank)[0]
    chunks = []
    with tqdm(total=len(shard), disable=not progress, unit="item",
              desc=f"encode rank {rank}/{world_size}", position=rank) as bar:
        for index, start in enumerate(range(0, len(shard), chunk_size)):
            rows = shard[start:start + chunk_size]
            ids = items.item_ids[rows]
            name = f"{prefix}{index:06d}.safetensors"
            path = os.path.join(chunk_dir, name)
            if not (os.path.exists(path) and _chunk_is_valid(path, fingerprint, ids)):
                images = [items.image_paths[i] for i in rows] if use_images else None
                out = encoder.encode_texts([items.texts[i] for i in rows], images,
                                           batch_size=batch_size, bucket=bucket,
                                           return_all_layers=all_layers)
                tensors = {k: _to_store_dtype(v, store_dtype, k)
                           for k, v in out.fields().items()}
                tensors["item_id"] = torch.from_numpy(ids.copy())
                save_tensors(path, tensors, metadata={"fingerprint": fingerprint,
                                                      "rank": str(rank), "chunk": str(index)})
            chunks.append({"file": f"{CHUNKS_DIR}/{name}", "rank": rank, "index": index,
                           "num_items": int(len(ids)), "first_item_id": int(ids[0]),
                           "last_item_id": int(ids[-1])})
            bar.update(len(rows))
    return chunks


def _maybe_write_manifest(out_dir: str, job: Dict[str, Any], fingerprint: str,
                          encoder: ContentEncoder, items: Items, world_size: int,
                          data_dir: str) -> Optional[str]:
    parts = []
    for r in range(world_size):
        part = _read_json(_part_file(out_dir, r, world_size))
        if part is None or part.get("fingerprint") != fingerprint:
            return None
        parts.append(part)
    chunks = [c for p in parts for c in p["chunks"]]
    settings = job["settings"]
    groups = job["layer_groups"]
    d, g, num_layers = encoder.hidden_size, len(groups), encoder.num_layers
    shapes = {"pooled": [d], "emb_token": [d], "layer_groups": [g, d],
              "per_layer": [num_layers + 1, d]}
    enc_cfg = encoder.config.to_dict()
    enc_cfg.update(layer_groups=groups, return_all_layers=False, trainable_layers=0)
    enc_cfg.pop("device")
    manifest = {
        "format": MANIFEST_FORMAT,
        "fingerprint": fingerprint,
        "model_path": settings["model_path"],
        "encoder": enc_cfg,
        "pooling_file": POOLING_FILE,
        "layer_groups": groups,
        "layer_grouping": job["layer_grouping"],
        "num_layers": num_layers,
        "dim": d,
        "num_groups": g,
        "fields": {f: {"shape": shapes[f], "dtype": settings["store_dtype"]}
                   for f in settings["fields"]},
        "num_items": items.num_items,
        "num_encoded": int(sum(c["num_items"] for c in chunks)),
        "world_size": world_size,
        "data_dir": os.path.abspath(data_dir),
        "items_sha256": settings["items_sha256"],
        "created": job["created"],
        "chunks": chunks,
    }
    path = os.path.join(out_dir, MANIFEST_FILE)
    write_json(path, manifest)
    return path
