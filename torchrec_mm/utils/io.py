"""Crash-safe file output: every file is written to a temporary name in the same
directory and renamed into place, so a reader never sees a half-written file."""

import contextlib
import json
import os
import tempfile
from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional

if TYPE_CHECKING:  # torch is imported lazily: data-only commands start fast
    import torch


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path next to ``path``; renames it onto ``path`` on success
    (``os.replace`` is atomic on POSIX) and deletes it on error."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp makes 0600 (and writers such as safetensors may replace the file):
        # give the result normal permissions just before it appears
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str, obj: Any) -> None:
    """Atomically writes ``obj`` as indented JSON."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
            f.write("\n")


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def save_tensors(path: str, tensors: Dict[str, "torch.Tensor"],
                 metadata: Optional[Dict[str, str]] = None) -> None:
    """Atomically saves tensors with safetensors (no pickle)."""
    from safetensors.torch import save_file
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, tmp, metadata=metadata)


def load_tensors(path: str) -> Dict[str, "torch.Tensor"]:
    """Loads a safetensors file (never unpickles)."""
    from safetensors.torch import load_file
    return load_file(path, device="cpu")


def read_manifest(directory: str, name: str, fmt: str, hint: str) -> Dict[str, Any]:
    """``directory/name`` (a JSON manifest written last by a job) whose ``format`` must be
    ``fmt``; a missing one raises FileNotFoundError ending with ``hint`` (how to make it)."""
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory}: no {name}; not a finished output ({hint})")
    with open(path) as f:
        manifest = json.load(f)
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"{path}: format {got!r}, expected {fmt!r}")
    return manifest


def _json_default(o: Any) -> Any:
    if hasattr(o, "numel") and hasattr(o, "tolist"):  # torch.Tensor
        return o.tolist() if o.numel() != 1 else o.item()
    if hasattr(o, "item") and getattr(o, "size", 2) == 1:
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
