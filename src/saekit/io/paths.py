"""Users' paths: OSErrors at the points where paths enter become one clear :class:`PathError`.

:func:`user_path` wraps a read or write of a path the user gave (an ``--out-dir``, a run or
cache directory) and turns the OSErrors that mean "this path cannot be used" (disk full,
read-only filesystem, no permission, a file where a directory should be) into a
:class:`~saekit.errors.PathError` naming the path and the fix; any other OSError keeps its
traceback. :func:`check_writable_dir` checks an output directory before work starts.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from saekit.errors import FormatError, PathError, SaekitError

#: errno -> (what happened, the fix)
ENVIRONMENT_ERRNOS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("the disk is full", "free space or choose a path on another disk"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space or choose another path"),
    errno.EROFS: ("the filesystem is read-only", "choose a writable path"),
    errno.EACCES: ("permission denied", "fix the permissions or choose another path"),
    errno.EPERM: ("operation not permitted", "fix the permissions or choose another path"),
}
#: errnos that mean the path itself is wrong (only converted where a user's path enters)
PATH_ERRNOS: dict[int, tuple[str, str]] = {
    errno.ENOTDIR: ("a part of the path is a file, not a directory", "choose another path"),
    errno.EISDIR: ("it is a directory, not a file", "give a file path"),
    errno.EEXIST: ("a file is in the way of a directory", "remove it or choose another path"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
    errno.ENOENT: ("a part of the path does not exist", "create it or fix the path"),
}


_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


def path_error(
    e: OSError, path: str | Path | None = None, action: str = "write", only_env: bool = False
) -> PathError | None:
    """The :class:`PathError` for ``e`` at ``path``, or None when ``e`` may be a bug.

    ``only_env``: convert only :data:`ENVIRONMENT_ERRNOS` (disk full, read-only, permission).
    """
    if isinstance(e, PathError):
        return e
    code = e.errno
    if code is None and _SHORT_WRITE.search(str(e)):
        code = errno.ENOSPC  # numpy's tofile on a full disk: "N requested and M written"
    known = ENVIRONMENT_ERRNOS.get(code or -1)
    if known is None and not only_env:
        known = PATH_ERRNOS.get(code or -1)
    if known is None:
        return None
    what, fix = known
    where = path if path is not None else (e.filename or "?")
    detail = f" ({e.filename})" if e.filename and str(e.filename) != str(where) else ""
    return PathError(f"cannot {action} {where}{detail}: {what}; {fix}")


@contextlib.contextmanager
def user_path(path: str | Path, action: str = "write", only_env: bool = False) -> Iterator[None]:
    """Turn OSErrors inside the block that make ``path`` unusable into a :class:`PathError`."""
    try:
        yield
    except OSError as e:
        err = path_error(e, path, action, only_env)
        if err is None or err is e:
            raise
        raise err from e


@contextlib.contextmanager
def reading(path: str | Path, what: str = "file") -> Iterator[None]:
    """Turn the errors of parsing ``path`` (a corrupt or pickled file, bad bytes, an empty
    file, a missing weights file) into a :class:`FormatError` naming it.

    For loaders of foreign files (HF model directories, peer formats) whose errors are
    otherwise a SafetensorError, UnpicklingError, EOFError or a bare decode error.
    """
    import pickle
    import zipfile

    from safetensors import SafetensorError

    try:
        yield
    except SaekitError:
        raise
    except (
        SafetensorError,
        pickle.UnpicklingError,
        EOFError,
        UnicodeDecodeError,
        zipfile.BadZipFile,
        ValueError,
        OSError,
    ) as e:
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            err = path_error(e, path, "read")
            if err is not None:
                raise err from e
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FormatError(
            f"{path} is not a readable {what} ({type(e).__name__}: {first[:300]}); check the"
            " path, or re-create the file (saekit never unpickles arbitrary objects)"
        ) from e


_PROBE = ".saekit-probe-"


def _remove_stale_probes(d: Path) -> None:
    """Delete the probe files of killed :func:`check_writable_dir` calls."""
    from saekit.io.lock import pid_alive

    for f in d.glob(f"{_PROBE}*"):
        pid = f.name[len(_PROBE) :].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                f.unlink()


def check_writable_dir(
    path: str | Path, what: str = "output directory", need_bytes: int = 0
) -> Path:
    """Create ``path`` if needed and check that files can be written in it.

    ``need_bytes``: free space the work needs; less free space is refused up front.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise PathError(f"{what} {p} is a file, not a directory; choose another path")
    with user_path(p, f"create the {what}"):
        p.mkdir(parents=True, exist_ok=True)
    _remove_stale_probes(p)
    with user_path(p, f"write into the {what}"):
        fd, name = tempfile.mkstemp(prefix=f"{_PROBE}{os.getpid()}-", dir=p)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)
    if need_bytes > 0:
        free = shutil.disk_usage(p).free
        if free < need_bytes:
            raise PathError(
                f"{what} {p}: only {free / 2**20:.1f} MiB free, about {need_bytes / 2**20:.1f}"
                " MiB needed; free space or choose a path on another disk"
            )
    return p


__all__ = ["check_writable_dir", "path_error", "reading", "user_path"]
