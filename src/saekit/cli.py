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
    "saekit.commands.convert",  # saekit convert
    "saekit.commands.doctor",  # saekit doctor
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
    """One flag per field of the options dataclass ``cls``, derived from its declaration.

    Name: :func:`saekit.options.flag_name` (``--[prefix-]field-name`` or the field's
    ``flag``); type from the annotation; static ``choices``; help with the default (the
    ``cli_default`` where one is declared). Flags default to None (= not given), so that
    :func:`dataclass_from_args` can layer them over a JSON config. Fields with ``cli=False``
    or in ``skip`` get no flag.
    """
    from saekit import options

    title = (cls.__doc__ or "").strip().split("\n\n")[0].replace("``", "")
    group = parser.add_argument_group(cls.__name__, " ".join(title.split()))
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("cli", True):
            continue
        md = f.metadata
        default = options.default_of(f)
        shown = md.get("cli_default", default)
        help_ = md.get("help", "")
        if shown is not dataclasses.MISSING and shown is not None:  # None: said in the help
            help_ += f" (default: {json.dumps(shown)}"
            if "cli_default" in md:
                help_ += f"; library default {json.dumps(default)}"
            help_ += ")"
        kw: dict[str, Any] = {"help": help_.replace("%", "%%")}
        if md.get("metavar"):
            kw["metavar"] = md["metavar"]
        tp = options.field_type(cls, f)
        kw.update(_flag_type(tp, md))
        ch = md.get("choices")
        if ch is not None and not callable(ch):
            kw["choices"] = list(ch)
        if md.get("positional"):
            kw["metavar"] = kw.get("metavar") or f.name.upper()
            if default is not dataclasses.MISSING:
                kw.update(nargs="?", default=default)
            _declared(parser, group.add_argument(_dest(prefix, f), **kw), cls)
            continue
        kw.update(dest=_dest(prefix, f), default=None)
        if default is dataclasses.MISSING:
            kw["required"] = True
        _declared(parser, group.add_argument(options.flag_name(f, prefix), **kw), cls)


def _declared(parser: argparse.ArgumentParser, action: argparse.Action, cls: type) -> None:
    """Remember that ``action`` was derived from a field of ``cls`` (see ``declared_by``)."""
    parser.__dict__.setdefault("_saekit_declared", {})[action.dest] = cls


def declared_by(parser: argparse.ArgumentParser, action: argparse.Action) -> type | None:
    """The options class whose field ``action`` was derived from (None: written by hand)."""
    return parser.__dict__.get("_saekit_declared", {}).get(action.dest)


def _flag_type(tp: Any, md: Any) -> dict[str, Any]:
    """argparse keywords (type / nargs / action) for a field annotated ``tp``."""
    import types
    import typing

    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:  # X | None: a flag of type X
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _flag_type(args[0], md)
    if md.get("switch"):
        return {"action": "store_const", "const": True}
    if tp is list or origin is list:
        (elem,) = typing.get_args(tp) or (str,)
        kw: dict[str, Any] = {"type": _scalar(elem)}
        if md.get("repeat"):
            kw["action"] = "append"
        else:
            kw["nargs"] = md.get("nargs", "+")
        return kw
    if tp is dict or origin is dict:
        return {"type": _json_dict, "metavar": md.get("metavar", "JSON")}
    if tp is bool:
        return {"type": _bool, "metavar": md.get("metavar", "BOOL")}
    return {"type": _scalar(tp)}


def _scalar(tp: Any) -> Any:
    return {bool: _bool, int: int, float: float}.get(tp, str)


def _dest(prefix: str, f: dataclasses.Field) -> str:
    name = (f.metadata.get("flag") or f.name).replace("-", "_")
    return f"{prefix}__{name}" if prefix else name


def _json_dict(s: str) -> dict:
    try:
        v = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r}: {e}") from e
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r}")
    return v


def given_args(cls: type, args: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """The fields of ``cls`` given as flags (not None) in ``args``, by field name."""
    out = {}
    for f in dataclasses.fields(cls):
        v = getattr(args, _dest(prefix, f), None)
        if v is not None:
            out[f.name] = v
    return out


def dataclass_from_args(
    cls: type[C],
    args: argparse.Namespace,
    prefix: str = "",
    base: dict | None = None,
    where: str = "",
) -> C:
    """Build ``cls`` from ``base`` (e.g. a JSON config section) overridden by the flags given.

    Fields in neither take their ``cli_default`` when declared, else the library default.
    ``where`` (the JSON file and section) prefixes validation errors.
    """
    from saekit.options import check_fields, cli_defaults, from_dict

    data = cli_defaults(cls)
    data.update(check_fields(cls, base or {}, where=where))  # errors here name the file
    data.update(given_args(cls, args, prefix))
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


def _one_line(e: BaseException) -> str:
    """The message on one line (a wrapped library message may span several)."""
    return " ".join(str(e).split())


def main(argv: list[str] | None = None) -> int:
    """Run one command. User errors (:class:`~saekit.errors.SaekitError`, and OSErrors that
    mean a full disk, a read-only filesystem or a missing permission) print one line
    ``saekit CMD: error: ...`` and return 1; every other exception keeps its traceback.
    ``--plugin`` modules are imported before the parser is built."""
    from saekit.errors import SaekitError
    from saekit.io.paths import path_error
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
    except SaekitError as e:
        print(f"saekit {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except OSError as e:
        err = path_error(e, only_env=True)
        if err is None:
            raise
        print(f"saekit {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"saekit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
