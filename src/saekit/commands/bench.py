"""``saekit bench``: train and compare every selection rule on synthetic ground truth.

Every :class:`~saekit.bench.BenchConfig` field is a flag (``--seeds 0 1 2``, ``--size``,
``--tokens``, ``--rules``, ...).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from saekit.bench.config import BenchConfig
    from saekit.cli import add_dataclass_args

    p = sub.add_parser(
        "bench",
        help="compare every rule on synthetic data with known features (table, JSON, PNG)",
        description="Train every registered rule (same data, width and optimiser; matched L0"
        " from each rule's sparsity knob) on a synthetic ground-truth stream, save, and"
        " evaluate each run directory as `saekit eval` does: L0, FVE, dead fraction, MCC,"
        " MMCS, recovery, per-latent F1; over several seeds (mean ± sd). Also compares"
        " signed rules on bidirectional features. Writes OUT/bench.json, OUT/bench.png and"
        " the run directories under OUT/runs.",
    )
    add_dataclass_args(p, BenchConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saekit.bench import BenchConfig, report_text, run_bench
    from saekit.cli import dataclass_from_args

    cfg = dataclass_from_args(BenchConfig, args)
    report = run_bench(cfg)
    print(report_text(report))
    out = Path(cfg.out)
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return 0
