"""Running code in the peers venv (benchmarks/.peers: sae-lens, sparsify, dictionary_learning).

Tests that need a peer package run it there in a subprocess and exchange safetensors files;
they are skipped, with the reason, when the venv is absent. ``PYTHONPATH=src`` lets a peer
script import saekit too (for in-process checks with TransformerLens / nnsight models).
"""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "benchmarks" / ".peers" / "bin" / "python"
needs_peers = pytest.mark.skipif(
    not PEERS.exists(), reason="benchmarks/.peers venv not set up (benchmarks/setup_peers.sh)"
)


def run_peers(code: str, *args: str, env: dict[str, str] | None = None, timeout: int = 600) -> str:
    """Run ``code`` with the peers' python; its stdout (the test fails on a non-zero exit)."""
    full_env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    r = subprocess.run(
        [str(PEERS), "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout
