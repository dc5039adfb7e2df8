"""kill -9 at random points (inside checkpoint writes too), resume, compare to the bit.

Each trial kills a forked training child (tests/kill_child.py) at random fault points, then
lets it finish; the result must equal an uninterrupted run bit for bit, with a metrics log
free of duplicates and no stale temporary checkpoint left. A few trials run in ``make
test``; the ``slow`` soak runs many.
"""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest
import torch

from kill_child import forked, run
from saekit.io import load_sae

KILLED = signal.SIGKILL


def read_rows(path: Path) -> tuple[list[dict], list[int]]:
    lines = path.read_bytes().splitlines()
    rows, bad = [], []
    for i, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            bad.append(i)
    return rows, bad


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ref") / "run"
    res = run(str(out), "0")  # in this process: also warms imports for the forks
    return {
        "points": res["points"],
        "labels": res["labels"],
        "state": load_sae(out).state_dict(),
        "steps": [r["step"] for r in read_rows(out / "metrics.jsonl")[0]],
    }


def check_against(out: Path, ref: dict) -> None:
    state = load_sae(out).state_dict()
    assert state.keys() == ref["state"].keys()
    for k, v in ref["state"].items():
        assert torch.equal(state[k], v), k
    rows, bad = read_rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == ref["steps"] and not bad
    leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert leftovers == [], leftovers


def soak(root: Path, ref: dict, trials: int, seed: int, max_kills: int = 3) -> list[list[int]]:
    """``trials`` kill-resume trials; returns the kill points of each (all checked)."""
    rng = random.Random(seed)
    kills = []
    for t in range(trials):
        out = root / f"trial{t}"
        points = []
        for _ in range(rng.randint(1, max_kills)):
            k = rng.randint(1, ref["points"])
            sig, _ = forked(out, str(k))
            points.append(k if sig == KILLED else -k)  # negative: the run finished first
        sig, res = forked(out, "0")
        assert sig is None and res["steps"] == 12
        check_against(out, ref)
        kills.append(points)
    return kills


def test_uninterrupted_child_matches_reference(tmp_path: Path, reference: dict) -> None:
    sig, res = forked(tmp_path / "run", "0")
    assert sig is None and res["points"] == reference["points"]
    check_against(tmp_path / "run", reference)


def test_double_kill_around_swaps_keeps_a_checkpoint(tmp_path: Path, reference: dict) -> None:
    """The issue's case: a kill between the two renames of a swap, then a kill in the next
    write. On 9e49562 the second write deleted ``.checkpoint.old`` first, so no checkpoint
    was left and the third run restarted at step 0, appending to metrics.jsonl."""
    out = tmp_path / "run"
    assert forked(out, "swap:2")[0] == KILLED  # between the renames of the 2nd checkpoint
    assert forked(out, "swap:1")[0] == KILLED  # in the next checkpoint write
    sig, res = forked(out, "0")
    assert sig is None and res["steps"] == 12
    check_against(out, reference)


def checkpoint_write_points(ref: dict) -> list[int]:
    """The fault points of the checkpoint write after step 4 (files, fsyncs, renames)."""
    steps = [i + 1 for i, lab in enumerate(ref["labels"]) if lab == "step"]
    window = list(range(steps[3] + 1, steps[4]))
    assert "swap" in [ref["labels"][k - 1] for k in window]
    return window


def kill_each(tmp_path: Path, ref: dict, points: list[int]) -> None:
    for k in points:
        out = tmp_path / f"k{k}"
        assert forked(out, str(k))[0] == KILLED
        sig, _ = forked(out, "0")
        assert sig is None
        check_against(out, ref)


def test_kill_inside_a_checkpoint_write(tmp_path: Path, reference: dict) -> None:
    """Kills spread over one checkpoint write, the swap's renames included."""
    window = checkpoint_write_points(reference)
    swap = next(k for k in window if reference["labels"][k - 1] == "swap")
    picks = sorted({window[0], window[len(window) // 3], swap - 1, swap, swap + 1, window[-1]})
    kill_each(tmp_path, reference, picks)


@pytest.mark.slow
def test_kill_at_every_point_of_a_checkpoint_write(tmp_path: Path, reference: dict) -> None:
    kill_each(tmp_path, reference, checkpoint_write_points(reference))


def test_kill_inside_the_final_save(tmp_path: Path, reference: dict) -> None:
    """A kill while the final files are written leaves a ``.<file>.<pid>.*.tmp``; the next
    start removes it (the soak found this)."""
    labels = reference["labels"]
    last_step = max(i for i, lab in enumerate(labels) if lab == "step") + 1
    saves = [i + 1 for i, lab in enumerate(labels) if lab == "save" and i + 1 > last_step]
    kill_each(tmp_path, reference, saves[-3:])  # sae_weights, saekit_state, sparsity


def test_soak_a_few_trials(tmp_path: Path, reference: dict) -> None:
    kills = soak(tmp_path, reference, trials=3, seed=0, max_kills=2)
    assert sum(k > 0 for ks in kills for k in ks) >= 3


@pytest.mark.slow
def test_soak_many_trials(tmp_path: Path, reference: dict) -> None:
    kills = soak(tmp_path, reference, trials=40, seed=1, max_kills=3)
    n_kills = sum(k > 0 for ks in kills for k in ks)
    summary = {"trials": len(kills), "kills": n_kills, "points": reference["points"]}
    print("\nsoak:", json.dumps({**summary, "kill_points": kills}))
    assert n_kills >= 40
