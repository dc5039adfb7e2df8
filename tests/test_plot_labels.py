"""Scatter labels of the bench and frontier plots do not overlap and stay in the figure;
an L0 axis within one decade still has several ticks (the plots the README shows had
piled-up labels, one x tick and a label cut at the edge)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="plots are the [plots] extra")

#: the README's bench table (L0, FVE), clustered at L0 ~ 6 with one outlier at 67
README_ROWS = {
    "batchtopk": (6.06, 0.929), "mutual_choice": (6.06, 0.929), "topk+aux_zipf": (5.98, 0.888),
    "gtopk": (5.98, 0.882), "topk": (5.97, 0.881), "feature_choice": (5.95, 0.839),
    "jumprelu[l0_coeff=0.3]": (5.79, 0.919), "abstopk": (6.0, 0.842), "vtopk": (5.93, 0.714),
    "relu[l1_coeff=4]": (4.82, 0.539), "topafa": (67.2, 0.998),
}  # fmt: skip


def _boxes(fig, ax):
    """The label texts' boxes (without their leader lines)."""
    from matplotlib.text import Text

    fig.canvas.draw()
    texts = [c for c in ax.get_children() if type(c).__name__ == "Annotation"]
    return [Text.get_window_extent(t) for t in texts], ax


def _assert_readable(fig, ax, n: int) -> None:
    boxes, _ = _boxes(fig, ax)
    assert len(boxes) == n
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), (a, b)
    fb = fig.bbox
    assert all(b.x0 >= fb.x0 and b.x1 <= fb.x1 and b.y0 >= fb.y0 and b.y1 <= fb.y1 for b in boxes)
    ticks = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert len(ticks) >= 3, ticks


def test_bench_scatter_labels(tmp_path: Path, monkeypatch) -> None:
    import matplotlib.pyplot as plt

    from saekit.bench import report as bench_report
    from saekit.io import atomic

    captured = {}
    monkeypatch.setattr(atomic, "save_figure", lambda fig, path, dpi: captured.update(fig=fig))
    monkeypatch.setattr(plt, "close", lambda fig: None)
    m = lambda v: {"mean": v, "sd": 0.0}  # noqa: E731
    other = {"mcc": m(0.5), "f1": m(0.5), "dead_frac": m(0.1), "fvu_down": m(0.1)}
    rows = {n: {"label": n, "l0": m(a), "fve": m(b), **other} for n, (a, b) in README_ROWS.items()}
    report = {"table": rows, "k": 6, "signed": {}, "config": {"size": "small", "seeds": [0]},
              "size": {"d": 64, "n_features": 256}}  # fmt: skip
    bench_report.plot_bench(report, tmp_path / "bench.png")
    fig = captured["fig"]
    _assert_readable(fig, fig.axes[0], len(rows))


def test_frontier_labels(tmp_path: Path, monkeypatch) -> None:
    import matplotlib.pyplot as plt

    from saekit.evaluate import plots

    captured = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, dpi: captured.update(fig=fig))
    monkeypatch.setattr(plt, "close", lambda fig: None)
    points = [{"name": n, "l0": a, "fve": b} for n, (a, b) in README_ROWS.items()]
    points += [{"name": f"{n} pca", "l0": a, "fve": b - 0.2, "kind": "pca"} for n, (a, b) in
               list(README_ROWS.items())[:4]]  # fmt: skip
    plots.frontier(points, "l0", "fve", tmp_path / "frontier_l0_fve.png")
    fig = captured["fig"]
    _assert_readable(fig, fig.axes[0], len(points))
