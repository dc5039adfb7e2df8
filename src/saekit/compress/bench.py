"""Method × ratio comparison table: held-out perplexity, parameters, per-layer output error."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable

from torch import Tensor, nn

from saekit.compress.config import METHODS
from saekit.compress.core import CompressConfig, aces_agreement, compress_model
from saekit.compress.lowrank import count_params
from saekit.compress.metrics import layer_output_errors, perplexity

LABELS = {"svd": "SVD", "asvd": "ASVD", "svdllm": "SVD-LLM", "saes": "SAES-SVD"}


def evaluate_one(
    model: nn.Module,
    cfg: CompressConfig,
    calib: list[Tensor],
    heldout: list[Tensor],
    reference: nn.Module | None = None,
) -> dict:
    """Compress a deep copy of ``model`` with ``cfg``; held-out ppl, params, layer errors."""
    t0 = time.perf_counter()
    student = copy.deepcopy(model)
    res = compress_model(student, cfg, calib, teacher=reference)
    secs = time.perf_counter() - t0
    names = list(res.layers)
    errs = layer_output_errors(student, reference or model, names, heldout[:2])
    row = {
        "method": cfg.method,
        "ratio": cfg.ratio,
        "ppl": perplexity(student, heldout),
        "params_before": res.params_before,
        "params_after": res.params_after,
        "mean_layer_out_err": sum(errs.values()) / len(errs),
        "last_layer_out_err": errs[names[-1]],
        "layer_out_err": errs,
        "compress_seconds": secs,
    }
    if cfg.method == "saes":
        row["betas"] = {k: v.beta for k, v in res.layers.items()}
        row["aces_vs_grid"] = aces_agreement(res.layers)
    return row


def compare_methods(
    model: nn.Module,
    calib: list[Tensor],
    heldout: list[Tensor],
    methods: tuple[str, ...] = METHODS,
    ratios: tuple[float, ...] = (0.2, 0.4, 0.6),
    base: CompressConfig | None = None,
    progress: Callable[[str], None] | None = None,
    variants: dict[str, dict] | None = None,
) -> dict:
    """Every method at every ratio on the same calibration/held-out batches.

    ``variants`` adds labelled extra rows, e.g. ``{"SAES-SVD β=0": {"method": "saes",
    "beta": "0"}}`` (config overrides applied on top of ``base`` at each ratio).
    """
    base = base or CompressConfig()
    model.eval()
    out = {
        "ppl_original": perplexity(model, heldout),
        "params_original": count_params(model),
        "calib_tokens": sum(b.numel() for b in calib),
        "heldout_tokens": sum(b.numel() for b in heldout),
        "config": dataclasses.asdict(base),
        "rows": [],
    }
    for ratio in ratios:
        runs = [(LABELS.get(m, m), {"method": m}) for m in methods]
        runs += list((variants or {}).items())
        for label, over in runs:
            cfg = dataclasses.replace(base, ratio=ratio, **over)
            row = evaluate_one(model, cfg, calib, heldout)
            row["label"] = label
            out["rows"].append(row)
            if progress:
                progress(f"{label} ratio={ratio}: ppl={row['ppl']:.3f}")
    return out


def markdown_table(result: dict) -> str:
    """Rows = methods, columns = ratios; cells = held-out perplexity (best per column bold)."""
    ratios = sorted({r["ratio"] for r in result["rows"]})
    label = [r.get("label") or LABELS.get(r["method"], r["method"]) for r in result["rows"]]
    methods = list(dict.fromkeys(label))
    cell = {(lb, r["ratio"]): r for lb, r in zip(label, result["rows"])}
    lines = [
        f"Held-out perplexity (original model: {result['ppl_original']:.3f}); "
        "columns = fraction of block parameters removed",
        "",
        "| method | " + " | ".join(f"{q:g}" for q in ratios) + " |",
        "|---|" + "---|" * len(ratios),
    ]
    best = {q: min(cell[(m, q)]["ppl"] for m in methods if (m, q) in cell) for q in ratios}
    for m in methods:
        cells = []
        for q in ratios:
            if (m, q) not in cell:
                cells.append("—")
                continue
            p = cell[(m, q)]["ppl"]
            cells.append(f"**{p:.3f}**" if p == best[q] else f"{p:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
