"""A tiny training run that SIGKILLs itself at a chosen fault point (for the kill tests).

``python kill_child.py OUT_DIR KILL`` (or :func:`forked` from a test, which is much faster
than a fresh interpreter) trains the SOAK config into OUT_DIR. Fault points are
counted in order: every ``os.replace``, ``shutil.rmtree``, ``os.fsync``, safetensors write
and training step, each *before* it happens. ``KILL`` is

* ``N`` (an integer): kill at the N-th fault point of any kind (0: never);
* ``swap:N``: kill at the N-th ``os.replace`` that moves a temporary checkpoint directory
  onto ``checkpoint`` (between the two renames of a swap).

At the end it prints ``{"points": count, "steps": ..., "already_finished": ...}``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

SOAK = {
    "sae": {"d_sae": 32, "k": 4},
    "data": {
        "n_features": 40,
        "d": 12,
        "n_roots": 2,
        "depth": 2,
        "branching": 2,
        "block_size": 64,
    },
    "train": {"total_tokens": 64 * 12, "batch_size": 64, "checkpoint_every": 2, "log_every": 1},
}


def run(out: str, spec: str) -> dict:
    """Train SOAK into ``out``, killing this process at the fault point ``spec``."""
    kind, _, n = spec.rpartition(":")
    kill_at = int(n)
    count = {"all": 0, "swap": 0}
    labels: list[str] = []

    def point(is_swap: bool = False, label: str = "") -> None:
        labels.append(label)
        count["all"] += 1
        count["swap"] += is_swap
        hit = count["swap"] if kind == "swap" else count["all"]
        if kill_at and hit == kill_at and (kind != "swap" or is_swap):
            os.kill(os.getpid(), signal.SIGKILL)

    real_replace, real_rmtree, real_fsync = os.replace, shutil.rmtree, os.fsync

    def replace(src, dst, *a, **k):
        swap = Path(dst).name == "checkpoint" and Path(src).name.startswith(".checkpoint.tmp")
        point(swap, "swap" if swap else "replace")
        return real_replace(src, dst, *a, **k)

    def rmtree(path, *a, **k):
        point(label="rmtree")
        return real_rmtree(path, *a, **k)

    def fsync(fd):
        point(label="fsync")
        return real_fsync(fd)

    import torch

    from saekit import SAEConfig, TrainConfig
    from saekit.io import atomic
    from saekit.sources.synthetic import SyntheticConfig, SyntheticSource
    from saekit.train import Trainer, train

    real_save, real_step = atomic.save_file, Trainer.train_step

    def save_file(*a, **k):
        point(label="save")
        return real_save(*a, **k)

    def train_step(self, batch):
        point(label="step")
        return real_step(self, batch)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    os.replace, shutil.rmtree, os.fsync = replace, rmtree, fsync
    atomic.save_file, Trainer.train_step = save_file, train_step
    try:
        tcfg = TrainConfig(out_dir=str(out), progress=False, threads=1, **SOAK["train"])
        src = SyntheticSource(SyntheticConfig(**SOAK["data"]))
        res = train(SAEConfig(**SOAK["sae"]), tcfg, src)
    finally:
        os.replace, shutil.rmtree, os.fsync = real_replace, real_rmtree, real_fsync
        atomic.save_file, Trainer.train_step = real_save, real_step
        torch.set_num_threads(threads)
    done = getattr(res, "already_finished", None)
    return {"points": count["all"], "labels": labels, "steps": res.steps, "already_finished": done}


def forked(out: str | Path, spec: str) -> tuple[int | None, dict | None]:
    """Run :func:`run` in a forked child: ``(signal that ended it or None, its result)``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into the caller
        code = 1
        try:
            os.close(r)
            res = run(str(out), spec)
            os.write(w, json.dumps(res).encode())
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return os.WTERMSIG(status), None
    if os.WEXITSTATUS(status) != 0:
        raise RuntimeError(f"the training child failed (exit {os.WEXITSTATUS(status)})")
    return None, json.loads(data)


def main() -> None:
    print(json.dumps(run(sys.argv[1], sys.argv[2])))


if __name__ == "__main__":
    main()
