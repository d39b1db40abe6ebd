"""``redrec_user``: the RED-Rec user tower's interest vectors as a ranker feature.

The paper (``001_42c7267e32b49bc6``, §1 and §6) uses the user-tower embeddings not only
for retrieval but as "features for downstream ranking models". This module does that in
two parts:

1. **Snapshots** (:func:`embed_users`, ``torchrec-mm redrec embed-users --run RUN --out
   DIR``, experiment step ``redrec_embed_users``): the K interest vectors of every user,
   computed by a trained RED-Rec run at a few **snapshot times** ``τ_0 < ... < τ_{S-1}``,
   as a production system refreshes its user embeddings periodically.
2. **The plugin** (:class:`RedRecUserPlugin`, registered as ``redrec_user``): a ranking
   sample of user ``u`` at time ``t`` gets the vectors of the **latest snapshot strictly
   before t** (``τ_s < t``), pooled over the K interests (``mean`` or ``concat``) and
   projected by a trainable linear map to the ranker's embedding dim, as one more
   pooled feature ``user_redrec`` next to the ID features. DLRM, DLRM_DCN and the
   target-attention ranker take it unmodified (they size themselves from
   ``embedding_bag_configs()``).

Spec (``plugins/redrec-user-feature.yaml``)::

    plugins:
      - {name: redrec_user, options: {embeddings: out/redrec_users}}

**Snapshot times.** Two rules (choose with the options of :class:`EmbedUsersConfig`):

* ``num_snapshots = S`` (default 8): the ``k / (S + 1)`` quantiles of the log's event
  times, ``k = 1..S`` (``method="lower"``: each is an event time; duplicates dropped).
  Every snapshot then serves about the same number of samples, whatever the span or
  burstiness of the log, and the first ``1 / (S + 1)`` of the samples get the fallback.
* ``snapshot_every = Δ`` seconds: ``τ_k = t_first + k Δ`` for ``k >= 1`` up to the last
  event — the literal periodic refresh (e.g. ``86400`` for daily), costlier on long logs.

**What a snapshot sees (no leakage).** Snapshot ``τ`` embeds, per user, the mixed
sequence (the run's mixing policy, ``last_n`` = the run's evaluation length
``last_n - window``, the same inputs as ``redrec evaluate``) of the events **strictly
before τ**, with gaps measured from ``τ``. With ``visibility="split"`` (default) a
snapshot before the split's ``time_cut`` sees only *train*-split events (no cold-item
event, as the rankers' training histories), a snapshot at or after it every event:
a training sample (always before the cut) therefore never gets a vector built from a
held-out interaction, and no sample ever gets one built from an event at or after its
own time. ``visibility="all"`` (or a dataset without ``split.json``) uses every event.
Only the tower's *inputs* are cut at ``τ``: its weights are the run's (trained on the
whole train split), as for any feature model trained offline before the ranker.

**Fallback.** A sample with no snapshot before its time (``t <= τ_0``) and a user with
no event before the chosen snapshot get the **zero vector**: the feature is then the
projection's bias, a learned "no RED-Rec information" embedding. Such users are not run
through the tower at all.

**Artefact** (``DIR/user_snapshots.safetensors``, written atomically; the compact
equivalent of ``[S, U, K, d]``): ``times`` [S] int64, ``index`` [S, U] int32 (row of
``vectors`` or ``-1`` = no vector), ``vectors`` [R, K, d] (float32 or float16, unit
rows) for the ``R`` (snapshot, user) pairs that have events; the safetensors metadata
holds the run's ``config_hash`` (sha256 of its ``config.json``), checkpoint, mixing
settings and a ``job_key``. ``DIR/snapshots.json`` repeats them for humans. The job is
**resumable**: finished (snapshot, user-chunk) pieces are kept under ``DIR/partial/``
and skipped when the same job is re-run; a finished artefact of the same job is not
recomputed, one of another job is only replaced with ``overwrite``.

**Mechanics of the plugin** (``torchrec_mm.plugins`` contract): the *batch transform*
picks the snapshot of every sample vectorised (``searchsorted`` of the sample times in
``times``) and appends a KJT feature ``redrec_user_row`` (one id per sample: the row of
the pooled table, 0 = fallback); *phase 2* wraps the ranker's EBC in
:class:`RedRecUserCollection`, which holds the pooled vectors as a frozen buffer
(``[R + 1, F]``, row 0 zero), looks the rows up, projects them and appends the key
``user_redrec`` to the EBC's ``KeyedTensor``. The transform needs the samples' times:
``Batch.timestamps`` ([B] int64).
"""

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_mm.plugins import PluginContext, RankerPlugin, register_plugin
from torchrec_mm.plugins.content_feature import _append_keys

