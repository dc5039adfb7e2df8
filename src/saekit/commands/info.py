"""``saekit rules``: list the registered selection rules and their options."""

from __future__ import annotations

import argparse
import dataclasses


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rules", help="list selection rules and their options")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saekit.rules import get_rule_class, rule_names

    for name in rule_names():
        cls = get_rule_class(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:14s} {doc}")
        for f in dataclasses.fields(cls.Options):
            print(f"{'':14s}   rule_options.{f.name} = {f.default!r}")
    return 0
