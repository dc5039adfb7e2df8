"""The out-dir lock, stale temporary checkpoints and checkpoint recovery.

On 9e49562 two runs on one out_dir both ran (mixing metrics, one overwriting the other's
result), a ``.checkpoint.tmp-<pid>`` left by a kill stayed forever, and a complete one was
ignored.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from fault_helpers import SYN, tiny_cache, tiny_train
from saekit.cli import main
from saekit.errors import LockedError
from saekit.io import checkpoint as ckpt
from saekit.sources.base import ActivationSource, Batch
from saekit.sources.synthetic import SyntheticConfig, SyntheticSource


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


class Gate(ActivationSource):
    """A synthetic source whose first batch waits until ``release`` is set."""

    def __init__(self) -> None:
        self.inner = SyntheticSource(SyntheticConfig(**SYN))
        self.sites = self.inner.sites
        self.started, self.release = threading.Event(), threading.Event()

    def d_in(self, site: str) -> int:
        return self.inner.d_in(site)

    def next_batch(self, batch_size: int) -> Batch:
        self.started.set()
        assert self.release.wait(60)
        return self.inner.next_batch(batch_size)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def hold_run(out: Path):
    """Start a training run on ``out`` in a thread, stopped inside its first step."""
    gate = Gate()
    box: dict = {}
    t = threading.Thread(target=lambda: box.update(res=tiny_train(out, source=gate)))
    t.start()
    assert gate.started.wait(60)
    return gate, t, box


def test_second_writer_is_refused(tmp_path: Path, capsys) -> None:
    gate, t, box = hold_run(tmp_path / "run")
    try:
        with pytest.raises(LockedError, match=rf"run directory {tmp_path / 'run'} is in use"):
            tiny_train(tmp_path / "run")
        flags = ["--source", "synthetic", "--out-dir", str(tmp_path / "run"), "--k", "4"]
        assert main(["train", *flags, "--total-tokens", "256", "--batch-size", "64"]) == 1
        err = capsys.readouterr().err.strip()
        assert f"pid {os.getpid()}" in err and len(err.splitlines()) == 1
    finally:
        gate.release.set()
        t.join(60)
    assert box["res"].completed
    assert tiny_train(tmp_path / "run").already_finished  # released on exit
    assert not (tmp_path / "run" / ".saekit.lock").exists()


def test_stale_lock_of_a_dead_process_does_not_block(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / ".saekit.lock").write_text(f'{{"pid": {dead_pid()}, "host": "x"}}')
    assert tiny_train(run).completed


def test_stale_lock_without_flock_uses_the_pid(tmp_path: Path, monkeypatch) -> None:
    """Where flock is unsupported the recorded pid decides: dead is stale, alive holds."""
    import errno

    from saekit.io import lock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock.fcntl, "flock", no_flock)
    f = tmp_path / ".x.lock"
    f.write_text(f'{{"pid": {dead_pid()}, "host": "{os.uname().nodename}"}}')
    with lock.DirLock(f, "dir x"):
        pass
    f.write_text(f'{{"pid": 1, "host": "{os.uname().nodename}"}}')  # pid 1 is alive
    with pytest.raises(LockedError, match="pid 1"), lock.DirLock(f, "dir x"):
        pass


def test_cache_writer_is_locked(tmp_path: Path) -> None:
    from saekit.sources.cache import write_cache

    gate = Gate()
    box: dict = {}
    out = tmp_path / "c"
    t = threading.Thread(target=lambda: box.update(p=write_cache(gate, out, 128)))
    t.start()
    assert gate.started.wait(60)
    try:
        with pytest.raises(LockedError, match="activation cache"):
            write_cache(SyntheticSource(SyntheticConfig(**SYN)), out, 128, overwrite=True)
    finally:
        gate.release.set()
        t.join(60)
    assert box["p"] == out and not list(tmp_path.glob(".c.*"))


def test_stale_temp_checkpoints_are_removed(tmp_path: Path) -> None:
    tiny_train(tmp_path, stop_after_steps=4)
    stale = tmp_path / f".checkpoint.tmp-{dead_pid()}"
    shutil.copytree(tmp_path / "checkpoint", stale)
    (stale / "state.json").unlink()  # an incomplete write
    live = tmp_path / ".checkpoint.tmp-1"  # pid 1 is alive: not ours to delete
    live.mkdir()
    assert tiny_train(tmp_path).completed
    assert not stale.exists() and live.exists()
    shutil.rmtree(live)


def test_stale_temp_checkpoints_removed_without_resume(tmp_path: Path) -> None:
    tiny_train(tmp_path, stop_after_steps=4)
    stale = tmp_path / f".checkpoint.tmp-{dead_pid()}"
    shutil.copytree(tmp_path / "checkpoint", stale)
    assert tiny_train(tmp_path, resume=False).completed
    assert not stale.exists()


def test_complete_temp_checkpoint_is_recovered(tmp_path: Path) -> None:
    """Killed between the two renames: ``.old`` holds step 4, the temp dir step 6."""
    ref = tiny_train(tmp_path / "ref")
    run = tmp_path / "run"
    tiny_train(run, stop_after_steps=4)
    os.replace(run / "checkpoint", run / ".checkpoint.old")
    step6 = tmp_path / "six"
    tiny_train(step6, stop_after_steps=6)
    tmp = run / f".checkpoint.tmp-{dead_pid()}"
    shutil.copytree(step6 / "checkpoint", tmp)
    shutil.copy(step6 / "metrics.jsonl", run / "metrics.jsonl")
    notes = ckpt.recover_checkpoint(run / "checkpoint")
    assert any("step 6" in n for n in notes), notes
    meta, _ = ckpt.read_checkpoint(run / "checkpoint")
    assert meta["step"] == 6
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
    res = tiny_train(run)
    for k, v in ref.sae.state_dict().items():
        assert torch.equal(res.sae.state_dict()[k], v), k


def test_corrupt_checkpoint_with_good_backup(tmp_path: Path) -> None:
    tiny_train(tmp_path, stop_after_steps=4)
    shutil.copytree(tmp_path / "checkpoint", tmp_path / ".checkpoint.old")
    (tmp_path / "checkpoint" / "misc.safetensors").write_bytes(b"junk")
    notes = ckpt.recover_checkpoint(tmp_path / "checkpoint")
    assert any(".checkpoint.corrupt" in n for n in notes), notes
    assert ckpt.read_checkpoint(tmp_path / "checkpoint")[0]["step"] == 4
    assert (tmp_path / ".checkpoint.corrupt").is_dir()  # kept, never silently deleted


def test_corrupt_checkpoint_alone_is_an_error(tmp_path: Path) -> None:
    tiny_train(tmp_path, stop_after_steps=4)
    (tmp_path / "checkpoint" / "misc.safetensors").write_bytes(b"junk")
    with pytest.raises(ckpt.CheckpointError, match="misc.safetensors"):
        tiny_train(tmp_path)


def test_cache_stale_temp_dirs_removed(tmp_path: Path) -> None:
    stale = tmp_path / f".c.tmp-{dead_pid()}"
    stale.mkdir()
    (stale / "junk").write_text("x")
    tiny_cache(tmp_path / "c")
    assert not stale.exists()
