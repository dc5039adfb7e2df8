"""``saekit eval`` (evaluate one run) and ``saekit compare`` (table + frontier of runs)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from saekit.cli import add_dataclass_args
    from saekit.evaluate.run import EvalConfig

    p = sub.add_parser(
        "eval",
        help="evaluate a run: core, spliced CE/KL, ground truth, AFA, baselines, report",
        description="Evaluate the SAE of RUN_DIR on fresh data; writes eval.json, report.md"
        " and PNG plots into RUN_DIR (or --out).",
    )
    p.add_argument(
        "run_dir", help="run directory (cfg.json + sae_weights.safetensors) or a Qwen-Scope .pt"
    )
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR, or FILE.eval/)")
    p.add_argument(
        "--model",
        default=None,
        help="for SAEs without a saekit data config (Qwen-Scope .pt,"
        " SAELens dirs): the HF model ('' : the built-in MiniLM)",
    )
    p.add_argument("--site", default=None, help="with --model: the hook site of the SAE")
    p.add_argument("--dataset", default="", help="with --model: eval text (default: built-in)")
    p.add_argument("--k", type=int, default=None, help="k of a Qwen-Scope file (else L0_<k>)")
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

    data_cfg = None
    if args.model is not None or args.site is not None:
        from saekit.config import DataConfig

        if args.model is None or args.site is None:
            from saekit.errors import ConfigError

            raise ConfigError("--model and --site go together (the SAE's model and hook site)")
        data_cfg = DataConfig(model=args.model, sites=[args.site], dataset=args.dataset)
    res = evaluate_run(args.run_dir, out_dir=args.out, cfg=_cfg(args), data_cfg=data_cfg, k=args.k)
    print(_headline(res))
    for n in res.get("notes", []):
        print(f"note: {n}")
    out = args.out or (args.run_dir + ".eval" if Path(args.run_dir).is_file() else args.run_dir)
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
