"""PNG plots of an evaluation (matplotlib, Agg backend; no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from saekit.evaluate.afa import ZF_BOUNDS
from saekit.io.atomic import save_figure


def _plt():
    from saekit.extras import require

    matplotlib = require("matplotlib", "plots (turn them off with --plots false)")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: str | Path) -> Path:
    """Lay out, save atomically and close ``fig``."""
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return Path(path)


def density_histogram(hist: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Bar plot of the log10 feature-density histogram (dead latents in the title)."""
    plt = _plt()
    edges, counts = hist["log10_edges"], hist["counts"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    ax.bar(edges[:-1], counts, width=widths, align="edge", edgecolor="black", linewidth=0.3)
    ax.set_xlabel("log10 feature density (fraction of tokens with a_f != 0)")
    ax.set_ylabel("latents")
    ax.set_title(f"{title} feature density ({hist['dead']} dead latents)".strip())
    return _save(plt, fig, path)


def l0_histogram(l0_hist: dict[str, list[int]], path: str | Path, title: str = "") -> Path:
    """Tokens per L0 value."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(l0_hist["l0"], l0_hist["count"], width=1.0, edgecolor="black", linewidth=0.3)
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("tokens")
    ax.set_title(f"{title} L0 distribution".strip())
    return _save(plt, fig, path)


def zf_plot(
    norm_z: Sequence[float], norm_f: Sequence[float], path: str | Path, title: str = ""
) -> Path:
    """Scatter of ‖z‖ vs ‖f̃‖ with the AFA bound lines for ε(h−1) in ``ZF_BOUNDS``.

    ‖f̃‖ = ‖z‖/sqrt(1 ± ε(h−1)): upper lines use 1 − ε(h−1) (skipped when it is ≤ 0).
    """
    plt = _plt()
    z = [float(v) for v in norm_z]
    f = [float(v) for v in norm_f]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(z, f, s=3, alpha=0.4, label="tokens")
    top = max(z + f + [1e-6]) * 1.05
    xs = [0.0, top]
    ax.plot(xs, xs, color="black", linewidth=1, label="‖f̃‖ = ‖z‖")
    styles = ["--", "-.", ":"]
    for b, ls in zip(ZF_BOUNDS, styles):
        lo = [x / (1 + b) ** 0.5 for x in xs]
        ax.plot(xs, lo, color="tab:red", linestyle=ls, linewidth=1, label=f"ε(h−1)={b}")
        if b < 1:
            hi = [x / (1 - b) ** 0.5 for x in xs]
            ax.plot(xs, hi, color="tab:red", linestyle=ls, linewidth=1)
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("‖z‖ (dense input)")
    ax.set_ylabel("‖f̃‖ (decoder-norm-scaled code + ‖b_dec‖)")
    ax.set_title(f"{title} ZF plot".strip())
    ax.legend(fontsize=7, loc="upper left")
    return _save(plt, fig, path)


def frontier(
    points: Sequence[dict[str, Any]], x: str, y: str, path: str | Path, title: str = ""
) -> Path:
    """Scatter of ``y`` vs ``x`` over runs, each point labelled with its ``name`` (labels kept
    apart, :func:`saekit.evaluate.labels.label_points`); a log x axis when ``x`` spans more
    than a factor 10."""
    from saekit.evaluate.labels import label_points, log_ticks

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs, ys, names = [], [], []
    for p in points:
        xv, yv = p.get(x), p.get(y)
        if xv is None or yv is None or xv != xv or yv != yv:  # missing or NaN
            continue
        marker = {"sae": "o", "random": "x", "pca": "s"}.get(p.get("kind", "sae"), "o")
        ax.scatter([xv], [yv], marker=marker)
        xs.append(float(xv))
        ys.append(float(yv))
        names.append(str(p.get("name", "")))
    if xs and min(xs) > 0 and max(xs) / min(xs) > 10:
        ax.set_xscale("log")
        log_ticks(ax.xaxis)
    ax.margins(x=0.2, y=0.12)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title or f"{y} vs {x}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    label_points(ax, xs, ys, names)
    return _save(plt, fig, path)
