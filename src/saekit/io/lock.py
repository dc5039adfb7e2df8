"""An exclusive lock on a run or cache directory, so that two writers never share one.

:class:`DirLock` takes ``flock(LOCK_EX | LOCK_NB)`` on a lock file and writes its pid, host
and start time into it. The kernel releases the lock when the process exits (even by
``kill -9``), so a lock left behind by a dead process never blocks. Where ``flock`` is not
supported (some network filesystems), the lock file's recorded pid decides: a live pid on
this host holds it, a dead one is stale and taken over. A second writer gets a
:class:`~saekit.errors.LockedError` naming the directory and the holder.

The lock file is removed on release while still locked; a process that locked the removed
file sees that it is no longer the one at the path and retries, so two holders never
coexist.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from saekit.errors import LockedError
from saekit.io.paths import user_path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

#: lock file name inside a run directory
RUN_LOCK = ".saekit.lock"


def pid_alive(pid: int) -> bool:
    """True when a process with ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_holder(path: Path) -> dict:
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "another process"
    when = holder.get("started")
    since = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(when))}" if when else ""
    return f"pid {holder['pid']} on {holder.get('host', '?')}{since}"


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class DirLock:
    """Exclusive lock held through ``lock_file`` (a context manager).

    ``what`` names the directory in the error (e.g. ``"run directory runs/x"``). Two locks
    on one file conflict even within one process (flock locks belong to open files).
    """

    def __init__(self, lock_file: str | Path, what: str) -> None:
        self.path = Path(lock_file)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> DirLock:
        for _ in range(100):
            with user_path(self.path, "create the lock file"):
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                self._lock(fd)
                if not _same_file(fd, self.path):  # released and removed meanwhile: retry
                    os.close(fd)
                    continue
                os.ftruncate(fd, 0)
                me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
                os.write(fd, json.dumps(me).encode())
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return self
        raise LockedError(f"{self.what}: could not take the lock {self.path}")  # pragma: no cover

    def _lock(self, fd: int) -> None:
        holder = _read_holder(self.path)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                raise self._locked(holder) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        # no flock here: the recorded pid decides
        pid = int(holder.get("pid") or 0)
        if pid and pid != os.getpid():
            other_host = holder.get("host") not in (None, socket.gethostname())
            if other_host or pid_alive(pid):
                raise self._locked(holder)

    def _locked(self, holder: dict) -> LockedError:
        return LockedError(
            f"{self.what} is in use by {_describe(holder)} (lock {self.path}); wait for it to"
            " finish or use another directory"
        )

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if _same_file(self._fd, self.path):
                self.path.unlink()  # still locked: a waiter retries on the new file
        os.close(self._fd)  # releases the flock
        self._fd = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def run_lock(run_dir: str | Path) -> DirLock:
    """The lock of a run directory (``run_dir/.saekit.lock``)."""
    return DirLock(Path(run_dir) / RUN_LOCK, f"run directory {run_dir}")


def sibling_lock(path: str | Path, what: str) -> DirLock:
    """The lock of a directory that is created by a final rename (``.<name>.lock`` beside it)."""
    p = Path(path)
    return DirLock(p.parent / f".{p.name}.lock", f"{what} {p}")


def lock_holder(lock_file: str | Path) -> dict | None:
    """The live holder recorded in ``lock_file`` (None when free or stale)."""
    p = Path(lock_file)
    if not p.is_file():
        return None
    if fcntl is not None:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        except BlockingIOError:
            return _read_holder(p) or {"pid": 0}
        except OSError:
            pass
        finally:
            os.close(fd)
    holder = _read_holder(p)
    pid = int(holder.get("pid") or 0)
    return holder if pid and pid_alive(pid) else None


__all__ = ["RUN_LOCK", "DirLock", "lock_holder", "pid_alive", "run_lock", "sibling_lock"]
