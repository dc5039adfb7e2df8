"""The trainer's bookkeeping of a run directory: recovery at start, finished runs.

:func:`prepare` runs under the directory's lock before anything is read: it recovers the
newest complete checkpoint left by interrupted writes (or, with ``resume`` off, only
removes the stale temporary copies of dead processes). :func:`is_finished` and
:func:`finished_result` let a re-run of a finished run return at once, rewriting nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from saekit.errors import CheckpointError, SaekitError
from saekit.io import checkpoint as ckpt
from saekit.io.atomic import read_json, remove_stale_temps
from saekit.io.native import CFG_FILE


def prepare(ckpt_dir: str | Path, resume: bool) -> list[str]:
    """Recover ``ckpt_dir`` (``resume``) or drop stale temporary copies; returns notes.

    Also deletes the temporary files of atomic writes killed in the run directory (and
    its per-SAE subdirectories).
    """
    out = Path(ckpt_dir).parent
    dirs = [out, *(d for d in out.iterdir() if d.is_dir() and not d.name.startswith("."))]
    dirs = [d for d in dirs if d.is_dir()]
    notes = [f"removed {p}, left by a killed write" for d in dirs for p in remove_stale_temps(d)]
    if resume:
        return notes + ckpt.recover_checkpoint(ckpt_dir)
    return notes + ckpt.remove_stale_writes(ckpt_dir)


@contextlib.contextmanager
def checkpoint_fields(ckpt_dir: str | Path) -> Iterator[None]:
    """A checkpoint without a field the trainer needs is a CheckpointError naming it."""
    try:
        yield
    except SaekitError:
        raise
    except (KeyError, IndexError, TypeError) as e:
        raise CheckpointError(
            f"checkpoint {Path(ckpt_dir) / ckpt.STATE_JSON} lacks {e} (written by another"
            " saekit version, or edited); use another out_dir or resume=false"
        ) from e


def _saved(run_dir: Path) -> dict[str, Any] | None:
    try:
        cfg = read_json(run_dir / CFG_FILE)
    except (SaekitError, OSError):
        return None
    section = cfg.get("saekit") if isinstance(cfg, dict) else None
    return section if isinstance(section, dict) else None


def is_finished(run_dirs: list[Path], step: int) -> bool:
    """True when every run directory holds the final files of a run that ended at ``step``."""
    for d in run_dirs:
        section = _saved(Path(d))
        if section is None or section.get("steps") != step:
            return False
        if not (Path(d) / "sae_weights.safetensors").is_file():
            return False
    return True


def finished_result(result: Any) -> Any:
    """``result`` (a TrainResult) marked ``already_finished``, with the saved final metrics."""
    metrics = dict(result.metrics)
    for name, d in result.run_dirs.items():
        section = _saved(Path(d)) or {}
        saved = section.get("final_metrics")
        if isinstance(saved, dict) and saved:
            metrics[name] = saved
    return dataclasses.replace(result, metrics=metrics, already_finished=True)


__all__ = ["checkpoint_fields", "finished_result", "is_finished", "prepare"]
