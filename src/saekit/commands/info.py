"""``saekit rules``: list the registered selection rules, aux losses and named inputs."""

from __future__ import annotations

import argparse
import dataclasses
import re

_REST = re.compile(r":[a-z]+:`~?([^`]+)`|``([^`]+)``|`([^`]+)`")


def plain(text: str) -> str:
    """``text`` without reST markup: ``x`` and :func:`x` become x."""
    return _REST.sub(lambda m: next(g for g in m.groups() if g is not None), text)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rules",
        help="list selection rules, aux losses and their options",
        description="Rules and aux losses registered now, built-in and from plugins"
        " (saekit --plugin MODULE rules).",
    )
    p.set_defaults(func=run)


def _print_options(cls: type, prefix: str) -> None:
    from saekit.options import constraints, default_of

    for f in dataclasses.fields(cls):
        about = "; ".join(x for x in (f.metadata.get("help", ""), constraints(f)) if x)
        print(
            f"{'':14s}   {prefix}.{f.name} = {default_of(f)!r}" + (f"  ({about})" if about else "")
        )


def run(args: argparse.Namespace) -> int:
    from saekit.inputs import input_kind
    from saekit.losses import aux_names, get_aux_class
    from saekit.rules import get_rule_class, rule_names

    for name in rule_names():
        cls = get_rule_class(name)
        doc = plain((cls.__doc__ or "").strip().splitlines()[0])
        print(f"{name:14s} {doc}")
        where = "" if cls.__module__.startswith("saekit.") else f" (from {cls.__module__})"
        knob = cls.sparsity.option if cls.sparsity.kind == "option" else cls.sparsity.kind
        export = cls.saelens_architecture or "none"
        print(f"{'':14s}   sparsity: {knob}; SAELens export: {export}{where}")
        for n in cls.requires:
            print(f"{'':14s}   requires input {n!r}: {input_kind(n).help}")
        _print_options(cls.Options, "rule_options")
    print("\naux losses (--aux; options in --aux-options):")
    for name in aux_names():
        cls = get_aux_class(name)
        doc = plain((cls.__doc__ or "").strip().splitlines()[0])
        print(f"{name:14s} {doc}")
        _print_options(cls.Options, "aux_options")
    return 0