logger = logging.getLogger(__name__)

__all__ = [
    "EmbedUsersConfig",
    "POOLINGS",
    "ROW_FEATURE",
    "RedRecUserCollection",
    "RedRecUserOptions",
    "RedRecUserPlugin",
    "SnapshotRowTransform",
    "UserSnapshots",
    "add_embed_users_parser",
    "embed_users",
    "load_model",
    "load_snapshots",
    "select_snapshot",
    "snapshot_times",
]

SNAPSHOT_FILE = "user_snapshots.safetensors"
MANIFEST_FILE = "snapshots.json"
PARTIAL_DIR = "partial"
FORMAT = "torchrec-mm/redrec-user-snapshots-v1"
ROW_FEATURE = "redrec_user_row"
"""KJT key added by the batch transform: one id per sample, the pooled-table row."""
OUT_FEATURE = "user_redrec"
POOLINGS = ("mean", "concat")
VISIBILITIES = ("split", "all")
DTYPES = {"float32": torch.float32, "float16": torch.float16}


# --------------------------------------------------------------------------- snapshots


def snapshot_times(timestamps: np.ndarray, num_snapshots: int = 8,
                   snapshot_every: Optional[int] = None) -> np.ndarray:
    """The snapshot times of a log (module doc, "Snapshot times").

    Args:
        timestamps: [E] event times of the whole log.
        num_snapshots: S, quantile snapshots (ignored when ``snapshot_every`` is given).
        snapshot_every: Δ seconds of a periodic refresh.

    Returns:
        [S'] int64 strictly increasing times (``S' <= S`` for quantiles with ties).
    """
    ts = np.asarray(timestamps, dtype=np.int64)
    if ts.size == 0:
        raise ValueError("snapshot times: the log has no events")
    lo, hi = int(ts.min()), int(ts.max())
    if snapshot_every is not None:
        every = int(snapshot_every)
        if every < 1:
            raise ValueError(f"snapshot_every must be >= 1 second, got {snapshot_every}")
        count = (hi - lo) // every
        if count < 1:
            raise ValueError(f"snapshot_every={every} s is longer than the log's span "
                             f"({hi - lo} s): no snapshot inside it")
        return lo + every * np.arange(1, count + 1, dtype=np.int64)
    if int(num_snapshots) < 1:
        raise ValueError(f"num_snapshots must be >= 1, got {num_snapshots}")
    levels = np.arange(1, num_snapshots + 1) / (num_snapshots + 1)
    return np.unique(np.quantile(ts, levels, method="lower").astype(np.int64))


