"""``saekit doctor DIR``: check a run or activation cache directory's integrity."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor",
        help="check a run or cache directory: digests, checkpoint, interrupted writes, lock",
        description="Check a run directory (cfg.json and its files, the checkpoint and what"
        " interrupted writes left, metrics.jsonl, the lock) or an activation cache (manifest"
        " and every shard). Prints one line per check; exits 1 when something is broken."
        " Changes nothing.",
    )
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run or cache directories")
    p.add_argument(
        "--sizes-only", action="store_true", help="check file sizes, not SHA-256 (huge files)"
    )
    p.add_argument("--quiet", action="store_true", help="print only warnings and failures")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saekit.io.doctor import diagnose

    failed = 0
    for d in args.dirs:
        findings = diagnose(d, verify=not args.sizes_only)
        for f in findings:
            if not (args.quiet and f.level == "ok"):
                print(f)
        n_fail = sum(f.level == "fail" for f in findings)
        n_warn = sum(f.level == "warn" for f in findings)
        verdict = "healthy" if not n_fail else f"{n_fail} problem(s)"
        print(f"{d}: {verdict}" + (f", {n_warn} warning(s)" if n_warn else ""))
        failed += bool(n_fail)
    return 1 if failed else 0
