"""Selection rules, registered by name. Importing this package imports (and so registers)
every module in it: a new rule is one file here, or one module of your own imported first
(see :mod:`saekit.plugins`)."""

import importlib
import pkgutil

from saekit.rules.base import (
    Context,
    Rule,
    SAELensExport,
    Selection,
    SparsityKnob,
    build_rule,
    get_rule_class,
    register,
    rule_names,
)


def _import_rule_modules() -> list[str]:
    """Import every non-private module of this package; their names."""
    names = []
    for m in pkgutil.iter_modules(__path__):
        if m.name != "base" and not m.name.startswith("_"):
            importlib.import_module(f"{__name__}.{m.name}")
            names.append(m.name)
    return names


RULE_MODULES = _import_rule_modules()

__all__ = [
    "RULE_MODULES",
    "Context",
    "Rule",
    "SAELensExport",
    "Selection",
    "SparsityKnob",
    "build_rule",
    "get_rule_class",
    "register",
    "rule_names",
]
