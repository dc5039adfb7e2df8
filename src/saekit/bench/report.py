"""The bench's aggregate over seeds (mean ± sd), printed table and figure."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

#: (key, header, format of one number) of the printed table
COLUMNS = [
    ("l0", "L0", "{:.2f}"),
    ("fve", "FVE", "{:.3f}"),
    ("fvu_down", "FVU_down", "{:.3f}"),
    ("dead_frac", "dead", "{:.3f}"),
    ("mcc", "MCC", "{:.3f}"),
    ("mmcs", "MMCS", "{:.3f}"),
    ("recovery", "recov", "{:.3f}"),
    ("f1", "F1", "{:.3f}"),
    ("absorption", "absorb", "{:.3f}"),
    ("step_ms", "ms/step", "{:.1f}"),
]
#: metrics aggregated over seeds
METRICS = [
    "l0",
    "fve",
    "fvu_down",
    "dead_frac",
    "dead_frac_train",
    "dense_frac",
    "mcc",
    "mmcs",
    "recovery",
    "f1",
    "precision",
    "recall",
    "absorption",
    "train_l0",
    "step_ms",
]


def row_key(name: str, rule: str) -> str:
    """The aggregate row of a per-seed table row: grid variants group under their rule."""
    return rule if "[" in name else name


def aggregate(per_seed: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per row: ``{metric: {"mean", "sd", "values"}}`` over the seeds (sd 0 for one seed),
    ``variants`` (the chosen variant per seed) and ``label``."""
    rows: dict[str, dict[str, Any]] = {}
    for table in per_seed:
        for name, r in table.items():
            row = rows.setdefault(row_key(name, r["rule"]), {"variants": [], "_vals": {}})
            row["variants"].append(name)
            row["rule"] = r["rule"]
            for m in METRICS:
                v = r.get(m)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    row["_vals"].setdefault(m, []).append(float(v))
    for key, row in rows.items():
        vals = row.pop("_vals")
        for m, vs in vals.items():
            sd = statistics.stdev(vs) if len(vs) > 1 else 0.0
            row[m] = {"mean": statistics.fmean(vs), "sd": sd, "values": vs}
        row["label"] = _label(key, row["variants"])
    return rows


def _label(key: str, chosen: list[str]) -> str:
    uniq = list(dict.fromkeys(chosen))
    if len(uniq) == 1:
        return uniq[0]
    opt = uniq[0].split("[", 1)[1].split("=", 1)[0]
    vals = "|".join(u.split("=", 1)[1].rstrip("]") for u in uniq)
    return f"{key}[{opt}={vals}]"


def mean_of(row: dict[str, Any], key: str) -> float | None:
    v = row.get(key)
    return v["mean"] if isinstance(v, dict) else None


def format_table(rows: dict[str, dict[str, Any]], columns: list | None = None) -> str:
    """Fixed-width table of aggregated ``rows``: ``mean±sd`` cells (just the mean for one
    seed), sorted as given."""
    columns = COLUMNS if columns is None else columns
    labels = {k: r.get("label", k) for k, r in rows.items()}
    w = max([len("variant")] + [len(v) for v in labels.values()]) + 2
    cw = 13
    head = "variant".ljust(w) + "".join(h.rjust(cw) for _, h, _ in columns)
    lines = [head, "-" * len(head)]
    for key, r in rows.items():
        cells = []
        for m, _, fmt in columns:
            v = r.get(m)
            if not isinstance(v, dict):
                cells.append("-".rjust(cw))
                continue
            text = fmt.format(v["mean"])
            if len(v["values"]) > 1:
                text += "±" + fmt.format(v["sd"])
            cells.append(text.rjust(cw))
        lines.append(labels[key].ljust(w) + "".join(cells))
    return "\n".join(lines)


def report_text(report: dict[str, Any]) -> str:
    """The printed summary: main table, then the signed-features comparison."""
    size, seeds = report["size"], report["config"]["seeds"]
    parts = [
        f"saekit bench ({report['config']['size']}): {size['n_features']} true features in"
        f" d={size['d']}, d_sae={size['n_features']}, k = round(expected true L0) per seed"
        f" ({', '.join(str(s['k']) for s in report['seeds'].values())}),"
        f" {size['tokens']} training tokens; mean ± sd over seeds {seeds}",
        format_table(report["table"]),
    ]
    if report["signed"]:
        parts.append("\nbidirectional features (every feature ±):")
        parts.append(format_table(report["signed"], [c for c in COLUMNS if c[0] != "fvu_down"]))
    parts.append(f"\ntotal {report['total_s']:.0f} s on {report['threads']} threads")
    return "\n".join(parts)


def plot_bench(report: dict[str, Any], path: Path) -> None:
    """Panels: FVE vs L0, MCC, F1, dead fraction, FVU_down (means, sd as error bars), signed."""
    from saekit.extras import require

    require("matplotlib.ticker", "the bench plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saekit.evaluate.labels import label_points, log_ticks
    from saekit.io.atomic import save_figure

    rows = report["table"]
    keys = list(rows)
    names = [rows[k]["label"] for k in keys]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    scatter = ax = axes[0, 0]
    points: list[tuple[float, float, str]] = []
    for k, n in zip(keys, names):
        x, y = mean_of(rows[k], "l0"), mean_of(rows[k], "fve")
        if x is None or y is None:
            continue
        ax.errorbar(x, y, xerr=rows[k]["l0"]["sd"], yerr=rows[k]["fve"]["sd"], fmt="o")
        points.append((x, y, n))
    ax.set_xscale("log")
    log_ticks(ax.xaxis)
    ax.margins(x=0.25, y=0.12)
    ax.set_xlabel("L0 (eval)")
    ax.set_ylabel("FVE")
    ax.set_title("reconstruction vs sparsity")
    for ax, m, title in [
        (axes[0, 1], "mcc", "MCC (Hungarian |cos|)"),
        (axes[0, 2], "f1", "per-latent F1 vs true firing"),
        (axes[1, 0], "dead_frac", "dead fraction (eval)"),
        (axes[1, 1], "fvu_down", "FVU under the downstream loss"),
    ]:
        vals = [mean_of(rows[k], m) or 0.0 for k in keys]
        err = [rows[k][m]["sd"] if isinstance(rows[k].get(m), dict) else 0.0 for k in keys]
        ax.barh(names, vals, xerr=err)
        ax.set_title(title)
        ax.tick_params(axis="y", labelsize=7)
        ax.invert_yaxis()
    ax = axes[1, 2]
    if report["signed"]:
        s = report["signed"]
        ms = ["mcc", "f1", "fve"]
        for i, k in enumerate(s):
            ax.bar(
                [j + 0.4 * i for j in range(len(ms))],
                [mean_of(s[k], m) or 0.0 for m in ms],
                0.4,
                label=s[k]["label"],
            )
        ax.set_xticks([j + 0.2 for j in range(len(ms))], ms)
        ax.legend()
        ax.set_title("bidirectional features")
    else:
        ax.axis("off")
    fig.suptitle(
        f"saekit bench ({report['config']['size']}): d={report['size']['d']},"
        f" {report['size']['n_features']} features, seeds {report['config']['seeds']}"
    )
    fig.tight_layout()
    label_points(scatter, [p[0] for p in points], [p[1] for p in points], [p[2] for p in points])
    save_figure(fig, path, dpi=110)
    plt.close(fig)
