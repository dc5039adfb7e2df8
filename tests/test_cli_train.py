"""``saekit train`` end to end on a tiny synthetic config, with ``--config`` JSON."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from saekit.cli import build_parser, main
from saekit.config import DataConfig, SAEConfig, TrainConfig
from saekit.io import load_sae

SYN = {"n_features": 48, "d": 12, "n_roots": 2, "depth": 2, "branching": 2, "block_size": 256}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def write_config(path: Path, out: Path, **extra) -> Path:
    cfg = {
        "sae": {"d_sae": 48, "k": 5},
        "train": {
            "out_dir": str(out),
            "total_tokens": 128 * 8,
            "batch_size": 128,
            "log_every": 4,
            "progress": False,
            "threads": 1,
        },
        "data": {"source": "synthetic", "synthetic": SYN},
        **extra,
    }
    path.write_text(json.dumps(cfg))
    return path


def _train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_every_config_field_is_a_flag() -> None:
    flags = {s for a in _train_parser()._actions for s in a.option_strings}
    for cls in (SAEConfig, TrainConfig, DataConfig):
        for f in dataclasses.fields(cls):
            name = "--" + f.name.replace("_", "-")
            if cls is DataConfig and f.name in ("device", "dtype"):
                name = "--model-" + f.name
            assert name in flags, name
    assert "--config" in flags


def test_cli_train_with_config_and_flag_override(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.json", out)
    assert main(["train", "--config", str(cfg), "--k", "3", "--aux-k", "16"]) == 0
    printed = capsys.readouterr().out
    assert "finished: 8 steps, 1,024 tokens" in printed and "L0 3.0" in printed
    sae = load_sae(out)
    assert (sae.d_in, sae.d_sae, sae.cfg.k, sae.cfg.aux_k) == (12, 48, 3, 16)
    saved = json.loads((out / "cfg.json").read_text())
    assert saved["k"] == 3 and saved["saekit"]["data"]["synthetic"] == SYN
    assert saved["saekit"]["train"]["total_tokens"] == 1024
    # re-running the finished run resumes from its final checkpoint: nothing to do
    assert main(["train", "--config", str(cfg), "--k", "3", "--aux-k", "16"]) == 0
    assert "finished: 8 steps" in capsys.readouterr().out
    # other configs on the same out_dir are refused with a clear message
    assert main(["train", "--config", str(cfg), "--k", "4"]) == 1
    assert "other configs" in capsys.readouterr().err


def test_cli_sweep_section(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep"
    saes = {"k2": {"k": 2}, "k4": {"k": 4, "rule": "batchtopk"}}
    cfg = write_config(tmp_path / "c.json", out, saes=saes)
    assert main(["train", "--config", str(cfg), "--prefetch", "2"]) == 0
    assert load_sae(out / "k2").cfg.k == 2
    k4 = load_sae(out / "k4")
    assert k4.cfg.rule == "batchtopk" and k4.cfg.k == 4 and k4.d_sae == 48
    printed = capsys.readouterr().out
    assert str(out / "k2") in printed and str(out / "k4") in printed


def test_cli_errors(tmp_path: Path, capsys) -> None:
    assert main(["train", "--config", str(tmp_path / "missing.json")]) == 1
    assert f"not found: {tmp_path / 'missing.json'}" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"sae": {}, "optim": {}}))
    assert main(["train", "--config", str(bad)]) == 1
    assert "unknown section" in capsys.readouterr().err
    cfg = write_config(tmp_path / "c.json", tmp_path / "r")
    assert main(["train", "--config", str(cfg), "--rule", "nosuch"]) == 1
    assert "SAEConfig.rule = 'nosuch' is not one of" in capsys.readouterr().err
    bad.write_text(json.dumps({"sae": {"kk": 3}}))
    assert main(["train", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "section 'sae': unknown SAEConfig field(s) 'kk'" in err and str(bad) in err


def test_cli_cache_then_train_on_it(tmp_path: Path, capsys) -> None:
    cache = tmp_path / "cache"
    syn = json.dumps(SYN)
    args = ["cache", "--source", "synthetic", "--synthetic", syn, "--out", str(cache)]
    assert main([*args, "--tokens", "1024", "--shard-tokens", "512"]) == 0
    assert "cache written" in capsys.readouterr().out
    out = tmp_path / "run"
    train_args = ["train", "--source", "cache", "--cache-dir", str(cache), "--out-dir", str(out)]
    opts = ["--total-tokens", "512", "--batch-size", "128", "--progress", "false", "--k", "2"]
    assert main([*train_args, *opts, "--threads", "1"]) == 0
    assert "finished: 4 steps" in capsys.readouterr().out
    assert load_sae(out).d_in == 12


def test_demo_defaults_are_shown_in_help() -> None:
    helps = {a.dest: a.help for a in _train_parser()._actions}
    assert "default: 300000; library default 2000000" in helps["total_tokens"]
    assert "default: 1024; library default 4096" in helps["batch_size"]


def test_the_command_is_the_library(tmp_path: Path, capsys) -> None:
    """Issue 10 seam 7: ``saekit train`` is ``train_run(load_run_config(...))``; the config
    layering, the sweep's site resolution and prefetching live in the library."""
    from saekit.run_config import load_run_config, train_run

    saes = {"k2": {"k": 2}, "k4": {"k": 4, "rule": "batchtopk"}}
    cfg = write_config(tmp_path / "c.json", tmp_path / "cli", saes=saes)
    assert main(["train", "--config", str(cfg), "--prefetch", "2", "--aux-k", "8"]) == 0
    overrides = {"train": {"out_dir": str(tmp_path / "lib")}, "data": {"prefetch": 2}}
    rc = load_run_config(cfg, {**overrides, "sae": {"aux_k": 8}})
    assert rc.saes["k4"][1].aux_k == 8 and rc.saes["k4"][1].rule == "batchtopk"
    res = train_run(rc)
    for name in saes:
        a, b = load_sae(tmp_path / "cli" / name), res.saes[name]
        assert all(
            torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values())
        )
