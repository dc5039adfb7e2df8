"""The ``saekit`` command line.

Each command lives in the module that implements it, as ``add_parser(subparsers)`` which
registers its arguments and sets ``func`` (taking the parsed args, returning an exit code).
Config dataclasses become flags through :func:`add_dataclass_args`, so every config field
is a flag with its help text and no field is copied by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from typing import Any, TypeVar

C = TypeVar("C")

#: modules providing ``add_parser(subparsers)``, in the order shown by ``saekit --help``
COMMAND_MODULES = [
    "saekit.commands.train",  # saekit train, saekit cache
    "saekit.commands.evaluate",  # saekit eval, saekit compare
    "saekit.commands.bench",  # saekit bench
    "saekit.commands.apply",  # saekit steer, ablate, classify, footprint, dashboard
    "saekit.commands.compress",  # saekit compress
    "saekit.commands.info",  # saekit rules
]


def _bool(s: str) -> bool:
    v = s.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_dataclass_args(
    parser: argparse.ArgumentParser, cls: type, prefix: str = "", skip: tuple[str, ...] = ()
) -> None:
    """One ``--prefix-field`` flag per dataclass field; defaults are None (= not given)."""
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + (prefix + "-" if prefix else "") + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_ = f"{help_} (default: {json.dumps(default)})"
        kw: dict[str, Any] = {"default": None, "help": help_, "dest": _dest(prefix, f.name)}
        if isinstance(default, bool):
            kw.update(type=_bool, metavar="BOOL")
        elif isinstance(default, int):
            kw["type"] = int
        elif isinstance(default, float):
            kw["type"] = float
        elif isinstance(default, list):
            kw.update(nargs="+")
        elif isinstance(default, dict):
            kw.update(type=_json_dict, metavar="JSON")
        else:
            kw["type"] = str
        group.add_argument(flag, **kw)


def _dest(prefix: str, name: str) -> str:
    return f"{prefix}__{name}" if prefix else name


def _json_dict(s: str) -> dict:
    try:
        v = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r}: {e}") from e
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r}")
    return v


def dataclass_from_args(
    cls: type[C], args: argparse.Namespace, prefix: str = "", base: dict | None = None
) -> C:
    """Build ``cls`` from ``base`` (e.g. a JSON config) overridden by the flags given."""
    from saekit.config import from_dict

    data = dict(base or {})
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        v = getattr(args, _dest(prefix, f.name), None)
        if v is not None:
            data[f.name] = v
    return from_dict(cls, data)


def _plugin_parser(add_help: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="saekit",
        description="Train, evaluate and apply sparse autoencoders.",
        add_help=add_help,
        allow_abbrev=False,
    )
    p.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE (dotted name or .py path) first, e.g. for a rule of your own;"
        " repeatable; also SAEKIT_PLUGINS=MOD1,MOD2 (see saekit.plugins)",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _plugin_parser(add_help=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMAND_MODULES:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a command still being written
            if e.name == mod:
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from saekit.errors import SaekitError
    from saekit.plugins import load_plugins

    argv = sys.argv[1:] if argv is None else list(argv)
    pre, _ = _plugin_parser(add_help=False).parse_known_args(argv)
    try:
        load_plugins(pre.plugin)  # before the parser: plugins may add rules and commands' choices
    except SaekitError as e:
        print(f"saekit: error: {e}", file=sys.stderr)
        return 1
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as e:
        print(f"saekit {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