def select_snapshot(times: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Index of the latest snapshot strictly before each time.

    Args:
        times: [S] int64 strictly increasing snapshot times.
        t: [B] int64 sample times.

    Returns:
        [B] int64 ``s`` with ``times[s] < t[b] <= times[s + 1]``; ``-1`` when
        ``t[b] <= times[0]`` (no snapshot before the sample).
    """
    return torch.searchsorted(times, t.to(times.dtype), right=False) - 1


@dataclass
class UserSnapshots:
    """Interest vectors of users at snapshot times (module doc, "Artefact").

    Attributes:
        times: [S] int64 strictly increasing snapshot times.
        index: [S, U] int32 row of ``vectors`` of (snapshot, user), ``-1`` = no vector.
        vectors: [R, K, d] interest vectors (unit rows).
        meta: provenance (run, ``config_hash``, checkpoint, mixing, ``job_key``).
    """

    times: torch.Tensor
    index: torch.Tensor
    vectors: torch.Tensor
    meta: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_snapshots(self) -> int:
        return int(self.times.shape[0])

    @property
    def num_users(self) -> int:
        return int(self.index.shape[1])

    @property
    def num_interests(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[2])

    def rows(self, users: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """[B] row of ``vectors`` for samples (user, time), ``-1`` = fallback (no
        snapshot strictly before ``t`` or no vector of the user in it)."""
        s = select_snapshot(self.times, t)
        r = self.index[s.clamp(min=0), users.long()].long()
        return torch.where(s >= 0, r, torch.full_like(r, -1))

    def lookup(self, users: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """[B, K, d] float32 vectors of samples (user, time); zeros for the fallback."""
        r = self.rows(users, t)
        out = self.vectors[r.clamp(min=0)].float()
        return out * (r >= 0).to(out.dtype)[:, None, None]

    def dense(self) -> torch.Tensor:
        """[S, U, K, d] float32 with zeros where there is no vector (small data only)."""
        out = torch.zeros(self.num_snapshots, self.num_users, self.num_interests, self.dim)
        has = self.index >= 0
        out[has] = self.vectors[self.index[has].long()].float()
        return out

    def pooled_table(self, pooling: str) -> torch.Tensor:
        """``[R + 1, F]`` float32 table of pooled vectors, row 0 zero (the fallback),
        row ``r + 1`` = pooled ``vectors[r]``; ``F = d`` (mean) or ``K * d`` (concat)."""
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        v = self.vectors.float()
        pooled = v.mean(1) if pooling == "mean" else v.reshape(v.shape[0], -1)
        return torch.cat([pooled.new_zeros(1, pooled.shape[1]), pooled])

    def save(self, path: str) -> None:
        from torchrec_mm.utils.io import save_tensors

        meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.meta.items()}
        save_tensors(path, {"times": self.times, "index": self.index,
                            "vectors": self.vectors}, metadata=meta)


def _read_metadata(path: str) -> Dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})


def load_snapshots(path: str) -> UserSnapshots:
    """Reads and validates an artefact (a directory of :func:`embed_users` or the
    ``.safetensors`` file itself).

    Raises:
        FileNotFoundError: no artefact; ValueError: a malformed one (naming the file and
        the tensor).
    """
    from torchrec_mm.utils.io import load_tensors

    if os.path.isdir(path):
        path = os.path.join(path, SNAPSHOT_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: create it with `torchrec-mm redrec "
                                "embed-users --run RUN --out DIR`")
    t = load_tensors(path)
    missing = [k for k in ("times", "index", "vectors") if k not in t]
    if missing:
        raise ValueError(f"{path}: missing tensor(s) {missing} (not a RED-Rec user "
                         "snapshot file)")
    times, index, vectors = t["times"], t["index"], t["vectors"]
    if times.dim() != 1 or times.dtype != torch.int64 or times.numel() == 0:
        raise ValueError(f"{path}: 'times' must be a non-empty [S] int64 tensor, got "
                         f"{tuple(times.shape)} {times.dtype}")
    if bool((times[1:] <= times[:-1]).any()):
        raise ValueError(f"{path}: 'times' must be strictly increasing")
    if index.dim() != 2 or index.shape[0] != times.shape[0] or index.dtype != torch.int32:
        raise ValueError(f"{path}: 'index' must be [S={times.shape[0]}, U] int32, got "
                         f"{tuple(index.shape)} {index.dtype}")
    if vectors.dim() != 3 or not vectors.is_floating_point():
        raise ValueError(f"{path}: 'vectors' must be [R, K, d] float, got "
                         f"{tuple(vectors.shape)} {vectors.dtype}")
    r = vectors.shape[0]
    bad = (index < -1) | (index >= r)
    if bool(bad.any()):
        s, u = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"{path}: 'index'[{s}, {u}] = {int(index[s, u])} is not a row of "
                         f"'vectors' ({r} rows) or -1")
    finite = torch.isfinite(vectors.reshape(r, -1)).all(1)
    if not bool(finite.all()):
        raise ValueError(f"{path}: 'vectors' row {int((~finite).nonzero()[0])} has NaN/Inf")
    meta: Dict[str, Any] = {}
    for k, v in _read_metadata(path).items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return UserSnapshots(times=times, index=index, vectors=vectors, meta=meta)


# --------------------------------------------------------------------------- embedding job


@dataclass
class EmbedUsersConfig:
    """Options of :func:`embed_users` (``torchrec-mm redrec embed-users``).

    Attributes:
        run: a ``redrec train`` run directory (its ``config.json`` and latest checkpoint).
        out: output directory (``user_snapshots.safetensors``, ``snapshots.json``).
        data: dataset directory (default: the run's).
        num_snapshots / snapshot_every: snapshot times (module doc).
        visibility: ``"split"`` (default) or ``"all"`` (module doc).
        last_n: events per sequence (default: the run's evaluation length).
        batch_size: users per tower call (sorted by length to limit padding).
        chunk_users: users per resumable piece.
        dtype: ``float32`` or ``float16`` storage of the vectors.
        overwrite: replace an artefact (or partial job) of another configuration.
        progress: tqdm bar.
    """

    run: str
    out: str
    data: Optional[str] = None
    num_snapshots: int = 8
    snapshot_every: Optional[int] = None
    visibility: str = "split"
    last_n: Optional[int] = None
    batch_size: int = 64
    chunk_users: int = 2048
    dtype: str = "float32"
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.visibility not in VISIBILITIES:
            raise ValueError(f"visibility must be one of {VISIBILITIES}, got "
                             f"{self.visibility!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("num_snapshots", "batch_size", "chunk_users"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.snapshot_every is not None and int(self.snapshot_every) < 1:
            raise ValueError(f"snapshot_every must be >= 1 second, got {self.snapshot_every}")
        if self.last_n is not None and int(self.last_n) < 1:
            raise ValueError(f"last_n must be >= 1, got {self.last_n}")


def run_config_hash(run: str) -> Tuple[Dict[str, Any], str]:
    """(``config.json`` of a RED-Rec run, sha256 of its canonical JSON)."""
    path = os.path.join(run, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {run} is not a RED-Rec run directory "
                                "(train one with `torchrec-mm redrec train`)")
    with open(path) as f:
        raw = json.load(f)
    digest = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()
    return raw, digest


def load_tower(run: str, data: Optional[str] = None) -> Tuple[nn.Module, Any, Dict[str, Any]]:
    """The trained user tower of a run's latest checkpoint, unsharded, in eval mode.

    Returns:
        ``(tower, RedRecConfig, info)`` with ``info`` = ``config_hash``, ``checkpoint``,
        ``step``.
    """
    model, cfg, info = load_model(run, data)
    return model.tower, cfg, info


def load_model(run: str, data: Optional[str] = None) -> Tuple[nn.Module, Any, Dict[str, Any]]:
    """:func:`load_tower`'s whole :class:`~torchrec_mm.redrec.train.RedRecModel` (tower,
    temperature, item bias), unsharded, in eval mode."""
    from torchrec_mm.redrec.train import RedRecConfig, build_model
    from torchrec_mm.training import checkpoint as ckpt

    raw, digest = run_config_hash(run)
    raw = dict(raw, out=run)
    if data is not None:
        raw["data"] = data
    cfg = RedRecConfig.from_dict(raw, source=os.path.join(run, "config.json"))
    latest = ckpt.latest_checkpoint(os.path.join(run, "checkpoints"))
    if latest is None:
        raise FileNotFoundError(f"{run}: no checkpoint (train the run first)")
    step, skeleton, tensors = ckpt.read_checkpoint(latest)
    model = build_model(cfg, from_checkpoint=True)
    model.load_state_dict(ckpt.restore(model.state_dict(), ckpt.child(skeleton, "model"),
                                       tensors, "/model", values_from_checkpoint=False))
    return model.eval(), cfg, {"config_hash": digest, "checkpoint": os.path.basename(latest),
                               "step": int(step)}


def _take(seq: Any, rows: np.ndarray) -> Any:
    """The rows ``rows`` of a :class:`~torchrec_mm.redrec.sequences.MixedSequences`."""
    fields = {name: getattr(seq, name)[rows] for name in seq._PADDED}
    return dataclasses.replace(seq, **fields, length=seq.length[rows], users=seq.users[rows],
                               t_now=seq.t_now[rows])


@torch.no_grad()
def embed_sequences(tower: nn.Module, seq: Any, batch_size: int) -> torch.Tensor:
    """``[B, K, d]`` interests of mixed sequences, ``batch_size`` users per tower call,
    batched by length (longest first) so that padding stays small."""
    from torchrec_mm.redrec.sequences import SEQ_FEATURES

    n = int(seq.length.shape[0])
    out = torch.zeros(n, tower.num_interests, tower.dim)
    order = np.argsort(-seq.length, kind="stable")
    for lo in range(0, n, batch_size):
        rows = order[lo:lo + batch_size]
        out[torch.from_numpy(rows)] = tower(_take(seq, rows).to_kjt(SEQ_FEATURES)).float()
    return out


def _job_key(job: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()


def _existing_job(path: str) -> Optional[str]:
    if not os.path.exists(path):
        return None
    try:
        key = _read_metadata(path).get("job_key")
    except Exception as e:  # a damaged file: treat as another job
        logger.warning("%s: unreadable metadata (%s)", path, e)
        return ""
    return key if isinstance(key, str) else ""


def embed_users(cfg: EmbedUsersConfig) -> Dict[str, Any]:
    """Computes the user snapshots of a RED-Rec run (module doc); returns the manifest.

    Raises:
        FileExistsError: ``cfg.out`` holds an artefact or partial job of another
            configuration (pass ``overwrite``).
    """
    from tqdm import tqdm

    from torchrec_mm.data.schema import SPLIT_FILE
    from torchrec_mm.redrec.sequences import EventLog, mix
    from torchrec_mm.utils.io import load_tensors, save_tensors, write_json

    tower, run_cfg, info = load_tower(cfg.run, cfg.data)
    data = run_cfg.data
    full_log = EventLog.from_dataset(data)
    time_cut = None
    visibility = cfg.visibility
    if visibility == "split":
        if os.path.exists(os.path.join(data, SPLIT_FILE)):
            from torchrec_mm.data.split import load_split

            time_cut = int(load_split(data).time_cut)
        else:
            logger.warning("%s has no %s: every snapshot sees every event "
                           "(visibility 'all')", data, SPLIT_FILE)
            visibility = "all"
    times = snapshot_times(full_log.timestamp, cfg.num_snapshots, cfg.snapshot_every)
    last_n = int(cfg.last_n or run_cfg.resolved_eval_last_n)
    mix_cfg = run_cfg.mix_config(last_n)
    U, S = full_log.num_users, int(times.shape[0])
    chunk = int(cfg.chunk_users)
    n_chunks = max(1, math.ceil(U / chunk))
    job = {"format": FORMAT, "run": os.path.abspath(cfg.run), "data": os.path.abspath(data),
           **info, "times": [int(x) for x in times], "visibility": visibility,
           "time_cut": time_cut, "policy": mix_cfg.policy, "last_n": last_n,
           "quotas": mix_cfg.quotas, "num_users": U, "num_interests": tower.num_interests,
           "dim": tower.dim, "dtype": cfg.dtype, "chunk_users": chunk}
    key = _job_key(job)
    os.makedirs(cfg.out, exist_ok=True)
    final = os.path.join(cfg.out, SNAPSHOT_FILE)
    manifest = {**job, "job_key": key, "file": SNAPSHOT_FILE}
    existing = _existing_job(final)
    if existing == key:
        write_json(os.path.join(cfg.out, MANIFEST_FILE), _with_counts(manifest, final))
        logger.info("%s: already computed for this run and configuration", final)
        return _with_counts(manifest, final)
    if existing is not None and not cfg.overwrite:
        raise FileExistsError(f"{final} holds snapshots of another run or configuration; "
                              "pass overwrite (--overwrite) to replace them")
    partial = os.path.join(cfg.out, PARTIAL_DIR)
    job_file = os.path.join(partial, "job.json")
    if os.path.exists(job_file):
        with open(job_file) as f:
            old = json.load(f).get("job_key")
        if old != key:
            if not cfg.overwrite:
                raise FileExistsError(f"{partial} holds an unfinished job of another "
                                      "configuration; pass overwrite (--overwrite)")
            shutil.rmtree(partial)
    os.makedirs(partial, exist_ok=True)
    write_json(job_file, {**job, "job_key": key})

    train_log = None
    if visibility == "split" and bool((times < time_cut).any()):
        train_log = EventLog.from_dataset(data, split_filter="train")
    dtype = DTYPES[cfg.dtype]

    def piece(s: int, c: int) -> str:
        return os.path.join(partial, f"s{s:04d}-c{c:05d}.safetensors")

    bar = tqdm(total=S * U, desc="redrec embed-users", unit="user", disable=not cfg.progress,
               dynamic_ncols=True)
    for s in range(S):
        tau = int(times[s])
        log = train_log if (train_log is not None and tau < time_cut) else full_log
        for c in range(n_chunks):
            users = np.arange(c * chunk, min(U, (c + 1) * chunk), dtype=np.int64)
            path = piece(s, c)
            if not os.path.exists(path):
                seq = mix(log, users, np.full(users.shape, tau, np.int64), mix_cfg)
                keep = np.flatnonzero(seq.length > 0)
                vecs = embed_sequences(tower, _take(seq, keep), cfg.batch_size)
                save_tensors(path, {"users": torch.from_numpy(users[keep]),
                                    "vectors": vecs.to(dtype)})
            bar.update(int(users.size))
    bar.close()

    # assemble
    index = torch.full((S, U), -1, dtype=torch.int32)
    parts: List[torch.Tensor] = []
    rows = 0
    for s in range(S):
        for c in range(n_chunks):
            t = load_tensors(piece(s, c))
            n = int(t["users"].shape[0])
            index[s, t["users"]] = torch.arange(rows, rows + n, dtype=torch.int32)
            parts.append(t["vectors"])
            rows += n
    K, d = tower.num_interests, tower.dim
    vectors = torch.cat(parts) if parts else torch.zeros(0, K, d, dtype=dtype)
    snaps = UserSnapshots(times=torch.from_numpy(times), index=index, vectors=vectors,
                          meta={**job, "job_key": key})
    snaps.save(final)
    result = _with_counts(manifest, final)
    write_json(os.path.join(cfg.out, MANIFEST_FILE), result)
    shutil.rmtree(partial, ignore_errors=True)
    return result


def _with_counts(manifest: Dict[str, Any], path: str) -> Dict[str, Any]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        index = f.get_tensor("index")
    per = (index >= 0).sum(1)
    return {**manifest, "num_vectors": int(per.sum()),
            "users_per_snapshot": [int(x) for x in per]}


# --------------------------------------------------------------------------- CLI


def _run_embed_users(args: argparse.Namespace) -> int:
    cfg = EmbedUsersConfig(
        run=args.run, out=args.out, data=args.data, num_snapshots=args.num_snapshots,
        snapshot_every=args.every, visibility=args.visibility, last_n=args.last_n,
        batch_size=args.batch_size, chunk_users=args.chunk_users, dtype=args.dtype,
        overwrite=args.overwrite, progress=not args.no_progress)
    result = embed_users(cfg)
    print(json.dumps({k: result[k] for k in ("file", "times", "num_vectors",
                                             "users_per_snapshot", "config_hash",
                                             "checkpoint")}, indent=1))
    return 0


def add_embed_users_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``embed-users`` to the ``redrec`` subcommands (``torchrec-mm redrec
    embed-users --run RUN --out DIR``)."""
    p = subparsers.add_parser(
        "embed-users", help="user-tower snapshots of a run (the redrec_user ranker feature)",
        description="Computes every user's K interest vectors with a trained RED-Rec run at "
        "snapshot times (quantiles of the log's times, or every --every seconds); each "
        "vector sees only events strictly before its snapshot. Resumable; written "
        "atomically to OUT/user_snapshots.safetensors.")
    p.add_argument("--run", required=True, help="run directory of `redrec train`")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--data", help="dataset directory (default: the run's)")
    p.add_argument("--num-snapshots", type=int, default=8,
                   help="S snapshots at the k/(S+1) quantiles of event times (default 8)")
    p.add_argument("--every", type=int, help="periodic snapshots every this many seconds "
                   "(overrides --num-snapshots)")
    p.add_argument("--visibility", choices=VISIBILITIES, default="split",
                   help="split (default): snapshots before the split's time cut see only "
                   "train events; all: every event")
    p.add_argument("--last-n", type=int, help="events per sequence (default: the run's "
                   "evaluation length)")
    p.add_argument("--batch-size", type=int, default=64, help="users per tower call")
    p.add_argument("--chunk-users", type=int, default=2048, help="users per resumable piece")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--overwrite", action="store_true",
                   help="replace snapshots of another run/configuration in OUT")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.set_defaults(func=_run_embed_users)
    return p


# --------------------------------------------------------------------------- plugin


class SnapshotRowTransform:
    """``Batch -> Batch``: appends the KJT feature ``redrec_user_row`` (one id per
    sample: ``1 +`` the snapshot row of (user, latest snapshot strictly before the
    sample's time), 0 = fallback). Picklable (runs in data-loader workers).

    Args:
        times: [S] int64 snapshot times.
        index: [S, U] int32 rows (``-1`` = none).
        key: the KJT key to add.
    """

    def __init__(self, times: torch.Tensor, index: torch.Tensor,
                 key: str = ROW_FEATURE) -> None:
        self.times = times.to(torch.int64).contiguous()
        self.index = index.to(torch.int32).contiguous()
        self.key = key

    def rows(self, users: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """[B] int64 table rows (0 = fallback) of samples (user, time)."""
        s = select_snapshot(self.times, t)
        r = self.index[s.clamp(min=0), users.long()].long() + 1
        return torch.where(s >= 0, r, torch.zeros_like(r))

    def __call__(self, batch: Any) -> Any:
        t = getattr(batch, "timestamps", None)
        if t is None:
            raise ValueError("redrec_user: the batch carries no sample times "
                             "(Batch.timestamps, [B] int64): the snapshot of a sample is "
                             "chosen by its time")
        users = batch.user_ids
        if users.numel() and int(users.max()) >= self.index.shape[1]:
            raise ValueError(f"redrec_user: user id {int(users.max())} beyond the "
                             f"snapshots' {self.index.shape[1]} users")
        rows = self.rows(users, t)
        kjt = batch.sparse_features
        extra = KeyedJaggedTensor.from_lengths_sync(
            keys=[self.key], values=rows,
            lengths=torch.ones(rows.shape[0], dtype=torch.int32))
        return dataclasses.replace(batch, sparse_features=KeyedJaggedTensor.concat([kjt, extra]))


@torch.fx.wrap
def _row_ids(kjt: KeyedJaggedTensor, key: str) -> torch.Tensor:
    if key not in kjt.keys():
        raise KeyError(f"redrec_user: the features lack '{key}' (the plugin's batch "
                       "transform was not applied to this batch)")
    return kjt[key].values()


class RedRecUserCollection(nn.Module):
    """Wraps an EBC; appends the projected RED-Rec user feature to its output.

    Args:
        embedding_bag_collection: the ranker's EBC (kept as a child: DMP shards it).
        table: ``[R + 1, F]`` frozen pooled user vectors, row 0 the zero fallback
            (:meth:`UserSnapshots.pooled_table`).
        embedding_dim: D, the ranker's embedding dim.
        row_feature: KJT key of the rows (one per sample).
        feature: the output key.

    ``forward(kjt) -> KeyedTensor``: the inner keys plus ``feature`` [B, D] =
    ``Linear(table[row])``.
    """

    def __init__(self, embedding_bag_collection: nn.Module, table: torch.Tensor,
                 embedding_dim: int, row_feature: str = ROW_FEATURE,
                 feature: str = OUT_FEATURE) -> None:
        super().__init__()
        self.embedding_bag_collection = embedding_bag_collection
        self.register_buffer("table", table.float(), persistent=False)
        self.projection = nn.Linear(table.shape[1], embedding_dim)
        self.row_feature = row_feature
        self.feature = feature
        self._extra = [EmbeddingBagConfig(
            name=f"t_{feature}", num_embeddings=table.shape[0], embedding_dim=embedding_dim,
            feature_names=[feature])]

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return list(self.embedding_bag_collection.embedding_bag_configs()) + self._extra

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        kt = self.embedding_bag_collection(features)
        rows = _row_ids(features, self.row_feature)
        return _append_keys(kt, [self.feature], [self.projection(self.table[rows])])


@dataclass
class RedRecUserOptions:
    """Options of the ``redrec_user`` plugin.

    Attributes:
        embeddings: the output directory of ``torchrec-mm redrec embed-users`` (or its
            ``user_snapshots.safetensors``); relative paths resolve against the dataset
            directory's parent first, then the cwd.
        pooling: ``mean`` (the K interests averaged: F = d) or ``concat`` (F = K * d;
            the frozen table, ``[R + 1, F]`` float32 on every rank, is K times larger).
        feature: name of the added pooled feature.
    """

    embeddings: str = "redrec_users"
    pooling: str = "mean"
    feature: str = OUT_FEATURE

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"redrec_user: pooling must be one of {POOLINGS}, got "
                             f"{self.pooling!r}")


@register_plugin("redrec_user")
class RedRecUserPlugin(RankerPlugin):
    """RED-Rec user interests as a pooled ranker feature (module doc)."""

    Options = RedRecUserOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._snapshots: Optional[UserSnapshots] = None

    def snapshots(self, ctx: PluginContext) -> UserSnapshots:
        """The artefact (``ctx.extras["redrec_user_snapshots"]`` or ``embeddings``)."""
        if self._snapshots is None:
            snaps = ctx.extras.get("redrec_user_snapshots") or load_snapshots(
                ctx.resolve_path(self.options.embeddings))
            if ctx.layout is not None and snaps.num_users != ctx.layout.num_users:
                raise ValueError(f"redrec_user: {self.options.embeddings} has vectors of "
                                 f"{snaps.num_users} users, the dataset has "
                                 f"{ctx.layout.num_users}")
            self._snapshots = snaps
        return self._snapshots

    def batch_transform(self, ctx: PluginContext) -> Optional[Callable[[Any], Any]]:
        snaps = self.snapshots(ctx)
        return SnapshotRowTransform(snaps.times, snaps.index)

    def wrap_collections(self, collections: Any, ctx: PluginContext) -> Any:
        if ctx.ranker is None:
            raise ValueError("redrec_user needs the ranker config (its embedding dim)")
        table = self.snapshots(ctx).pooled_table(self.options.pooling)
        collections.ebc = RedRecUserCollection(
            collections.ebc, table, int(ctx.ranker.embedding_dim), feature=self.options.feature)
        return collections
