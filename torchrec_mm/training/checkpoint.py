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


def _gather_full(t: Any, rank: int) -> Optional[torch.Tensor]:
    """Full copy of a (possibly sharded) tensor on rank 0; collective for sharded ones."""
    if isinstance(t, ShardedTensor):
        out = torch.empty(t.size(), dtype=t.dtype) if rank == 0 else None
        t.gather(dst=0, out=out)
        return out
    if hasattr(t, "full_tensor"):  # DTensor
        return t.full_tensor().cpu()
    return t.detach().cpu()


def save_checkpoint(root: str, step: int, state: Dict[str, Any], keep: int = 2) -> Optional[str]:
    """Saves ``state`` (nested dicts of tensors/ShardedTensors/JSON values).

    Collective when a process group is initialised: every rank must call it.

    Returns:
        The checkpoint directory on rank 0, ``None`` elsewhere.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    tensors: Dict[str, Any] = {}
    skeleton = _flatten(state, "", tensors)
    full: Dict[str, torch.Tensor] = {}
    for key in sorted(tensors):  # same order on every rank: gather is collective
        g = _gather_full(tensors[key], rank)
        if rank == 0 and g is not None:
            full[key] = g
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


def restore(target: Any, skeleton: Any, tensors: Dict[str, torch.Tensor], path: str = "") -> Any:
    """Fills ``target`` (a live state dict structure) from a checkpoint.

    Sharded leaves are filled in place; plain tensor leaves are replaced by the saved
    values; JSON leaves by their saved values. Returns the structure to pass to
    ``load_state_dict``.
    """
    if isinstance(skeleton, dict) and _TENSOR_KEY in skeleton:
        saved = tensors[skeleton[_TENSOR_KEY]]
        if isinstance(target, ShardedTensor):
            _copy_into_shards(target, saved, path)
            return target
        if isinstance(target, torch.Tensor) and tuple(target.shape) != tuple(saved.shape):
            raise ValueError(f"checkpoint tensor '{path}' has shape {tuple(saved.shape)}, "
                             f"the model expects {tuple(target.shape)}")
        return saved.to(target.dtype) if isinstance(target, torch.Tensor) else saved
    if isinstance(skeleton, dict) and "__dict__" in skeleton:
        items = skeleton["__dict__"]
        target = target if isinstance(target, dict) else {}
        out = type(target)() if isinstance(target, dict) else {}
        for k, sk in items:
            if isinstance(target, dict) and k not in target and str(k) in target:
                k = str(k)
            out[k] = restore(target.get(k) if isinstance(target, dict) else None,
                             sk, tensors, f"{path}/{k}")
        return out
    if isinstance(skeleton, dict) and "__list__" in skeleton:
        seq: List[Any] = list(target) if isinstance(target, (list, tuple)) else []
        vals = [restore(seq[i] if i < len(seq) else None, sk, tensors, f"{path}/{i}")
                for i, sk in enumerate(skeleton["__list__"])]
        return type(target)(vals) if isinstance(target, tuple) else vals
    return skeleton
