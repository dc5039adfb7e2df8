"""Readable scatter labels and log-axis ticks for the L0-vs-metric plots.

:func:`label_points` writes one label per point without overlaps: points whose labels would
share horizontal space are grouped, each group's labels are stacked vertically at least one
line apart (a thin leader line joins a moved label to its point), a stack is shifted to stay
inside the axes, and a label that would leave the axes on the right is put to the left of
its point. :func:`log_ticks` puts 1-2-5 ticks, plainly formatted, on a log axis, so an L0
range within one decade still shows several ticks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

PAD = 4.0  # points between a point and its label


def log_ticks(axis: Any) -> None:
    """1-2-5 major ticks (``2``, ``5``, ``10``, ``20``, ...) with plain labels on a log axis."""
    import matplotlib.ticker as mt

    axis.set_major_locator(mt.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(mt.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(mt.NullFormatter())


def label_points(
    ax: Any, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str], fontsize: float = 7
) -> list[Any]:
    """Annotate point i with ``labels[i]``, no two labels overlapping (see the module doc).

    Call after the axes' limits and scales are final. Returns the annotation artists.
    """
    fig = ax.figure
    fig.canvas.draw()
    px = fig.dpi / 72.0
    pts = ax.transData.transform(np.column_stack([np.asarray(xs, float), np.asarray(ys, float)]))
    box = ax.get_window_extent()
    line = fontsize * 1.35 * px
    widths = np.array([(len(s) * 0.6 * fontsize + PAD) * px for s in labels])
    left = pts[:, 0] + widths + PAD * px > box.x1  # no room on the right: label on the left
    x0 = np.where(left, pts[:, 0] - widths - PAD * px, pts[:, 0] + PAD * px)
    groups = _overlapping(x0, widths)
    ty = pts[:, 1].copy()
    for g in groups:
        g = sorted(g, key=lambda i: pts[i, 1])
        for a, b in zip(g, g[1:]):  # stack upwards, one line apart
            ty[b] = max(ty[b], ty[a] + line)
        top = ty[g[-1]] + line / 2 - box.y1
        if top > 0:  # shift the stack down inside the axes (not below the bottom)
            shift = min(top, ty[g[0]] - line / 2 - box.y0)
            for i in g:
                ty[i] -= max(shift, 0.0)
    out = []
    for i, s in enumerate(labels):
        dx = -PAD if left[i] else PAD
        dy = (ty[i] - pts[i, 1]) / px
        moved = abs(dy) > fontsize * 0.5
        out.append(
            ax.annotate(
                s,
                (xs[i], ys[i]),
                xytext=(dx, dy),
                textcoords="offset points",
                fontsize=fontsize,
                ha="right" if left[i] else "left",
                va="center",
                arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.55"} if moved else None,
            )
        )
        out[-1].set_in_layout(False)  # placed for this layout: a later tight_layout keeps it
    return out


def _overlapping(x0: np.ndarray, widths: np.ndarray) -> list[list[int]]:
    """Groups of labels whose horizontal extents overlap (connected components)."""
    order = np.argsort(x0)
    groups: list[list[int]] = []
    right = -np.inf
    for i in order:
        if groups and x0[i] < right:
            groups[-1].append(int(i))
            right = max(right, x0[i] + widths[i])
        else:
            groups.append([int(i)])
            right = x0[i] + widths[i]
    return groups


__all__ = ["label_points", "log_ticks"]
