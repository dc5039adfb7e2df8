"""Issue 13 item 7 / item 6 (config part): what each bad config value does, old code vs new.

Each probe runs in a fresh interpreter (``python -c``) on the code under ``--src`` (default:
this checkout's ``src``) and, with ``--old-src DIR`` (e.g. an export of main at 9e49562),
on that code too; it prints one table row per probe (what happened, in one line) and writes
``benchmarks/results/config_probes.json``.

    python benchmarks/config_probes.py --old-src /tmp/old9e/src
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYN = '{"n_features": 32, "d": 8, "n_roots": 0}'
TRAIN = (
    "--source synthetic --synthetic '{syn}' --total-tokens 256 --batch-size 64 --progress false"
    " --threads 1 --out-dir {out}"
)

#: (name, python code); the code prints what it got, or raises (the row shows the error)
PROBES: list[tuple[str, str]] = [
    ("--k 0", "cli('--k 0'); sae()"),
    ("--k 100 --d-sae 64", "cli('--k 100 --d-sae 64'); sae()"),
    ("--lr -0.001", "cli('--lr -0.001'); lr()"),
    ("--lr nan", "cli('--lr nan'); lr()"),
    ("--expansion 0", "cli('--expansion 0'); sae()"),
    ('{"train": {"resume": "false"}} on a run', "resume_probe()"),
    (
        '{"data": {"sites": "layers.3.resid_post"}}',
        "from_json('data', {'sites': 'layers.3.resid_post'})",
    ),
    ('{"sae": {"k": "32"}}', "from_json('sae', {'k': '32'})"),
    ('{"train": {"total_tokens": 1e5}}', "from_json('train', {'total_tokens': 1e5})"),
    ("SAEConfig(k=0) in Python", "from saekit.config import SAEConfig; print(SAEConfig(k=0))"),
    ("rule_options {'k_max': '8'}", "rule_opts()"),
]

PRELUDE = r"""
import json, sys, subprocess, os, pathlib
OUT = pathlib.Path(os.environ["PROBE_TMP"])
def cli(flags):
    from saekit.cli import main
    import shlex
    args = shlex.split("train " + os.environ["PROBE_TRAIN"] + " " + flags)
    rc = main(args)
    if rc:
        raise SystemExit(rc)
def sae():
    from saekit.io import load_sae
    s = load_sae(OUT / "run")
    l0 = float(s.encode(__import__("torch").randn(64, 8)).l0().float().mean())
    print(f"trained: k={s.cfg.k} d_sae={s.d_sae} L0={l0:.1f}")
def lr():
    m = [json.loads(l) for l in (OUT / "run" / "metrics.jsonl").read_text().splitlines()]
    print(f"trained with lr={m[-1]['lr']:.3g} (step {m[-1]['step']})")
def from_json(section, d):
    from saekit import config
    cls = {"sae": config.SAEConfig, "train": config.TrainConfig, "data": config.DataConfig}[section]
    obj = config.from_dict(cls, d)
    key = next(iter(d))
    print(f"accepted: {key}={getattr(obj, key)!r}")
def resume_probe():
    cli("")
    (OUT / "c.json").write_text(json.dumps({"train": {"resume": "false", "total_tokens": 512}}))
    cli("--config " + str(OUT / "c.json"))
    m = [json.loads(l) for l in (OUT / "run" / "metrics.jsonl").read_text().splitlines()]
    print(f"accepted; metrics steps {m[0]['step']}..{m[-1]['step']} (resumed: {m[0]['step'] > 1})")
def rule_opts():
    from saekit import SAE, SAEConfig
    s = SAE(SAEConfig(d_in=8, d_sae=16, k=4, rule="topafa", rule_options={"k_max": "8"}))
    print(f"accepted: k_max={s.rule.opts.k_max!r}")
"""


def run_probe(src: Path, code: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "PYTHONPATH": str(src),
            "PROBE_TMP": tmp,
            "PROBE_TRAIN": TRAIN.format(syn=SYN, out=Path(tmp) / "run"),
            "OMP_NUM_THREADS": "1",
        }
        r = subprocess.run(
            [sys.executable, "-c", PRELUDE + code], env=env, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "error" in ln.lower() or ln.startswith(("trained", "accepted"))]
    last = (useful or lines or ["(no output)"])[-1]
    return last[:200]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=str(ROOT / "src"))
    ap.add_argument("--old-src", default="")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "config_probes.json"))
    a = ap.parse_args(argv)
    rows = []
    for name, code in PROBES:
        row = {"probe": name, "new": run_probe(Path(a.src), code)}
        if a.old_src:
            row["old"] = run_probe(Path(a.old_src), code)
        rows.append(row)
        print(f"| {name} | {row.get('old', '')} | {row['new']} |", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
