#!/usr/bin/env python
"""Print the README's GPU table (markdown) from the newest CUDA results of ``bench_step.py``
and ``bench_e2e.py`` in ``benchmarks/results/``, one row group per ``d_sae``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
IMPLS = ("saekit", "sparsify", "saelens")


def newest(pattern: str, key) -> dict[int, tuple[Path, dict]]:  # noqa: ANN001
    """``d_sae -> (path, result)`` of the newest file per d_sae matching ``pattern``."""
    out: dict[int, tuple[Path, dict]] = {}
    for p in sorted(RESULTS.glob(pattern)):
        r = json.loads(p.read_text())
        out[key(r)] = (p, r)  # sorted by time stamp: later files win
    return out


def fmt(v: float | None, spec: str = ".0f") -> str:
    return "–" if v is None else format(v, spec)


def main() -> int:
    steps = newest("bench_step-cuda-*.json", lambda r: r["shape"]["d_sae"])
    e2e = newest("bench_e2e-cuda-*.json", lambda r: r["spec"]["d_sae"])
    if not steps and not e2e:
        print("no CUDA results in benchmarks/results/ (run `make bench-gpu` on a GPU machine)")
        return 1
    print("| d_sae | library | SAE step tokens/s | end-to-end tokens/s | peak memory (MiB) |"
          " held-out FVE |")  # fmt: skip
    print("|---:|---|---:|---:|---:|---:|")
    for F in sorted(set(steps) | set(e2e)):
        st = steps.get(F, (None, {}))[1]
        ee = e2e.get(F, (None, {}))[1]
        for impl in IMPLS:
            tps = st.get("tokens_per_s", {}).get(impl)
            m = ee.get("median", {}).get(impl, {})
            mem = m.get("peak_bytes")
            fve = ee.get("fve_heldout", {}).get(impl)
            print(
                f"| {F} | {impl} | {fmt(tps)} | {fmt(m.get('tokens_per_s'))} |"
                f" {fmt(None if mem is None else mem / 2**20)} | {fmt(fve, '.3f')} |"
            )
    for F in sorted(set(steps) | set(e2e)):
        for name, (p, _r) in (
            ("step", steps.get(F, (None, None))),
            ("e2e", e2e.get(F, (None, None))),
        ):
            if p is not None:
                print(f"\n{name} d_sae={F}: `{p.relative_to(RESULTS.parent.parent)}`", end="")
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
