"""``saekit bench``: every registered rule on the same synthetic ground-truth data, over
several seeds (mean ± sd).

Matched sparsity comes from each rule's declared knob (``Rule.sparsity``): ``k`` rules use
``k = round(expected true L0)`` (per token, or ``k*B`` per batch for batch rules); penalty
rules are trained over their grid in the same run and the variant whose eval L0 is closest
to ``k`` (log ratio) is reported (all variants are in the JSON); rules with a free L0
(top-AFA) are reported as they are. Metrics come from :func:`saekit.evaluate.evaluate_run`
on each saved run directory (L0, pooled FVE, dead fractions, MCC, MMCS, recovery, per-latent
F1, absorption, FVU under the synthetic downstream loss), plus the training step time. A
second dataset with bidirectional features compares ``signed_rules`` (TopK vs AbsTopK).

Modules: :mod:`.config` (``BenchConfig``, sizes), :mod:`.variants` (variants from the
rules' knobs, matched rows), :mod:`.run` (training and evaluation per seed), :mod:`.report`
(aggregate, table, figure).
"""

from saekit.bench.config import SIZES, BenchConfig, BenchSize
from saekit.bench.report import aggregate, format_table, report_text
from saekit.bench.run import (
    DATA_SEED_OFFSET,
    base_sae_config,
    eval_row,
    run_bench,
    step_ms,
    synthetic_config,
)
from saekit.bench.variants import pick_matched, rule_of, variants

__all__ = [
    "DATA_SEED_OFFSET",
    "SIZES",
    "BenchConfig",
    "BenchSize",
    "aggregate",
    "base_sae_config",
    "eval_row",
    "format_table",
    "pick_matched",
    "report_text",
    "rule_of",
    "run_bench",
    "step_ms",
    "synthetic_config",
    "variants",
]
