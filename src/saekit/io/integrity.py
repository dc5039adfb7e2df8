"""SHA-256 digests of the files saekit writes, checked when they are read back.

A directory saekit writes (a run, a checkpoint, an activation cache) records, in its JSON
index file (``cfg.json``, ``state.json``, ``manifest.json``), the size and SHA-256 of every
other file (:func:`file_records`), and *seals* the index itself (:func:`seal`): a digest of
its canonical JSON without the seal, so editing any value (``"step"``, ``"k"``, a recorded
digest) is found too. Readers call :func:`verify_files` and :func:`check_seal`; both raise an
:class:`~saekit.errors.IntegrityError` naming the file. ``verify=False`` checks sizes only
(for huge files, where hashing costs more than the user wants to wait).

Loaders of other formats (peer SAEs, the hub) can use :func:`verify_file` with a digest they
know, and :func:`saekit.io.paths.reading` for their parse errors.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from saekit.errors import IntegrityError, MissingFileError

_FIX = "re-create it, or pass verify=False to load it anyway"


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: str | Path) -> dict[str, Any]:
    """``{"bytes": size, "sha256": digest}`` of a file."""
    p = Path(path)
    return {"bytes": p.stat().st_size, "sha256": sha256_file(p)}


def file_records(root: str | Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """:func:`file_record` of each ``root / name`` (names may hold ``/``), keyed by name."""
    return {n: file_record(Path(root) / n) for n in names}


def verify_file(path: str | Path, record: dict[str, Any], verify: bool = True) -> None:
    """Check ``path`` against ``record`` (size always; SHA-256 unless ``verify`` is False)."""
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"{p} is missing (its directory records it)")
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        raise IntegrityError(f"{p}: its recorded checksum is malformed; {_FIX}")
    size = p.stat().st_size
    if "bytes" in record and size != record["bytes"]:
        raise IntegrityError(
            f"{p} has {size} bytes, {record['bytes']} were written (truncated or changed);"
            " re-create it"
        )
    if verify and sha256_file(p) != record["sha256"]:
        raise IntegrityError(
            f"{p} does not match its SHA-256 (corrupt or changed after it was written); {_FIX}"
        )


def verify_files(root: str | Path, records: dict[str, dict[str, Any]], verify: bool = True) -> None:
    """:func:`verify_file` for every ``name -> record`` under ``root``."""
    if not isinstance(records, dict):
        raise IntegrityError(f"{root}: the recorded file checksums are malformed; {_FIX}")
    for name, rec in records.items():
        verify_file(Path(root) / name, rec, verify)


# ---------------------------------------------------------------------- sealed JSON
def canonical(obj: Any) -> bytes:
    """Canonical JSON bytes of ``obj`` as it reads back from a file (sorted keys)."""
    plain = json.loads(json.dumps(obj))  # tuples -> lists, exactly as a reader sees them
    return json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _without(obj: dict, key: tuple[str, ...]) -> dict:
    if len(key) == 1:
        return {k: v for k, v in obj.items() if k != key[0]}
    inner = obj.get(key[0])
    if not isinstance(inner, dict):
        return obj
    return {**obj, key[0]: _without(inner, key[1:])}


def _get(obj: dict, key: tuple[str, ...]) -> Any:
    for k in key[:-1]:
        obj = obj.get(k) if isinstance(obj, dict) else None  # type: ignore[assignment]
    return obj.get(key[-1]) if isinstance(obj, dict) else None


def seal(obj: dict, key: tuple[str, ...] = ("sha256",)) -> dict:
    """``obj`` with the digest of its canonical JSON (without ``key``) stored at ``key``."""
    digest = hashlib.sha256(canonical(_without(obj, key))).hexdigest()
    out = json.loads(json.dumps(obj))
    target = out
    for k in key[:-1]:
        target = target[k]
    target[key[-1]] = digest
    return out


def check_seal(
    obj: Any, path: str | Path, key: tuple[str, ...] = ("sha256",), required: bool = False
) -> bool:
    """Check the seal of a parsed JSON index; False when it has none (older files).

    ``required``: a missing seal is an error too.
    """
    want = _get(obj, key) if isinstance(obj, dict) else None
    if want is None:
        if required:
            raise IntegrityError(f"{path} has no recorded checksum ({'.'.join(key)}); {_FIX}")
        return False
    got = hashlib.sha256(canonical(_without(obj, key))).hexdigest()
    if got != want:
        raise IntegrityError(
            f"{path} does not match its recorded SHA-256 (edited or corrupt after it was"
            f" written); {_FIX}"
        )
    return True


__all__ = [
    "canonical",
    "check_seal",
    "file_record",
    "file_records",
    "seal",
    "sha256_file",
    "verify_file",
    "verify_files",
]
