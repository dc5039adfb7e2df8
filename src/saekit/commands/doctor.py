"""``saekit doctor DIR``: check a run, cache or compressed model directory's integrity."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from saekit.cli import add_dataclass_args, dataclass_from_args
from saekit.options import Options, option


@dataclass
class DoctorOptions(Options):
    """Which directories ``saekit doctor`` checks, and how."""

    dirs: list[str] = option(
        help="run, cache or compressed model directories",
        positional=True,
        metavar="DIR",
        nonempty=True,
    )
    sizes_only: bool = option(False, "check file sizes, not SHA-256 (huge files)", switch=True)
    quiet: bool = option(False, "print only warnings and failures", switch=True)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor",
        help="check a run, cache or compressed model: digests, checkpoint, leftovers, lock",
        description="Check a run directory (cfg.json and its files, the checkpoint and what"
        " interrupted writes left, metrics.jsonl, the lock), an activation cache (manifest"
        " and every shard) or a compressed model (compression.json and every file it"
        " records). Prints one line per check; exits 1 when something is broken."
        " Changes nothing.",
    )
    add_dataclass_args(p, DoctorOptions)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saekit.io.doctor import diagnose

    o = dataclass_from_args(DoctorOptions, args)
    failed = 0
    for d in o.dirs:
        findings = diagnose(d, verify=not o.sizes_only)
        for f in findings:
            if not (o.quiet and f.level == "ok"):
                print(f)
        n_fail = sum(f.level == "fail" for f in findings)
        n_warn = sum(f.level == "warn" for f in findings)
        verdict = "healthy" if not n_fail else f"{n_fail} problem(s)"
        print(f"{d}: {verdict}" + (f", {n_warn} warning(s)" if n_warn else ""))
        failed += bool(n_fail)
    return 1 if failed else 0
