"""Atomic file writes and checked safetensors / JSON reads.

Every file saekit writes goes to a temporary file in the destination's directory, is
fsync-ed, then ``os.replace``-d over the destination: a crash or an exception mid-write
leaves either the old file or the new one, never a partial file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from saekit.errors import FormatError, MissingFileError
from saekit.io.paths import user_path

TMP_SUFFIX = ".tmp"
_TMP_NAME = re.compile(r"\..+\.(\d+)\.[^.]+\.tmp")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and move it to ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched. A full
    disk, a read-only filesystem or a missing permission raise a :class:`PathError`
    naming ``path``.
    """
    path = Path(path)
    with user_path(path.parent, "write into"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(
            prefix=f".{path.name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=path.parent
        )
    os.close(fd)
    tmp = Path(name)
    try:
        with user_path(path, only_env=True):
            yield tmp
            os.chmod(tmp, 0o644)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _as_os_error(e: SafetensorError, path: Path) -> OSError | None:
    """The OSError behind a safetensors I/O error (its message ends ``(os error N)``)."""
    m = re.search(r"os error (\d+)", str(e))
    return OSError(int(m.group(1)), str(e), str(path)) if m else None


def stale_temps(directory: str | Path) -> list[Path]:
    """The temporary files of :func:`atomic_path` in ``directory`` whose writing process is
    gone (a kill mid-write leaves ``.<name>.<pid>.<random>.tmp``)."""
    from saekit.io.lock import pid_alive

    d = Path(directory)
    found = []
    for p in sorted(d.glob(f".*{TMP_SUFFIX}")) if d.is_dir() else []:
        m = _TMP_NAME.fullmatch(p.name)
        pid = int(m.group(1)) if m else 0
        if m and p.is_file() and pid != os.getpid() and not pid_alive(pid):
            found.append(p)
    return found


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete :func:`stale_temps`; returns them."""
    found = stale_temps(directory)
    for p in found:
        p.unlink(missing_ok=True)
    return found


def write_bytes(path: str | Path, data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    write_bytes(path, text.encode("utf-8"))


def save_figure(fig: Any, path: str | Path, **savefig_kw: Any) -> Path:
    """Atomically save a matplotlib figure (format from ``path``'s suffix); returns ``path``."""
    path = Path(path)
    fmt = savefig_kw.pop("format", path.suffix.lstrip(".") or "png")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, **savefig_kw)
    return path


def json_safe(obj: Any) -> Any:
    """``obj`` as strict JSON data: NaN / ±Inf -> null, tensors and NumPy values -> lists and
    numbers, paths -> strings, dict keys -> strings. Anything else is a bug (TypeError)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Tensor) or type(obj).__module__ == "numpy":
        return json_safe(obj.tolist())  # numpy scalars' tolist() is their Python value
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON data: {type(obj).__name__}")


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def save_tensors(
    path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Atomically write ``tensors`` (made contiguous, moved to CPU) as safetensors."""
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(clean, str(tmp), metadata=metadata)
        except SafetensorError as e:
            raise (_as_os_error(e, tmp) or e) from e


def load_tensors(path: str | Path, device: str = "cpu") -> dict[str, Tensor]:
    """Read a safetensors file; a missing file or a corrupt one gives a clear error."""
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"file not found: {p}")
    try:
        return load_file(str(p), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise FormatError(f"{p} is not a readable safetensors file (corrupt?): {e}") from e


def read_json(path: str | Path) -> Any:
    """Read a JSON file; a missing file or invalid JSON gives a clear error."""
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"file not found: {p}")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{p} is not valid JSON (corrupt?): {e}") from e


def torch_load_tensors(path: str | Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never pickles."""
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"file not found: {p}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, ...
        why = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        if "Unsupported global" in str(e):
            why = next(ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln)
            why = why.split(". Please")[0]  # saekit never allowlists globals
        raise FormatError(
            f"refusing to load {p}: it is not a plain tensor file readable with"
            f" torch.load(weights_only=True) (saekit never unpickles arbitrary objects): {why}"
        ) from e
