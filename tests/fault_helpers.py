"""Shared helpers of the fault tests: a tiny synthetic CLI config and a tiny tmpfs mount."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

SYN = {"n_features": 48, "d": 12, "n_roots": 2, "depth": 2, "branching": 2, "block_size": 256}


def syn_flags(out: Path | str, tokens: int = 1024, **extra: object) -> list[str]:
    """``saekit train`` flags of a tiny synthetic run into ``out``."""
    flags = {
        "source": "synthetic",
        "synthetic": json.dumps(SYN),
        "d-sae": 48,
        "k": 4,
        "total-tokens": tokens,
        "batch-size": 128,
        "progress": "false",
        "threads": 1,
        "out-dir": out,
        **extra,
    }
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]


@contextlib.contextmanager
def tiny_tmpfs(where: Path, size: str = "256k", readonly: bool = False) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` at ``where`` (skip the test where mounting is not allowed)."""
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def tiny_train(out: Path, steps: int = 8, source=None, **train_kw):
    """Train a 32-latent TopK SAE on a tiny synthetic source into ``out``; the TrainResult."""
    from saekit import SAEConfig, TrainConfig
    from saekit.sources.synthetic import SyntheticConfig, SyntheticSource
    from saekit.train import train

    kw = {"checkpoint_every": 2, "log_every": 1, "progress": False, "threads": 1, **train_kw}
    cfg = TrainConfig(out_dir=str(out), total_tokens=64 * steps, batch_size=64, **kw)
    src = source if source is not None else SyntheticSource(SyntheticConfig(**SYN))
    return train(SAEConfig(d_sae=32, k=4), cfg, src)


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    """Flip one bit of ``path`` at byte ``offset`` (negative: from the end)."""
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1 << bit
    path.write_bytes(bytes(raw))


def tiny_cache(out: Path, n: int = 512, shard: int = 256) -> Path:
    from saekit.sources.cache import write_cache
    from saekit.sources.synthetic import SyntheticConfig, SyntheticSource

    return write_cache(SyntheticSource(SyntheticConfig(**SYN)), out, n, shard_tokens=shard)
