"""``saekit bench``: train and compare every selection rule on synthetic ground truth."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from saekit.cli import _bool, _json_dict

    p = sub.add_parser(
        "bench",
        help="compare every rule on synthetic data with known features (table, JSON, PNG)",
        description="Train every registered rule (same data, width and optimiser; matched L0"
        " where the rule allows) on a synthetic ground-truth stream, save, reload and"
        " evaluate each: L0, FVE, dead fraction, MCC, MMCS, recovery, per-latent F1. Also"
        " compares AbsTopK with TopK on bidirectional features. Writes OUT/bench.json,"
        " OUT/bench.png and the run directories under OUT/runs.",
    )
    p.add_argument(
        "--size",
        default="small",
        choices=["tiny", "small", "large"],
        help="small (default, a few minutes on 2 cores), large, or tiny (smoke test only)",
    )
    p.add_argument("--out", default="runs/bench", help="output directory (default runs/bench)")
    p.add_argument("--seed", type=int, default=0, help="training seed (data seed = seed + 1000)")
    p.add_argument("--rules", nargs="+", default=[], help="rules to run (default: all)")
    p.add_argument(
        "--signed", type=_bool, default=True, metavar="BOOL", help="also run the signed test"
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1; 0: torch's default)"
    )
    p.add_argument("--progress", action="store_true", help="show training progress bars")
    p.add_argument(
        "--keep-runs", type=_bool, default=True, metavar="BOOL", help="keep OUT/runs (default on)"
    )
    p.add_argument(
        "--saelens-synthetic",
        type=_json_dict,
        default=None,
        metavar="JSON",
        help="train on a SAELens synthetic model instead (needs sae-lens), e.g."
        ' \'{"model": "synthsaebench-16k", "overrides": {"num_features": 1024, "hidden_dim":'
        " 128}}'; see saekit.sources.saelens_synthetic",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saekit.bench import BenchConfig, report_text, run_bench

    cfg = BenchConfig(
        size=args.size,
        out=args.out,
        seed=args.seed,
        rules=list(args.rules),
        signed=args.signed,
        threads=args.threads,
        progress=args.progress,
        keep_runs=args.keep_runs,
        saelens=dict(args.saelens_synthetic or {}),
    )
    report = run_bench(cfg)
    print(report_text(report))
    out = Path(cfg.out)
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return 0
