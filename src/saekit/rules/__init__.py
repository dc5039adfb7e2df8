"""Selection rules, registered by name. Importing this package registers every rule."""

from saekit.rules import batchtopk, jumprelu, relu, topk  # noqa: F401  (registration)
from saekit.rules.base import (
    Context,
    Rule,
    Selection,
    build_rule,
    get_rule_class,
    register,
    rule_names,
)

__all__ = [
    "Context",
    "Rule",
    "Selection",
    "build_rule",
    "get_rule_class",
    "register",
    "rule_names",
]
