"""Dataset footprints (Qwen-Scope): the set of SAE features a dataset activates.

A sample *activates* feature i when ``|f_i| > threshold`` on at least one of its
(non-special) tokens; the footprint F(D) is the set of features activated by at least
``min_samples`` samples of D (the paper gives neither; defaults: threshold 0, one sample).
Redundancy of A with respect to B is ``|F(A) ∩ F(B)| / |F(A)|`` (1 when F(A) ⊆ F(B); NaN when
F(A) is empty). Coverage-preserving subsampling greedily picks the sample that adds the most
not-yet-covered footprint features (set cover) until the footprint is covered or ``size`` is
reached, then fills up to ``size`` with a seeded random choice of the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from saekit.apply.common import dense_codes, site_activations
from saekit.errors import ConfigError, DataError
from saekit.io.atomic import json_safe, save_figure, write_json
from saekit.options import Options, option
from saekit.sae import SAE


@dataclass
class FootprintConfig(Options):
    """When a feature is in a footprint, and the subsample (:func:`footprint_report`'s
    keyword options)."""

    threshold: float = option(0.0, "|activation| above which a sample activates a feature", ge=0)
    min_samples: int = option(1, "samples a feature needs to be in the footprint", ge=1)
    subsample: int = option(0, "coverage-preserving subsample size (0: none)", ge=0)
    seed: int = option(0, "seed of the subsample's random fill", ge=0)


@torch.no_grad()
def sample_features(
    sae: SAE,
    model: nn.Module,
    tok: Any,
    site: str,
    texts: list[str],
    threshold: float = 0.0,
    max_len: int = 128,
    batch_size: int = 8,
) -> np.ndarray:
    """``[n_samples, d_sae]`` bool: which features each sample activates."""
    if threshold < 0:
        raise ConfigError(f"threshold must be >= 0, got {threshold}")
    recs = site_activations(model, tok, site, texts, max_len=max_len, batch_size=batch_size)
    out = np.zeros((len(recs), sae.d_sae), dtype=bool)
    for i, r in enumerate(recs):
        acts = r.acts[r.keep] if bool(r.keep.any()) else r.acts
        out[i] = (dense_codes(sae, acts).abs() > threshold).any(0).numpy()
    return out


def footprint(active: np.ndarray, min_samples: int = 1) -> np.ndarray:
    """``[d_sae]`` bool: features activated by at least ``min_samples`` samples."""
    if min_samples < 1:
        raise ConfigError(f"min_samples must be >= 1, got {min_samples}")
    return active.sum(0) >= min_samples


def redundancy(a: np.ndarray, b: np.ndarray) -> float:
    """``|F(A) ∩ F(B)| / |F(A)|`` for footprint masks ``a``, ``b`` (NaN when F(A) is empty)."""
    na = int(a.sum())
    return float("nan") if na == 0 else float((a & b).sum()) / na


def redundancy_matrix(footprints: list[np.ndarray]) -> np.ndarray:
    """``R[a, b] = redundancy(F_a, F_b)``."""
    n = len(footprints)
    return np.array(
        [[redundancy(footprints[i], footprints[j]) for j in range(n)] for i in range(n)]
    )


def plot_redundancy(R: np.ndarray, names: list[str], path: str | Path) -> Path:
    """Heatmap PNG of the redundancy matrix (rows: A, columns: B)."""
    from saekit.extras import require

    matplotlib = require("matplotlib", "the footprint heatmap")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * n, 1.0 + 0.8 * n))
    im = ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("B")
    ax.set_ylabel("A")
    ax.set_title("|F(A) ∩ F(B)| / |F(A)|")
    for i in range(n):
        for j in range(n):
            v = R[i, j]
            ax.text(
                j,
                i,
                "nan" if np.isnan(v) else f"{v:.2f}",
                ha="center",
                va="center",
                color="white" if not np.isnan(v) and v < 0.6 else "black",
                fontsize=8,
            )
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    p = save_figure(fig, path, dpi=100)
    plt.close(fig)
    return p


def coverage_subsample(
    active: np.ndarray, size: int, seed: int = 0, min_samples: int = 1
) -> list[int]:
    """Indices of ``size`` samples that cover the footprint greedily, then random fill."""
    n = active.shape[0]
    if not 0 < size <= n:
        raise ConfigError(f"size must be in 1..{n}, got {size}")
    target = footprint(active, min_samples)
    uncovered = target.copy()
    chosen: list[int] = []
    free = np.ones(n, dtype=bool)
    while len(chosen) < size and uncovered.any():
        gain = (active & uncovered).sum(1)
        gain[~free] = -1
        best = int(gain.argmax())
        if gain[best] <= 0:
            break
        chosen.append(best)
        free[best] = False
        uncovered &= ~active[best]
    rest = np.flatnonzero(free)
    rng = np.random.default_rng(seed)
    fill = rng.choice(rest, size=size - len(chosen), replace=False) if size > len(chosen) else []
    return chosen + [int(i) for i in fill]


def footprint_report(
    sae: SAE,
    model: nn.Module,
    tok: Any,
    site: str,
    datasets: dict[str, list[str]],
    out_dir: str | Path | None = None,
    threshold: float = 0.0,
    min_samples: int = 1,
    subsample: int = 0,
    seed: int = 0,
    max_len: int = 128,
) -> dict[str, Any]:
    """Footprints, redundancy matrix (+ heatmap) and optional coverage subsamples.

    Writes ``footprint.json`` and ``redundancy.png`` to ``out_dir`` when given.
    ``subsample > 0`` picks that many samples of each dataset (fewer when it is smaller).
    """
    if not datasets:
        raise DataError("no datasets given")
    names = list(datasets)
    active = {
        n: sample_features(sae, model, tok, site, t, threshold, max_len)
        for n, t in datasets.items()
    }
    fps = [footprint(active[n], min_samples) for n in names]
    R = redundancy_matrix(fps)
    report: dict[str, Any] = {
        "site": site,
        "threshold": threshold,
        "min_samples": min_samples,
        "datasets": {
            n: {"samples": int(active[n].shape[0]), "footprint_size": int(fp.sum())}
            for n, fp in zip(names, fps)
        },
        "names": names,
        "redundancy": [[None if np.isnan(v) else float(v) for v in row] for row in R],
    }
    if subsample > 0:
        subs = {}
        for n, fp in zip(names, fps):
            size = min(subsample, active[n].shape[0])
            idx = coverage_subsample(active[n], size, seed, min_samples)
            kept = footprint(active[n][idx], 1) & fp
            subs[n] = {"indices": idx, "coverage": float(kept.sum()) / max(int(fp.sum()), 1)}
        report["subsample"] = subs
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report["heatmap"] = str(plot_redundancy(R, names, out / "redundancy.png"))
        write_json(out / "footprint.json", json_safe(report))
    return report
