"""Checkpoints of (sharded) models and optimizers, without pickle.

A checkpoint is a directory ``step-<N>/`` holding ``tensors.safetensors`` (every
tensor, sharded ones gathered in full on rank 0) and ``state.json`` (the structure
and every non-tensor value). It is written as ``step-<N>.partial`` and renamed when
complete, then ``LATEST`` (a one-line file, replaced atomically) points at it; a
crash at any moment leaves the previous checkpoint intact.

Loading is the reverse: every rank reads the full tensors and copies its own shards
(``ShardedTensor`` local shards, by their offsets) into the live state, so a run
resumes under any plan whose tables have the same full shapes. Gathering full tables
on rank 0 bounds this format to tables that fit in one host's memory; that covers
CPU training and is documented as the limit.
"""

import json
import os
import shutil
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor

from torchrec_mm.utils.io import atomic_path, load_tensors, save_tensors, write_text

LATEST = "LATEST"
_TENSOR_KEY = "__tensor__"


def _is_tensor(x: Any) -> bool:
    return isinstance(x, (torch.Tensor, ShardedTensor))


def _flatten(obj: Any, path: str, tensors: Dict[str, Any]) -> Any:
    """Returns a JSON skeleton of ``obj``; tensor leaves go to ``tensors[path]``."""
    if _is_tensor(obj):
        tensors[path] = obj
        return {_TENSOR_KEY: path}
    if isinstance(obj, dict):
        return {"__dict__": [[_key(k), _flatten(v, f"{path}/{k}", tensors)]
                             for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__} at '{path}'")


def _key(k: Any) -> Any:
    if isinstance(k, (str, int)):
        return k
    raise TypeError(f"state dict keys must be str or int, got {type(k).__name__}")


def _local_shards(t: Any) -> List[Tuple[List[int], torch.Tensor]]:
    """(offsets, data) of the shards of ``t`` held by this rank."""
    if isinstance(t, ShardedTensor):
        return [(list(sh.metadata.shard_offsets), sh.tensor.detach().cpu())
                for sh in t.local_shards()]
    return [([0] * t.dim(), t.detach().cpu())]


def _all_gather_bytes(data: bytes, world: int) -> List[bytes]:
    """All-gathers a byte string from every rank (tensors only, no pickle)."""
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
    n = torch.tensor([buf.numel()], dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    width = int(max(int(x) for x in sizes))
    padded = torch.zeros(width, dtype=torch.uint8)
    padded[:buf.numel()] = buf
    out = [torch.zeros(width, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(out, padded)
    return [bytes(o[:int(k)].tolist()) for o, k in zip(out, sizes)]


def _gather_to_rank0(tensors: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """Full tensors of every key held by any rank, assembled on rank 0.

    Ranks may hold different keys (a fused optimizer keeps the state of its local
    tables only) and different shards of a key; the key sets, full shapes and dtypes
    are exchanged first, then every shard is sent, in the same order on every rank.
    A plain (replicated) tensor that rank 0 holds is taken as it is.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        out = {}
        for k, t in tensors.items():
            full = torch.empty(tuple(t.size()), dtype=t.dtype)
            for offsets, data in _local_shards(t):
                full[tuple(slice(o, o + n) for o, n in zip(offsets, data.shape))] = data
            out[k] = full
        return out
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = {k: {"shape": list(t.size()), "dtype": str(t.dtype).replace("torch.", ""),
                "sharded": isinstance(t, ShardedTensor)} for k, t in tensors.items()}
    specs = [json.loads(b.decode()) for b in _all_gather_bytes(json.dumps(spec).encode(), world)]
    keys = sorted(set().union(*specs))
    out: Dict[str, torch.Tensor] = {}
    for key in keys:
        holders = [r for r in range(world) if key in specs[r]]
        info = specs[holders[0]][key]
        dtype = getattr(torch, info["dtype"])
        if key in specs[0] and not specs[0][key]["sharded"]:
            if rank == 0:
                out[key] = tensors[key].detach().cpu().clone()
            continue
        # senders: every rank with shards; a replicated plain tensor from one rank only
        plain = [r for r in holders if not specs[r][key]["sharded"]]
        mine: List[Tuple[List[int], torch.Tensor]] = []
        if key in tensors and (specs[rank][key]["sharded"] or (plain and rank == plain[0])):
            mine = _local_shards(tensors[key])
        ndim = len(info["shape"])
        meta = torch.tensor([x for offs, d in mine for x in (*offs, *d.shape)],
                            dtype=torch.long).reshape(len(mine), 2 * ndim)
        counts = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
        dist.all_gather(counts, torch.tensor([len(mine)], dtype=torch.long))
        width = max(int(c) for c in counts)
        padded = torch.zeros(width, 2 * ndim, dtype=torch.long)
        padded[:len(mine)] = meta
        metas = [torch.zeros_like(padded) for _ in range(world)]
        dist.all_gather(metas, padded)
        full = torch.empty(info["shape"], dtype=dtype) if rank == 0 else None
        for r in range(world):
            for j in range(int(counts[r])):
                offs, sizes = metas[r][j, :ndim].tolist(), metas[r][j, ndim:].tolist()
                buf = mine[j][1].contiguous() if r == rank else torch.empty(sizes, dtype=dtype)
                dist.broadcast(buf, src=r)
                if rank == 0:
                    full[tuple(slice(o, o + n) for o, n in zip(offs, sizes))] = buf
        if rank == 0:
            out[key] = full
    return out


def save_checkpoint(root: str, step: int, state: Dict[str, Any], keep: int = 2) -> Optional[str]:
    """Saves ``state`` (nested dicts of tensors/ShardedTensors/JSON values).

    Collective when a process group is initialised: every rank must call it.

    Returns:
        The checkpoint directory on rank 0, ``None`` elsewhere.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    tensors: Dict[str, Any] = {}
    skeleton = _flatten(state, "", tensors)
    full = _gather_to_rank0(tensors)
    final = None
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        name = f"step-{step:09d}"
        final = os.path.join(root, name)
        partial = final + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        try:
            save_tensors(os.path.join(partial, "tensors.safetensors"), full)
            with atomic_path(os.path.join(partial, "state.json")) as tmp:
                with open(tmp, "w") as f:
                    json.dump({"step": step, "skeleton": skeleton}, f)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        write_text(os.path.join(root, LATEST), name + "\n")
        _prune(root, keep)
    if dist.is_initialized():
        dist.barrier()
    return final


def _prune(root: str, keep: int) -> None:
    steps = sorted(d for d in os.listdir(root)
                   if d.startswith("step-") and not d.endswith(".partial"))
    for d in steps[:-keep]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def latest_checkpoint(root: str) -> Optional[str]:
    """The directory named by ``root/LATEST`` if it exists and is complete."""
    path = os.path.join(root, LATEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        name = f.read().strip()
    ckpt = os.path.join(root, name)
    if not (os.path.exists(os.path.join(ckpt, "state.json"))
            and os.path.exists(os.path.join(ckpt, "tensors.safetensors"))):
        raise FileNotFoundError(f"{path} names checkpoint '{name}' but {ckpt} is incomplete")
    return ckpt


def read_checkpoint(ckpt: str) -> Tuple[int, Any, Dict[str, torch.Tensor]]:
    """(step, skeleton, full tensors) of a checkpoint directory."""
    with open(os.path.join(ckpt, "state.json")) as f:
        meta = json.load(f)
    return int(meta["step"]), meta["skeleton"], load_tensors(
        os.path.join(ckpt, "tensors.safetensors"))


def _copy_into_shards(dst: ShardedTensor, full: torch.Tensor, path: str) -> None:
    if tuple(dst.size()) != tuple(full.shape):
        raise ValueError(f"checkpoint tensor '{path}' has shape {tuple(full.shape)}, "
                         f"the model expects {tuple(dst.size())}")
    for shard in dst.local_shards():
        index = tuple(slice(o, o + s) for o, s in
                      zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
        shard.tensor.detach().copy_(full[index])


def child(skeleton: Any, key: Any) -> Any:
    if isinstance(skeleton, dict) and "__dict__" in skeleton:
        for k, v in skeleton["__dict__"]:
            if k == key or str(k) == str(key):
                return v
    if isinstance(skeleton, dict) and "__list__" in skeleton and isinstance(key, int):
        items = skeleton["__list__"]
        return items[key] if key < len(items) else None
    return None


def restore(target: Any, skeleton: Any, tensors: Dict[str, torch.Tensor], path: str = "",
            values_from_checkpoint: bool = True) -> Any:
    """Fills ``target`` (a live state structure of this rank) from a checkpoint.

    The walk follows ``target``: every tensor leaf is looked up by its path in
    ``tensors`` (the full tensors), sharded leaves are filled in place (this rank's
    shards), plain ones replaced. Non-tensor leaves come from ``skeleton`` when
    ``values_from_checkpoint`` (training progress), else stay as they are (optimizer
    param groups, which differ between ranks). Lists take the checkpoint's length.

    Returns:
        The structure to pass to ``load_state_dict``.

    Raises:
        ValueError: a tensor of the target is missing or has another shape.
    """
    if isinstance(target, (torch.Tensor, ShardedTensor)) or (
            target is None and isinstance(skeleton, dict) and _TENSOR_KEY in skeleton):
        if path not in tensors:
            raise ValueError(f"the checkpoint has no tensor '{path}'")
        saved = tensors[path]
        if isinstance(target, ShardedTensor):
            _copy_into_shards(target, saved, path)
            return target
        if target is None:
            return saved
        if tuple(target.shape) != tuple(saved.shape):
            raise ValueError(f"checkpoint tensor '{path}' has shape {tuple(saved.shape)}, "
                             f"the model expects {tuple(target.shape)}")
        return saved.to(target.dtype)
    if isinstance(target, dict):
        return type(target)((k, restore(v, child(skeleton, k), tensors, f"{path}/{k}",
                                        values_from_checkpoint)) for k, v in target.items())
    if isinstance(target, (list, tuple)) or (
            target is None and isinstance(skeleton, dict) and "__list__" in skeleton):
        seq = list(target or [])
        n = len(skeleton["__list__"]) if (values_from_checkpoint and isinstance(
            skeleton, dict) and "__list__" in skeleton) else len(seq)
        vals = [restore(seq[i] if i < len(seq) else None, child(skeleton, i), tensors,
                        f"{path}/{i}", values_from_checkpoint) for i in range(n)]
        return tuple(vals) if isinstance(target, tuple) else vals
    if target is None and isinstance(skeleton, dict) and "__dict__" in skeleton:
        return {k: restore(None, v, tensors, f"{path}/{k}", values_from_checkpoint)
                for k, v in skeleton["__dict__"]}
    if values_from_checkpoint and skeleton is not None:
        return skeleton
    return target
