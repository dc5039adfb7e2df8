"""``--log wandb`` (offline) and ``--log tensorboard``: step metrics, config, summary, eval."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest

from saekit.cli import main
from saekit.errors import EnvironmentProblem

SYN = '{"n_features": 64, "d": 16, "n_roots": 2}'
TRAIN = ["train", "--source", "synthetic", "--synthetic", SYN, "--d-sae", "64", "--k", "4",
         "--total-tokens", "10240", "--batch-size", "1024", "--log-every", "2",
         "--checkpoint-every", "0", "--progress", "false"]  # fmt: skip


def _wandb_records(run_dir: Path) -> list:
    """The records of the offline run files (LevelDB log blocks of wandb protobufs)."""
    out = []
    for path in sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))):
        out += _records(Path(path).read_bytes())
    return out


def _records(data: bytes) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        n, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_run(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb", reason="wandb is a dev/[wandb] extra")
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    assert main([*TRAIN, "--out-dir", str(out), "--log", "wandb"]) == 0
    state = json.loads((out / "tracking.json").read_text())
    recs = _wandb_records(out)
    run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
    assert run.run_id == state["wandb_id"]
    config = {_key(i): json.loads(i.value_json) for i in run.config.update}
    assert config["train"]["total_tokens"] == 10240
    hist = [r.history for r in recs if r.WhichOneof("record_type") == "history"]
    assert [h.step.num for h in hist] == [2, 4, 6, 8, 10]
    keys = {_key(i) for h in hist for i in h.item}
    assert {"loss", "fve", "l0", "dead_frac"} <= keys
    summary = {
        i.key for r in recs if r.WhichOneof("record_type") == "summary" for i in r.summary.update
    }
    assert {"final/fve", "final/loss"} <= summary
    assert main(["eval", str(out), "--tokens", "2048", "--plots", "false"]) == 0
    assert {"eval/fve", "eval/l0"} <= _summary_keys(out, "eval/fve")  # same run id, resumed


def _summary_keys(out: Path, wait_for: str, timeout: float = 60.0) -> set[str]:
    """Summary keys of the run's files; wandb's service may still be writing the last one."""
    import time

    t0 = time.monotonic()
    while True:
        recs = _wandb_records(out)
        keys = {
            _key(i)
            for r in recs
            if r.WhichOneof("record_type") == "summary"
            for i in r.summary.update
        }
        if wait_for in keys or time.monotonic() - t0 > timeout:
            return keys
        time.sleep(0.5)


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_tensorboard_event_files_resume_and_eval(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is a dev/[tensorboard] extra")
    out = tmp_path / "run"
    args = [*TRAIN, "--out-dir", str(out), "--log", "tensorboard", "--checkpoint-every", "2"]
    assert main([*args, "--stop-after-steps", "6"]) == 0  # like a kill after step 6
    assert main(args) == 0  # resumed
    sc = _scalars(out / "tensorboard")
    assert [s for s, _ in sc["loss"]] == [2, 4, 6, 8, 10]  # no step twice across the resume
    uninterrupted = tmp_path / "ref"
    assert main([*TRAIN, "--out-dir", str(uninterrupted), "--log", "tensorboard"]) == 0
    ref = _scalars(uninterrupted / "tensorboard")
    assert [v for _, v in sc["loss"]] == [v for _, v in ref["loss"]]
    assert "final/fve" in sc
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [v for _, v in sc["fve"]] == pytest.approx([r["fve"] for r in lines])
    assert main(["eval", str(out), "--tokens", "2048", "--plots", "false"]) == 0
    sc = _scalars(out / "tensorboard")
    assert sc["eval/fve"][0][0] == 10  # at the run's last step


def test_missing_tracker_package_is_one_line(monkeypatch, tmp_path: Path) -> None:
    import builtins

    real = builtins.__import__

    def no_tb(name, *a, **kw):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("no tensorboard")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tb)
    from saekit.tracking import open_tracker

    with pytest.raises(EnvironmentProblem, match=r"pip install 'saekit\[tensorboard\]'"):
        open_tracker("tensorboard", tmp_path, {})
