"""The variants a bench run trains, from each rule's declared sparsity knob, and the choice of
one matched-sparsity row per rule. No rule is named here: a rule's ``sparsity``
(:class:`~saekit.rules.base.SparsityKnob`) says whether ``k`` sets its L0 (TopK family,
batch rules), a penalty option does (trained over a grid, the variant closest to the target
L0 reported), or the rule picks its own L0 (reported as is)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from saekit.config import SAEConfig
from saekit.errors import ConfigError
from saekit.rules import get_rule_class


def variants(
    names: list[str],
    base: SAEConfig,
    aux_variants: list[str] | tuple[str, ...] = (),
    grids: dict[str, list[float]] | None = None,
    arch_variants: list[str] | tuple[str, ...] = (),
) -> dict[str, SAEConfig]:
    """``variant name -> SAEConfig``: one per rule (a grid for penalty rules, named
    ``rule[option=value]``), plus ``rule+aux_<aux>`` for each ``rule+aux`` and
    ``rule+arch_<part>`` for each ``rule+part`` (an architecture part of
    :mod:`saekit.arch` with its default options, e.g. Matryoshka) whose rule runs."""
    grids = grids or {}
    out: dict[str, SAEConfig] = {}
    for r in names:
        knob = get_rule_class(r).sparsity
        if knob.kind == "option":
            fixed = dict(knob.fixed)
            for v in grids.get(r, knob.grid):
                opts = {**fixed, knob.option: float(v)}
                out[f"{r}[{knob.option}={float(v):g}]"] = replace(base, rule=r, rule_options=opts)
        else:
            out[r] = replace(base, rule=r, rule_options={})
    for spec in aux_variants:
        rule, _, aux = spec.partition("+")
        if not aux:
            raise ConfigError(f"BenchConfig.aux_variants {spec!r}: write RULE+AUX, e.g. topk+zipf")
        if rule in names:
            out[f"{rule}+aux_{aux}"] = replace(base, rule=rule, aux=aux, rule_options={})
    for spec in arch_variants:
        rule, _, part = spec.partition("+")
        if not part:
            raise ConfigError(
                f"BenchConfig.arch_variants {spec!r}: write RULE+PART, e.g. batchtopk+matryoshka"
            )
        if rule in names:
            out[f"{rule}+arch_{part}"] = replace(base, rule=rule, arch=[part], rule_options={})
    return out


def rule_of(variant: str) -> str:
    """The rule a variant name belongs to."""
    return variant.split("[")[0].split("+")[0]


def pick_matched(
    results: dict[str, dict[str, Any]], target_l0: float
) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    """One row per variant, except for grid rules: the variant with eval L0 closest to
    ``target_l0`` (in log ratio). Returns ``(table, sweeps)``, sweeps: rule -> variants."""
    sweeps: dict[str, list[str]] = {}
    for name, r in results.items():
        if "[" in name:
            sweeps.setdefault(r["rule"], []).append(name)

    def dist(n: str) -> float:
        return abs(math.log(max(results[n]["l0"], 1e-3) / target_l0))

    best = {rule: min(ns, key=dist) for rule, ns in sweeps.items()}
    table = {n: r for n, r in results.items() if "[" not in n or best[r["rule"]] == n}
    return table, sweeps
