"""``metrics.jsonl``: the training log of a run directory, robust to kills and bad bytes.

A kill can cut the last line short; a disk error or an editor can leave bytes that are not
UTF-8. Neither blocks resuming: :func:`read_rows` skips (and counts) lines that are not
JSON objects, :func:`truncate` keeps the rows up to the resumed step and
:func:`set_aside` moves the log of an earlier run aside when a run starts afresh.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from saekit.io.atomic import write_bytes

FILE = "metrics.jsonl"


def read_rows(path: str | Path) -> tuple[list[dict[str, Any]], list[int]]:
    """``(rows, bad line numbers)`` of a JSONL log; undecodable or non-JSON lines are skipped."""
    rows: list[dict[str, Any]] = []
    bad: list[int] = []
    p = Path(path)
    if not p.is_file():
        return rows, bad
    for lineno, raw in enumerate(p.read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            bad.append(lineno)
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(lineno)
    return rows, bad


def truncate(path: str | Path, step: int) -> list[int]:
    """Keep the rows with ``"step" <= step`` (written before the checkpoint resumed from).

    Returns the numbers of the lines dropped as unreadable (cut short by a kill, bad bytes).
    """
    p = Path(path)
    if not p.is_file():
        return []
    rows, bad = read_rows(p)
    keep = [r for r in rows if isinstance(r.get("step"), (int, float)) and r["step"] <= step]
    write_bytes(p, "".join(json.dumps(r) + "\n" for r in keep).encode())
    return bad


def set_aside(run_dir: str | Path) -> Path | None:
    """Move an existing ``metrics.jsonl`` to ``metrics.old-<n>.jsonl``; returns the new path."""
    p = Path(run_dir) / FILE
    if not p.is_file():
        return None
    n = 1
    while (dst := p.with_name(f"metrics.old-{n}.jsonl")).exists():
        n += 1
    p.rename(dst)
    return dst


def warn_if_worse(path: str | Path, drop: float = 0.05) -> None:
    """Warn for every SAE whose logged training FVE fell by more than ``drop`` over the
    run (first logged step to last) while its L0 did not fall by a tenth (a sparsity
    penalty warming up trades FVE for L0): it got worse as it trained."""
    rows, _ = read_rows(path)
    first: dict[str, tuple[float, float]] = {}
    last: dict[str, tuple[float, float]] = {}
    for r in rows:
        name, f, l0 = r.get("sae"), r.get("fve"), r.get("l0")
        if isinstance(name, str) and isinstance(f, (int, float)) and isinstance(l0, (int, float)):
            first.setdefault(name, (float(f), float(l0)))
            last[name] = (float(f), float(l0))
    for name, (f0, l0) in first.items():
        f1, l1 = last[name]
        if f1 < f0 - drop and l1 >= 0.9 * l0:
            warnings.warn(
                f"SAE {name!r}: training FVE fell from {f0:.3f} to {f1:.3f} during the run"
                f" at L0 {l0:.1f} -> {l1:.1f}: it got worse as it trained (check the rule's"
                " options and the lr)",
                UserWarning,
                stacklevel=4,
            )


__all__ = ["FILE", "read_rows", "set_aside", "truncate", "warn_if_worse"]
