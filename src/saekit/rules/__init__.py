"""Selection rules, registered by name. Importing this package registers every rule."""

# importing a rule module registers it; aux_zipf fills losses.aux_registry["zipf"]
from saekit.rules import (  # noqa: F401
    abstopk,
    aux_zipf,
    batchtopk,
    feature_choice,
    gtopk,
    jumprelu,
    mutual_choice,
    relu,
    topafa,
    topk,
    vtopk,
)
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
