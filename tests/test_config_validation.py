"""Issue 13 item 7 and the config part of item 6: every config field is validated, once.

Each probe fails on main at 9e49562, where the value was stored silently (``--k 0``,
``--lr -0.001``/``nan`` -> the default lr, ``"resume": "false"`` resumed) or failed far from
its source (``--expansion 0``: ZeroDivisionError; ``"sites": "layers.3.resid_post"``: ``bad
hook site 'l'``). Only APIs that existed then are used, so that the tests fail on their
assertions there.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from saekit.cli import main
from saekit.config import DataConfig, SAEConfig, TrainConfig, from_dict
from saekit.errors import ConfigError
from saekit.evaluate.run import EvalConfig


# ---------------------------------------------------------------------- the probes
@pytest.mark.parametrize(
    ("cls", "field", "value", "words"),
    [
        (SAEConfig, "k", 0, "must be >= 1"),
        (SAEConfig, "expansion", 0, "must be >= 1"),
        (TrainConfig, "lr", -0.001, "must be >= 0"),
        (TrainConfig, "lr", math.nan, "must be a finite number"),
        (TrainConfig, "resume", "false", "write false without quotes"),
        (DataConfig, "sites", "layers.3.resid_post", 'write it as a list: ["layers.3.resid_post"]'),
        (SAEConfig, "k", "32", "write the number without quotes"),
        (TrainConfig, "autocast", "fp8", "is not one of ["),
        (TrainConfig, "beta2", 1.0, "must be < 1"),
        (TrainConfig, "device", "gpu0", "is not a torch device"),
        (SAEConfig, "init_b_dec", "geometric-median", "did you mean 'geometric_median'?"),
    ],
)
def test_bad_value_is_one_clear_config_error(cls, field, value, words) -> None:
    for build in (lambda: cls(**{field: value}), lambda: from_dict(cls, {field: value})):
        with pytest.raises(ConfigError) as e:
            build()
        msg = str(e.value)
        assert msg.startswith(f"{cls.__name__}.{field} = {value!r} ") and words in msg, msg
        assert "\n" not in msg


def test_assignment_is_validated_too() -> None:
    cfg = SAEConfig()
    with pytest.raises(ConfigError, match="SAEConfig.k = 0 must be >= 1"):
        cfg.k = 0
    assert cfg.k == 32
    with pytest.raises(ConfigError, match="EvalConfig.tokens = 0"):
        dataclasses.replace(EvalConfig(), tokens=0)


def test_lossless_json_numbers_are_accepted() -> None:
    t = from_dict(TrainConfig, {"total_tokens": 1e5, "lr": 1, "batch_size": 128})
    assert (t.total_tokens, type(t.total_tokens), t.lr, type(t.lr)) == (100000, int, 1.0, float)
    with pytest.raises(ConfigError, match="must be an integer, not float"):
        from_dict(TrainConfig, {"total_tokens": 1500.5})
    with pytest.raises(ConfigError, match="must be an integer, not a boolean"):
        SAEConfig(k=True)


def test_cross_field_rules() -> None:
    with pytest.raises(ConfigError, match="TrainConfig.batch_size = 64 exceeds total_tokens"):
        TrainConfig(batch_size=64, total_tokens=8)
    with pytest.raises(ConfigError, match="source=cache needs a cache directory"):
        DataConfig(source="cache")
    with pytest.raises(ConfigError, match="DataConfig.synthetic: SyntheticConfig.d = 0"):
        DataConfig(source="synthetic", synthetic={"d": 0})
    with pytest.raises(ConfigError, match="has a bad hook site 'layer.3.resid_post'"):
        DataConfig(sites=["layer.3.resid_post"])


def test_unknown_field_suggests_the_close_one() -> None:
    with pytest.raises(ConfigError, match=r"unknown TrainConfig field\(s\) 'totl_tokens' \(did"):
        from_dict(TrainConfig, {"totl_tokens": 10})


# ---------------------------------------------------------------------- the CLI and JSON
def _train(tmp_path: Path, *extra: str) -> list[str]:
    syn = {"n_features": 32, "d": 8, "n_roots": 0}
    return [
        "train",
        "--source",
        "synthetic",
        "--synthetic",
        json.dumps(syn),
        "--out-dir",
        str(tmp_path / "run"),
        "--total-tokens",
        "256",
        "--batch-size",
        "64",
        "--progress",
        "false",
        *extra,
    ]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--k", "0"], "SAEConfig.k = 0 must be >= 1"),
        (["--lr", "-0.001"], "TrainConfig.lr = -0.001 must be >= 0"),
        (["--lr", "nan"], "TrainConfig.lr = nan must be a finite number"),
        (["--expansion", "0"], "SAEConfig.expansion = 0 must be >= 1"),
    ],
)
def test_cli_refuses_bad_flags_before_training(tmp_path: Path, capsys, flags, words) -> None:
    assert main(_train(tmp_path, *flags)) == 1
    assert words in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_json_config_is_type_checked_and_names_the_file(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"train": {"resume": "false"}}))
    assert main(_train(tmp_path, "--config", str(cfg))) == 1
    err = capsys.readouterr().err
    assert f"{cfg}, section 'train': TrainConfig.resume = 'false' must be true or false" in err
    cfg.write_text(json.dumps({"data": {"sites": "layers.3.resid_post"}}))
    assert main(["train", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "DataConfig.sites = 'layers.3.resid_post' must be a list of strings" in err


def test_k_above_d_sae_is_refused_once_the_width_is_known(tmp_path: Path, capsys) -> None:
    with pytest.raises(ConfigError, match="SAEConfig.k = 100 exceeds d_sae = 64"):
        SAEConfig(k=100, d_sae=64)
    cfg = SAEConfig(k=100, expansion=2)  # d_sae comes from the data's width
    with pytest.raises(ConfigError, match="SAEConfig.k = 100 exceeds d_sae = 16"):
        cfg.resolved(8)
    assert SAEConfig(k=100, d_sae=64, rule="relu").resolved(8).k == 100  # relu ignores k
    assert main(_train(tmp_path, "--k", "100", "--d-sae", "64")) == 1
    assert "SAEConfig.k = 100 exceeds d_sae = 64" in capsys.readouterr().err


def test_rule_options_are_type_checked() -> None:
    from saekit import SAE

    with pytest.raises(ConfigError, match="TopAFAOptions.k_max = '8' must be an integer"):
        SAE(SAEConfig(d_in=8, d_sae=16, k=4, rule="topafa", rule_options={"k_max": "8"}))
    with pytest.raises(ConfigError, match="ReLUOptions.l1_coeff = 'big' must be a number"):
        SAE(SAEConfig(d_in=8, d_sae=16, rule="relu", rule_options={"l1_coeff": "big"}))
