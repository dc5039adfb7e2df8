"""Training checkpoints: a directory of safetensors files plus ``state.json``, swapped in whole.

:func:`write_checkpoint` writes every file into a fresh temporary directory beside the
target (each fsync-ed), records each file's size and SHA-256 in ``state.json``, then swaps
the directories with renames: an interrupted write leaves the previous checkpoint intact
(or, between the two renames, at ``.<name>.old``, which :func:`read_checkpoint` finds).
:func:`read_checkpoint` verifies every checksum and names the file when one is corrupt.

Nested Python state (optimizer ``state_dict``, RNG states, a source's ``state_dict``) is
stored with :func:`encode`: tensors and NumPy arrays go to a safetensors file, the rest to
JSON with tagged placeholders, so nothing is ever pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saekit.errors import CheckpointError, MissingFileError
from saekit.io.atomic import _fsync_dir, load_tensors, read_json, save_tensors, write_json

STATE_JSON = "state.json"
FORMAT = "saekit-checkpoint-1"


# ---------------------------------------------------------------------- nested state codec
def encode(obj: Any, tensors: dict[str, Tensor], prefix: str = "t") -> Any:
    """JSON-able form of ``obj``; tensors / arrays are moved into ``tensors``."""
    if isinstance(obj, Tensor):
        key = f"{prefix}.{len(tensors)}"
        tensors[key] = obj.detach().cpu()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"{prefix}.{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj)).clone()
        return {"__ndarray__": key}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [encode(v, tensors, prefix) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, tensors, prefix) for k, v in obj.items()}
        return {"__items__": [[encode(k, tensors, prefix), encode(v, tensors, prefix)]
                              for k, v in obj.items()]}  # fmt: skip
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (only tensors/JSON)")


def decode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of :func:`encode`."""
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy()
    if "__tuple__" in obj:
        return tuple(decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in obj["__items__"]}
    return {k: decode(v, tensors) for k, v in obj.items()}


def _hashable(k: Any) -> Any:
    return tuple(k) if isinstance(k, list) else k


# ---------------------------------------------------------------------- files
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _old(path: Path) -> Path:
    return path.parent / f".{path.name}.old"


def checkpoint_exists(path: str | Path) -> bool:
    """True when ``path`` (even incomplete: reading it then fails loudly) or its backup exists."""
    p = Path(path)
    return p.is_dir() or (_old(p) / STATE_JSON).is_file()


def write_checkpoint(path: str | Path, files: dict[str, dict[str, Tensor]], meta: dict) -> None:
    """Replace the checkpoint at ``path`` by ``files`` (name -> tensors) and ``meta``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = {}
        for name, tensors in files.items():
            fname = f"{name}.safetensors"
            save_tensors(tmp / fname, tensors)
            size = (tmp / fname).stat().st_size
            manifest[fname] = {"bytes": size, "sha256": _sha256(tmp / fname)}
        write_json(tmp / STATE_JSON, {"format": FORMAT, "files": manifest, **meta})
        _fsync_dir(tmp)
        old = _old(path)
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_checkpoint(path: str | Path) -> tuple[dict, dict[str, dict[str, Tensor]]]:
    """``(meta, files)`` of the checkpoint at ``path``, every file checked against its hash."""
    path = Path(path)
    if not (path / STATE_JSON).is_file() and (_old(path) / STATE_JSON).is_file():
        path = _old(path)  # interrupted between the two renames of write_checkpoint
    sj = path / STATE_JSON
    try:
        meta = read_json(sj)
    except MissingFileError:
        raise
    except ValueError as e:
        raise CheckpointError(f"corrupt checkpoint: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"corrupt checkpoint: {sj} is not a {FORMAT} state file")
    files: dict[str, dict[str, Tensor]] = {}
    for fname, info in meta["files"].items():
        f = path / fname
        if not f.is_file():
            raise CheckpointError(f"corrupt checkpoint: {f} is missing")
        if f.stat().st_size != info["bytes"] or _sha256(f) != info["sha256"]:
            raise CheckpointError(f"corrupt checkpoint: {f} does not match its checksum")
        try:
            files[fname.removesuffix(".safetensors")] = load_tensors(f)
        except ValueError as e:  # pragma: no cover - the checksum catches this first
            raise CheckpointError(f"corrupt checkpoint: {e}") from e
    return meta, files


def describe_diff(saved: Any, now: Any, where: str = "") -> list[str]:
    """Human-readable differences between two JSON-like config trees."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out: list[str] = []
        for k in sorted(set(saved) | set(now)):
            sub = f"{where}.{k}" if where else str(k)
            if k not in saved or k not in now:
                out.append(f"{sub}: {saved.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r}")
            else:
                out += describe_diff(saved[k], now[k], sub)
        return out
    if json.dumps(saved, sort_keys=True) != json.dumps(now, sort_keys=True):
        return [f"{where}: {saved!r} (checkpoint) -> {now!r} (now)"]
    return []
