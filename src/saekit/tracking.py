"""Experiment tracking: ``--log wandb | tensorboard | none``.

The trainer opens one tracker per run (:func:`open_tracker`), logs the run's configs once,
every ``metrics.jsonl`` row (``<sae>/<metric>`` at the row's step) and, on close, the last
rows as the run summary; ``saekit eval`` adds its headline numbers to the same run
(:func:`log_eval`). Tracking never changes the numbers of a run.

- ``wandb``: ``wandb.init(dir=out_dir, mode=$WANDB_MODE or "offline")`` [our choice:
  offline unless ``WANDB_MODE`` says otherwise, so no account or network is needed; sync
  later with ``wandb sync out_dir/wandb/offline-run-*``]. The run id is kept in
  ``out_dir/tracking.json``, so a resumed run continues the same wandb run.
- ``tensorboard``: event files under ``out_dir/tensorboard`` (``SummaryWriter`` from
  ``torch.utils.tensorboard``); a resumed run purges events after its checkpoint step.

Both need their package (``pip install 'saekit[wandb]'`` / ``'saekit[tensorboard]'``).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from saekit.errors import EnvironmentProblem
from saekit.io.atomic import read_json, write_json

TRACKERS = ("none", "wandb", "tensorboard")
STATE_FILE = "tracking.json"
SKIP = ("step", "sae", "site")


def _flat(rows: list[dict[str, Any]], multi: bool) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in rows:
        prefix = f"{r.get('sae')}/" if multi else ""
        for k, v in r.items():
            if k not in SKIP and isinstance(v, (int, float)) and not isinstance(v, bool):
                out[prefix + k] = float(v)
    return out


class Tracker:
    """No tracking (``--log none``); the base of the real trackers."""

    kind = "none"

    def __init__(self) -> None:
        self.last: list[dict[str, Any]] = []
        self.multi = False

    def log(self, rows: list[dict[str, Any]]) -> None:
        """One ``metrics.jsonl`` step: a row per SAE, all with the same ``step``."""
        if not rows:
            return
        self.multi = self.multi or len({r.get("sae") for r in rows}) > 1
        self.last = rows
        self._write(int(rows[0]["step"]), _flat(rows, self.multi))

    def _write(self, step: int, scalars: dict[str, float]) -> None:
        pass

    def summary(self, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        if self.last:
            self.summary({f"final/{k}": v for k, v in _flat(self.last, self.multi).items()})

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WandbTracker(Tracker):
    kind = "wandb"

    def __init__(self, out_dir: Path, project: str, config: dict[str, Any], run_id: str) -> None:
        super().__init__()
        try:
            import wandb
        except ImportError as e:
            raise EnvironmentProblem(
                "--log wandb needs the wandb package: pip install 'saekit[wandb]'"
            ) from e
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=project,
            dir=str(out_dir),
            id=run_id,
            resume="allow",
            reinit="finish_previous",
            name=out_dir.name,
            mode=os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]
            config=config,
        )

    def _write(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def summary(self, values: dict[str, float]) -> None:
        self.run.summary.update(values)

    def close(self) -> None:
        super().close()
        self.run.finish()


class TensorBoardTracker(Tracker):
    kind = "tensorboard"

    def __init__(self, out_dir: Path, config: dict[str, Any], purge_step: int | None) -> None:
        super().__init__()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise EnvironmentProblem(
                "--log tensorboard needs the tensorboard package: pip install 'saekit[tensorboard]'"
            ) from e
        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=purge_step)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)
        self.step = max((purge_step or 1) - 1, 0)
        self.state_path: Path | None = None

    def _write(self, step: int, scalars: dict[str, float]) -> None:
        self.step = step
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def summary(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, self.step)
        self.writer.flush()

    def close(self) -> None:
        super().close()
        self.writer.close()
        if self.state_path is not None:
            write_json(self.state_path, {**read_json(self.state_path), "step": self.step})


def open_tracker(
    kind: str, out_dir: str | Path, config: dict[str, Any], step: int = 0, project: str = "saekit"
) -> Tracker:
    """The tracker for ``kind`` (see the module doc); ``step``: the step resumed from."""
    out = Path(out_dir)
    if kind == "none":
        return Tracker()
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_FILE
    state = read_json(state_path) if state_path.is_file() else {}
    if kind == "wandb":
        run_id = str(state.get("wandb_id") or uuid.uuid4().hex[:12])
        write_json(state_path, {**state, "kind": kind, "wandb_id": run_id, "project": project})
        return WandbTracker(out, project, config, run_id)
    if kind == "tensorboard":
        write_json(state_path, {**state, "kind": kind})
        # events after the checkpoint's step are purged (its own step's rows were kept)
        tb = TensorBoardTracker(out, config, step + 1 if step > 0 else None)
        tb.state_path = state_path
        return tb
    raise EnvironmentProblem(f"unknown tracker {kind!r}; use one of {', '.join(TRACKERS)}")


def log_eval(run_dir: str | Path, result: dict[str, Any]) -> bool:
    """Add an evaluation's core and spliced-CE numbers (``eval/...``) to the run's tracker,
    if it was trained with one (``tracking.json`` in the run or, for a sweep, its parent)."""
    run = Path(run_dir)
    path = next((d / STATE_FILE for d in (run, run.parent) if (d / STATE_FILE).is_file()), None)
    if path is None:
        return False
    state = read_json(path)
    sec = result.get("sae", {})
    values = {}
    for name in ("core", "splice"):
        part = sec.get(name) if isinstance(sec.get(name), dict) else {}
        for k, v in part.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                values[f"eval/{k}"] = float(v)
    kind = state.get("kind")
    if kind == "wandb":
        project = str(state.get("project", "saekit"))
        t: Tracker = WandbTracker(path.parent, project, {}, str(state["wandb_id"]))
    elif kind == "tensorboard":
        t = TensorBoardTracker(path.parent, {"eval_config": result.get("eval_config", {})}, None)
        t.step = int(state.get("step", 0))
    else:
        return False
    t.summary(values)
    t.close()
    return True


__all__ = ["TRACKERS", "Tracker", "log_eval", "open_tracker"]
