"""``saekit eval`` (evaluate one run) and ``saekit compare`` (table + frontier of runs).

Flags: :class:`~saekit.evaluate.options.EvalTarget` / ``CompareOptions`` (what, where) and
:class:`~saekit.evaluate.run.EvalConfig` (what is measured), each field a flag.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from saekit.cli import add_dataclass_args, dataclass_from_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    from saekit.evaluate.options import CompareOptions, EvalTarget
    from saekit.evaluate.run import EvalConfig

    p = sub.add_parser(
        "eval",
        help="evaluate a run: core, spliced CE/KL, ground truth, AFA, baselines, report",
        description="Evaluate the SAE of RUN_DIR on fresh data; writes eval.json, report.md"
        " and PNG plots into RUN_DIR (or --out).",
    )
    add_dataclass_args(p, EvalTarget)
    add_dataclass_args(p, EvalConfig)
    p.set_defaults(func=run_eval)

    c = sub.add_parser(
        "compare",
        help="compare evaluated runs: markdown table and L0-vs-FVE / CE-recovered frontiers",
        description="Table of several runs (each evaluated first if it has no eval.json)"
        " plus frontier PNGs.",
    )
    add_dataclass_args(c, CompareOptions)
    add_dataclass_args(c, EvalConfig)
    c.set_defaults(func=run_compare)


def run_eval(args: argparse.Namespace) -> int:
    from saekit.evaluate.options import EvalTarget
    from saekit.evaluate.report import headline_table
    from saekit.evaluate.run import EvalConfig, evaluate_run

    t = dataclass_from_args(EvalTarget, args)
    cfg = dataclass_from_args(EvalConfig, args)
    res = evaluate_run(t.run_dir, out_dir=t.out, cfg=cfg, data_cfg=t.data_config(), k=t.k)
    print(headline_table(res))
    for n in res.get("notes", []):
        print(f"note: {n}")
    out = t.out or (t.run_dir + ".eval" if Path(t.run_dir).is_file() else t.run_dir)
    print(f"wrote {', '.join(res['files'])} to {out}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from saekit.evaluate.options import CompareOptions
    from saekit.evaluate.run import EvalConfig, compare_runs

    o = dataclass_from_args(CompareOptions, args)
    cfg = dataclass_from_args(EvalConfig, args)
    summary = compare_runs(o.run_dirs, o.out, evaluate_missing=not o.no_eval, cfg=cfg)
    print(summary["table"])
    print(f"wrote {', '.join(summary['files'])} to {o.out}")
    return 0
