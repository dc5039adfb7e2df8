"""The config convention (saekit.options): validation, flags, JSON and docs from one declaration.

The issue-13 probes (bad values accepted) are in test_config_validation.py.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from saekit.cli import add_dataclass_args, build_parser, dataclass_from_args
from saekit.config import DataConfig, SAEConfig, TrainConfig
from saekit.errors import ConfigError
from saekit.evaluate.run import EvalConfig
from saekit.options import (
    Options,
    check_value,
    default_of,
    describe,
    fields_where,
    from_dict,
    option,
    validate,
)

CONFIGS = (SAEConfig, TrainConfig, DataConfig, EvalConfig)


def _parser(*classes: type) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    for c in classes:
        add_dataclass_args(p, c)
    return p


def test_flags_types_choices_and_help_come_from_the_fields() -> None:
    p = _parser(SAEConfig, TrainConfig, DataConfig)
    by_flag = {s: a for a in p._actions for s in a.option_strings}
    for cls in (SAEConfig, TrainConfig, DataConfig):
        for f in dataclasses.fields(cls):
            a = by_flag[
                f.metadata.get("flag")
                and "--" + f.metadata["flag"]
                or "--" + f.name.replace("_", "-")
            ]
            assert a.help.startswith(f.metadata["help"].replace("%", "%%")), f.name
    from saekit.device import AUTOCAST_CHOICES

    assert by_flag["--autocast"].choices == list(AUTOCAST_CHOICES)
    assert by_flag["--model-device"].dest == "model_device"
    args = p.parse_args(["--sites", "layers.1.mlp_out", "layers.2.mlp_out", "--k", "4"])
    d = dataclass_from_args(DataConfig, args)
    assert d.sites == ["layers.1.mlp_out", "layers.2.mlp_out"]
    # cli_default: the command's default, shown in the help, used when neither flag nor JSON
    t = dataclass_from_args(TrainConfig, p.parse_args([]))
    assert (t.total_tokens, t.batch_size) == (300_000, 1024)
    t = dataclass_from_args(TrainConfig, p.parse_args([]), base={"total_tokens": 5000})
    assert t.total_tokens == 5000
    with pytest.raises(SystemExit):
        p.parse_args(["--autocast", "fp8"])


def test_resumable_fields_are_field_metadata() -> None:
    from saekit import train

    assert fields_where(TrainConfig, "resumable") == train.RESUMABLE_TRAIN_FIELDS
    assert set(train.RESUMABLE_TRAIN_FIELDS) == {
        "out_dir",
        "progress",
        "threads",
        "resume",
        "stop_after_steps",
        "checkpoint_every",
        "log_every",
        "device",
        "log",
        "log_project",
    }
    assert set(train.RESUMABLE_DATA_FIELDS) == {
        "device",
        "model_batch_size",
        "pack",
        "prefetch",
        "verify",
    }


# ---------------------------------------------------------------------- every options class
def _all_options_classes() -> list[type]:
    import saekit.cli

    parser = saekit.cli.build_parser()  # imports every command and so its options classes
    assert parser is not None
    out, todo = [], list(Options.__subclasses__())
    while todo:
        c = todo.pop()
        if c.__module__.startswith("saekit."):
            out.append(c)
        todo.extend(c.__subclasses__())
    return out


def test_every_options_class_follows_the_convention() -> None:
    classes = _all_options_classes()
    assert set(CONFIGS) <= set(classes)
    for cls in classes:
        required = [f for f in dataclasses.fields(cls) if default_of(f) is dataclasses.MISSING]
        if not required:
            obj = cls()  # the defaults are valid
            assert validate(obj) is obj
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
        assert describe(cls).count("\n") == len(dataclasses.fields(cls)) + 1


def test_option_refuses_unknown_metadata_and_plain_dataclasses_validate() -> None:
    with pytest.raises(TypeError, match="unknown metadata"):
        option(1, "x", minimum=0)

    @dataclasses.dataclass
    class Plain:
        n: int = 1
        names: list[str] = dataclasses.field(default_factory=list)

    assert from_dict(Plain, {"n": 2.0, "names": ("a",)}) == Plain(2, ["a"])
    with pytest.raises(ConfigError, match="Plain.names = 'a' must be a list of strings"):
        from_dict(Plain, {"names": "a"})
    f = dataclasses.fields(Plain)[0]
    assert check_value(Plain, f, 3) == 3


def test_train_help_lists_every_field(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--model-dtype {float32,float64,bfloat16,float16}" in out
    assert "(default: 300000; library default 2000000)" in out


def test_method_configs_are_the_keyword_options_of_their_functions() -> None:
    import inspect

    from saekit.apply.ablate import AblateConfig, ablation_effects
    from saekit.apply.classify import ClassifyConfig, classify_texts, fit_classifiers
    from saekit.apply.footprint import FootprintConfig, footprint_report

    params = {
        AblateConfig: set(inspect.signature(ablation_effects).parameters),
        ClassifyConfig: set(inspect.signature(classify_texts).parameters)
        | set(inspect.signature(fit_classifiers).parameters),
        FootprintConfig: set(inspect.signature(footprint_report).parameters),
    }
    for cls, names in params.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        assert fields <= names, (cls.__name__, fields - names)


#: flags written by hand on purpose: the JSON file a command reads first, and the global
#: plugin loader (parsed before any command's options exist)
NOT_FIELDS = {"help", "config", "plugin"}


def test_every_flag_of_every_command_is_a_declared_field() -> None:
    from saekit.cli import declared_by

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    by_hand = []
    for name, p in sub.choices.items():
        for a in p._actions:
            if a.dest not in NOT_FIELDS and declared_by(p, a) is None:
                by_hand.append(f"saekit {name} {'/'.join(a.option_strings) or a.dest}")
    assert by_hand == []


def test_rule_and_aux_options_follow_the_convention() -> None:
    """Every rule's and aux loss's options declare help and bounds; bad values are refused."""
    from saekit import SAE
    from saekit.losses.aux import aux_names, get_aux_class
    from saekit.rules.base import NoOptions, get_rule_class, rule_names

    classes = {get_rule_class(n).Options for n in rule_names()} - {NoOptions}
    classes |= {get_aux_class(n).Options for n in aux_names()}
    assert len(classes) >= 8
    for cls in classes:
        assert issubclass(cls, Options), f"{cls.__name__} is not an Options dataclass"
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
    bad = [
        ("batchtopk", {"threshold_decay": 1.5}, "threshold_decay = 1.5 must be < 1"),
        ("feature_choice", {"rank_by": "size"}, "rank_by = 'size' is not one of"),
        ("jumprelu", {"bandwidth": 0.0}, "bandwidth = 0.0 must be > 0"),
        ("topafa", {"normalize": "batch"}, "normalize = 'batch' is not one of"),
        ("relu", {"l1_coeff": -1.0}, "l1_coeff = -1.0 must be >= 0"),
    ]
    for rule, opts, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            SAE(SAEConfig(d_in=8, d_sae=32, k=4, rule=rule, rule_options=opts))
    with pytest.raises(ConfigError, match="tau = -1.0 must be >= 0"):
        SAE(SAEConfig(d_in=8, d_sae=32, k=4, aux="zipf", aux_options={"tau": -1.0}))


def _module_string_collections(tree):
    """(line, strings) of each module-level constant that is a literal tuple/list/set of
    strings or a dict with string keys."""
    import ast

    for stmt in tree.body:
        node = (
            getattr(stmt, "value", None) if isinstance(stmt, (ast.Assign, ast.AnnAssign)) else None
        )
        elts = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
        if not isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)) or not elts:
            continue
        if all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in elts):
            yield node.lineno, {e.value for e in elts}  # type: ignore[union-attr]


def test_no_flag_or_field_list_is_written_by_hand() -> None:
    """Issue 10 seam 4: on main at 9e49562 the commands added 88 flags by hand
    (``commands/bench.py``, ``apply.py``, ``train.py``, ``compress.py``) and ``train.py``
    listed fields by hand (``RESUMABLE_TRAIN_FIELDS``, ``CLI_TRAIN_DEFAULTS``). Flags come
    from the fields (``cli.add_dataclass_args``; only ``--config`` and ``--plugin`` are not
    fields) and facts about fields are their metadata."""
    import ast
    from pathlib import Path

    import saekit

    src = Path(saekit.__file__).parent
    names = [{f.name for f in dataclasses.fields(c)} for c in (SAEConfig, TrainConfig, DataConfig)]
    by_hand, lists = [], []
    for p in sorted(src.rglob("*.py")):
        rel = str(p.relative_to(src))
        tree = ast.parse(p.read_text())
        for line, strings in _module_string_collections(tree):
            if len(strings) >= 2 and any(strings <= n for n in names):
                lists.append(f"{rel}:{line} {sorted(strings)}")
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"
            ):
                continue
            flags = [a.value for a in node.args if isinstance(a, ast.Constant)]
            if rel == "cli.py" and not flags:
                continue  # add_dataclass_args: the flag name comes from the field
            if flags not in (["--config"], ["--plugin"]):
                by_hand.append(f"{rel}:{node.lineno} {flags}")
    assert (by_hand, lists) == ([], [])
