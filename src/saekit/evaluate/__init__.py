"""Evaluation suite: core, spliced, ground-truth, AFA, independence and probing metrics.

Metric functions are pure (tensors in, numbers out) with streaming accumulators;
:func:`saekit.evaluate.run.evaluate_run` orchestrates them on a run directory.
"""

from saekit.evaluate.core import CoreAccumulator, core_metrics

__all__ = ["CoreAccumulator", "EvalConfig", "compare_runs", "core_metrics", "evaluate_run"]


def __getattr__(name: str):  # lazy: run.py imports io / sources
    if name in ("EvalConfig", "evaluate_run", "compare_runs"):
        from saekit.evaluate import run

        return getattr(run, name)
    raise AttributeError(name)
