"""Training checkpoints: a directory of safetensors files plus ``state.json``, swapped in whole.

:func:`write_checkpoint` writes every file into ``.<name>.tmp-<pid>`` beside the target
(each fsync-ed), records each file's size and SHA-256 in ``state.json`` (itself sealed, see
:mod:`saekit.io.integrity`), then swaps the directories with renames that never delete the
last good copy before the new one is in place. Whatever the interleaving of kills, a
complete checkpoint is left at ``<name>``, ``.<name>.old`` or a complete temporary
directory; :func:`recover_checkpoint` (at the start of a run) swaps the newest one in and
removes the stale temporary directories of dead processes. :func:`read_checkpoint`
verifies every checksum and names the file when one is corrupt.

Nested Python state (optimizer ``state_dict``, RNG states, a source's ``state_dict``) is
stored with :func:`encode`: tensors and NumPy arrays go to a safetensors file, the rest to
JSON with tagged placeholders, so nothing is ever pickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saekit.errors import CheckpointError, FormatError, IntegrityError, MissingFileError
from saekit.io.atomic import _fsync_dir, load_tensors, read_json, save_tensors, write_json
from saekit.io.integrity import check_seal, file_records, seal, verify_files
from saekit.io.lock import pid_alive

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
        return {
            "__items__": [
                [encode(k, tensors, prefix), encode(v, tensors, prefix)] for k, v in obj.items()
            ]
        }
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
SEAL = ("state_sha256",)


def _old(path: Path) -> Path:
    return path.parent / f".{path.name}.old"


def _corrupt(path: Path) -> Path:
    return path.parent / f".{path.name}.corrupt"


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def _tmp(path: Path) -> Path:
    return path.parent / f"{_tmp_prefix(path)}{os.getpid()}"


def checkpoint_exists(path: str | Path) -> bool:
    """True when ``path`` (even incomplete: reading it then fails loudly) or its backup exists."""
    p = Path(path)
    return p.is_dir() or (_old(p) / STATE_JSON).is_file()


def _swap_in(new: Path, path: Path) -> None:
    """Move the complete checkpoint ``new`` to ``path``; the last good copy is never deleted
    before the new one is in place, whatever the interleaving of kills."""
    old = _old(path)
    if path.is_dir():
        shutil.rmtree(old, ignore_errors=True)  # path is the last good copy
        os.replace(path, old)
    # else: ``old`` (if any) is the last good copy; it stays until ``new`` is in place
    os.replace(new, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_checkpoint(path: str | Path, files: dict[str, dict[str, Tensor]], meta: dict) -> None:
    """Replace the checkpoint at ``path`` by ``files`` (name -> tensors) and ``meta``.

    Everything goes to ``.<name>.tmp-<pid>`` first; ``state.json`` (sealed, holding every
    file's size and SHA-256) is written last, so a temporary directory with a valid
    ``state.json`` is complete and :func:`recover_checkpoint` may use it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        names = []
        for name, tensors in files.items():
            save_tensors(tmp / f"{name}.safetensors", tensors)
            names.append(f"{name}.safetensors")
        state = {"format": FORMAT, "files": file_records(tmp, names), **meta}
        write_json(tmp / STATE_JSON, seal(state, SEAL))
        _fsync_dir(tmp)
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_meta(path: str | Path, verify: bool = True) -> dict:
    """The checked ``state.json`` of the checkpoint directory ``path`` (files verified too)."""
    path = Path(path)
    sj = path / STATE_JSON
    if not sj.is_file():
        raise MissingFileError(
            f"{sj} is missing: the checkpoint {path} is incomplete; delete it or pass"
            " resume=false to start over"
        )
    try:
        meta = read_json(sj)
    except ValueError as e:
        raise CheckpointError(f"corrupt checkpoint: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"corrupt checkpoint: {sj} is not a {FORMAT} state file")
    try:
        if verify:
            check_seal(meta, sj, SEAL)
        verify_files(path, meta.get("files"), verify)
    except IntegrityError as e:
        raise CheckpointError(f"corrupt checkpoint: {e}") from e
    for key in ("step", "tokens"):
        if not isinstance(meta.get(key), int):
            raise CheckpointError(f"corrupt checkpoint: {sj} has no integer {key!r}")
    return meta


def read_checkpoint(
    path: str | Path, verify: bool = True
) -> tuple[dict, dict[str, dict[str, Tensor]]]:
    """``(meta, files)`` of the checkpoint at ``path``, every file checked against its hash.

    ``verify=False`` checks file sizes but not SHA-256 digests.
    """
    path = Path(path)
    if not (path / STATE_JSON).is_file() and (_old(path) / STATE_JSON).is_file():
        path = _old(path)  # interrupted between the two renames of write_checkpoint
    meta = read_meta(path, verify)
    files: dict[str, dict[str, Tensor]] = {}
    for fname in meta["files"]:
        try:
            files[fname.removesuffix(".safetensors")] = load_tensors(path / fname)
        except ValueError as e:  # pragma: no cover - the checksum catches this first
            raise CheckpointError(f"corrupt checkpoint: {e}") from e
    return meta, files


def _tmp_pid(p: Path, prefix: str) -> int:
    tail = p.name[len(prefix) :]
    return int(tail) if tail.isdigit() else 0


def stale_writes(path: str | Path) -> list[Path]:
    """The ``.<name>.tmp-<pid>`` directories beside ``path`` whose process is gone."""
    path = Path(path)
    prefix = _tmp_prefix(path)
    out = []
    for p in sorted(path.parent.glob(f"{prefix}*")):
        pid = _tmp_pid(p, prefix)
        if p.is_dir() and pid != os.getpid() and not pid_alive(pid):
            out.append(p)
    return out


def remove_stale_writes(path: str | Path) -> list[str]:
    """Delete the stale temporary checkpoint directories beside ``path``; returns notes."""
    notes = []
    for t in stale_writes(path):
        shutil.rmtree(t, ignore_errors=True)
        notes.append(f"removed the stale checkpoint write {t}")
    return notes


def recover_checkpoint(path: str | Path, verify: bool = True) -> list[str]:
    """Make ``path`` the newest complete checkpoint left by interrupted writes; returns notes.

    Candidates: ``path``, ``.<name>.old`` and the ``.<name>.tmp-<pid>`` directories of dead
    processes (a live process's are left alone). The complete one with the highest step
    is swapped in; the others are deleted, except an unusable ``path``, which is kept as
    ``.<name>.corrupt`` when another copy replaces it. With no complete copy at all, an
    unusable ``path`` or ``.old`` raises its error: a run never restarts silently.
    Call it holding the directory's lock.
    """
    path = Path(path)
    tmps = stale_writes(path)
    cands = [c for c in (path, _old(path)) if c.is_dir()] + tmps
    if cands == [path]:
        return []  # the usual case: read_checkpoint checks it
    good: list[tuple[int, int, Path]] = []
    errors: dict[Path, Exception] = {}
    for rank, c in enumerate(cands):
        try:
            good.append((int(read_meta(c, verify)["step"]), -rank, c))
        except (FormatError, OSError) as e:
            errors[c] = e
    notes: list[str] = []
    if not good:
        for c in (path, _old(path)):
            if c in errors:
                raise errors[c]
        for t in tmps:  # incomplete writes of dead processes: nothing of value
            shutil.rmtree(t, ignore_errors=True)
            notes.append(f"removed the incomplete checkpoint write {t}")
        return notes
    step, _, best = max(good)
    if best != path:
        if path in errors:
            shutil.rmtree(_corrupt(path), ignore_errors=True)
            os.replace(path, _corrupt(path))
            notes.append(f"kept the unusable checkpoint {path} as {_corrupt(path)}: {errors[path]}")
        if best == _old(path):
            os.replace(best, path)
            _fsync_dir(path.parent)
        else:
            _swap_in(best, path)
        notes.append(f"recovered the checkpoint of step {step} from {best.name}")
    for c in [_old(path), *tmps]:
        if c.exists():
            shutil.rmtree(c, ignore_errors=True)
            if c in tmps:
                notes.append(f"removed the stale checkpoint write {c}")
    return notes


def field_defaults(cfg: Any) -> dict:
    """``{field: default}`` (JSON form) of the fields of the dataclass ``cfg`` that have a
    default: the tree :func:`describe_diff` takes as ``defaults``. A field whose default
    changed when it was added (metadata ``absent``) gives the value its absence meant."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if "absent" in f.metadata:
            value = f.metadata["absent"]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        try:
            out[f.name] = json.loads(json.dumps(value))
        except (TypeError, ValueError):
            continue  # not JSON: such a field can never be recorded absent
    return out


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def describe_diff(saved: Any, now: Any, where: str = "", defaults: Any = None) -> list[str]:
    """Human-readable differences between two JSON-like config trees.

    ``defaults`` (a tree shaped like ``now``, e.g. of :func:`field_defaults`) makes a key
    absent from ``saved`` no difference when its value now is its default: a checkpoint
    written before a field existed resumes as long as the field keeps its default.
    """
    if isinstance(saved, dict) and isinstance(now, dict):
        dflt = defaults if isinstance(defaults, dict) else {}
        out: list[str] = []
        for k in sorted(set(saved) | set(now)):
            sub = f"{where}.{k}" if where else str(k)
            if k not in saved and k in now and k in dflt and _same(now[k], dflt[k]):
                continue
            if k not in saved or k not in now:
                out.append(f"{sub}: {saved.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r}")
            else:
                out += describe_diff(saved[k], now[k], sub, dflt.get(k))
        return out
    if not _same(saved, now):
        return [f"{where}: {saved!r} (checkpoint) -> {now!r} (now)"]
    return []


def rng_state(device: torch.device) -> dict[str, Any]:
    """The torch, Python and NumPy RNG states (and the device's on CUDA)."""
    rng: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def set_rng_state(rng: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` recorded."""
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


def match_state_layout(opt: torch.optim.Optimizer) -> None:
    """Give restored optimizer moments their parameter's strides.

    Checkpoints store tensors contiguous; a parameter kept in another layout (``W_enc`` is
    latent-major) would then disagree with its moments, which fused Adam reads as flat memory.
    """
    for group in opt.param_groups:
        for p in group["params"]:
            for key, v in opt.state.get(p, {}).items():
                if isinstance(v, Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    opt.state[p][key] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def regroup_optim(osd: dict, opt: torch.optim.Optimizer) -> dict:
    """``osd`` with ``opt``'s parameter groups when only the grouping differs.

    A checkpoint written before the decoder had its own group (``decoder_lr_scale``) holds one
    group over the same parameters in the same order; its moments are kept as they are (the
    lr of every group is set before each step).
    """
    saved = [i for g in osd["param_groups"] for i in g["params"]]
    now = opt.state_dict()["param_groups"]
    if len(osd["param_groups"]) == len(now) or saved != [i for g in now for i in g["params"]]:
        return osd  # the same grouping, or another layout load_state_dict will refuse
    return {"state": osd["state"], "param_groups": now}
