"""``saekit eval`` (evaluate one run) and ``saekit compare`` (table + frontier of runs)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from saekit.cli import add_dataclass_args
    from saekit.evaluate.run import EvalConfig

    p = sub.add_parser(
        "eval",
        help="evaluate a run: core, spliced CE/KL, ground truth, AFA, baselines, report",
        description="Evaluate the SAE of RUN_DIR on fresh data; writes eval.json, report.md"
        " and PNG plots into RUN_DIR (or --out).",
    )
    p.add_argument("run_dir", help="run directory (cfg.json + sae_weights.safetensors)")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR)")
    add_dataclass_args(p, EvalConfig)
    p.set_defaults(func=run_eval)

    c = sub.add_parser(
        "compare",
        help="compare evaluated runs: markdown table and L0-vs-FVE / CE-recovered frontiers",
        description="Table of several runs (each evaluated first if it has no eval.json)"
        " plus frontier PNGs.",
    )
    c.add_argument("run_dirs", nargs="+", help="run directories")
    c.add_argument("--out", default="compare", help="output directory (default: ./compare)")
    c.add_argument(
        "--no-eval", action="store_true", help="fail instead of evaluating runs without eval.json"
    )
    add_dataclass_args(c, EvalConfig)
    c.set_defaults(func=run_compare)


def _cfg(args: argparse.Namespace):
    from saekit.cli import dataclass_from_args
    from saekit.evaluate.run import EvalConfig

    return dataclass_from_args(EvalConfig, args)


def _headline(res: dict) -> str:
    from saekit.evaluate.report import headline_table

    return headline_table(res)


def run_eval(args: argparse.Namespace) -> int:
    from saekit.evaluate.run import evaluate_run

    res = evaluate_run(args.run_dir, out_dir=args.out, cfg=_cfg(args))
    print(_headline(res))
    for n in res.get("notes", []):
        print(f"note: {n}")
    out = args.out or args.run_dir
    print(f"wrote {', '.join(res['files'])} to {out}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from saekit.evaluate.run import compare_runs

    summary = compare_runs(
        args.run_dirs, args.out, evaluate_missing=not args.no_eval, cfg=_cfg(args)
    )
    print(summary["table"])
    print(f"wrote {', '.join(summary['files'])} to {args.out}")
    return 0
