"""``saekit doctor``: says what is wrong with a run or cache directory, changes nothing."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from fault_helpers import flip_bit, tiny_cache, tiny_train
from saekit.cli import main
from saekit.io.lock import run_lock


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("doctor")
    tiny_train(root / "run")
    tiny_train(root / "part", stop_after_steps=4)
    tiny_cache(root / "cache")
    return {"run": root / "run", "part": root / "part", "cache": root / "cache"}


def doctor(capsys, *args: str) -> tuple[int, str]:
    rc = main(["doctor", *map(str, args)])
    return rc, capsys.readouterr().out


def copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_healthy_run_cache_and_partial_run(dirs, capsys) -> None:
    rc, out = doctor(capsys, dirs["run"], dirs["cache"], dirs["part"])
    assert rc == 0
    assert f"{dirs['run']}: healthy" in out and "finished at step 8" in out
    assert f"{dirs['cache']}: healthy" in out and "2 shard file(s), SHA-256 ok" in out
    assert "no final SAE yet" in out and "step 4 of 8" in out


def test_flipped_bit_in_weights(dirs, tmp_path: Path, capsys) -> None:
    run = copy(dirs["run"], tmp_path)
    flip_bit(run / "sae_weights.safetensors", -7)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    rc, out = doctor(capsys, run)
    assert rc == 1 and "1 problem(s)" in out
    assert f"fail  {run / 'sae_weights.safetensors'}: " in out and "SHA-256" in out
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # unchanged


def test_edited_cfg_and_checkpoint(dirs, tmp_path: Path, capsys) -> None:
    run = copy(dirs["part"], tmp_path)
    sj = run / "checkpoint" / "state.json"
    meta = json.loads(sj.read_text())
    meta["step"] = 3
    sj.write_text(json.dumps(meta))
    rc, out = doctor(capsys, run)
    assert rc == 1 and f"fail  {run / 'checkpoint'}: " in out and "state.json" in out


def test_leftovers_of_kills_are_warnings(dirs, tmp_path: Path, capsys) -> None:
    run = copy(dirs["part"], tmp_path)
    os.replace(run / "checkpoint", run / ".checkpoint.old")
    (run / ".checkpoint.tmp-999999999").mkdir()
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 9, "lo')
    rc, out = doctor(capsys, run, "--quiet")
    assert rc == 0, out
    assert "interrupted checkpoint swap" in out and "incomplete checkpoint write" in out
    assert "unreadable line(s) [5]" in out and "ok  " not in out


def test_locked_run_is_reported(dirs, capsys) -> None:
    with run_lock(dirs["part"]):
        rc, out = doctor(capsys, dirs["part"])
    assert rc == 0 and f"in use by pid {os.getpid()}" in out


def test_corrupt_cache_and_not_a_run(dirs, tmp_path: Path, capsys) -> None:
    cache = copy(dirs["cache"], tmp_path)
    flip_bit(cache / "synthetic" / "acts_00001.npy", -1)
    rc, out = doctor(capsys, cache)
    assert rc == 1 and "acts_00001.npy does not match its SHA-256" in out
    rc, out = doctor(capsys, cache, "--sizes-only")
    assert rc == 0
    (tmp_path / "empty").mkdir()
    rc, out = doctor(capsys, tmp_path / "empty", tmp_path / "nowhere")
    assert rc == 1 and "neither a saekit run nor a cache" in out and "not a directory" in out


def test_compressed_model(tmp_path: Path, capsys) -> None:
    from test_integrity import _compressed

    d = _compressed(tmp_path)
    rc, out = doctor(capsys, d)
    assert rc == 0 and "file(s) of the compressed model, SHA-256 ok" in out
    flip_bit(d / "model.saekit-lowrank.safetensors", -3)
    rc, out = doctor(capsys, d)
    assert rc == 1 and "model.saekit-lowrank.safetensors does not match its SHA-256" in out
