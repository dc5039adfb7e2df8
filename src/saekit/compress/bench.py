"""Method × ratio × seed comparison: held-out perplexity (mean ± sd), parameters, β, cost."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable

from torch import Tensor, nn

from saekit.compress.config import METHODS, CompressConfig
from saekit.compress.core import aces_agreement, compress_model
from saekit.compress.lowrank import count_params
from saekit.compress.metrics import layer_output_errors, perplexity
from saekit.options import to_dict

LABELS = {
    "svd": "SVD",
    "asvd": "ASVD (scaling, uniform ranks)",
    "svdllm": "SVD-LLM (whitening)",
    "saes": "SAES-SVD",
}


def label_of(cfg: CompressConfig) -> str:
    """An exact row label for a configuration."""
    if cfg.method == "asvd" and cfg.allocation == "sensitivity":
        return "ASVD (scaling + sensitivity ranks)"
    if cfg.method == "svdllm" and cfg.update_u:
        return "SVD-LLM (whitening + closed-form U)"
    if cfg.method == "saes":
        b = cfg.beta if cfg.beta != "aces" else f"ACES {cfg.aces}"
        return f"SAES-SVD (β {b})"
    return LABELS[cfg.method]


def evaluate_one(
    model: nn.Module,
    cfg: CompressConfig,
    calib: list[Tensor],
    heldout: list[Tensor],
    reference: nn.Module | None = None,
    sensitivity: dict | None = None,
) -> dict:
    """Compress ``model`` (in place) with ``cfg``; held-out ppl, params, β, layer errors.

    ``sensitivity``: a dict caching ASVD sensitivity tables per method (filled here)."""
    from saekit.compress.allocate import sensitivity_ranks

    t0 = time.perf_counter()
    ranks = None
    if cfg.allocation == "sensitivity":
        cache = {} if sensitivity is None else sensitivity
        key = (cfg.method, cfg.alpha, cfg.sensitivity_seqs)
        ranks, cache[key] = sensitivity_ranks(model, cfg, calib, table=cache.get(key))
    res = compress_model(model, cfg, calib, ranks=ranks)
    secs = time.perf_counter() - t0
    row = {
        "method": cfg.method,
        "ratio": cfg.ratio,
        "ppl": perplexity(model, heldout),
        "params_before": res.params_before,
        "params_after": res.params_after,
        "compress_seconds": secs,
        "block_forwards": res.block_forwards,
    }
    if reference is not None:
        names = [n for n, r in res.layers.items() if r.rank > 0]
        errs = layer_output_errors(model, reference, names, heldout[:2])
        row.update(
            mean_layer_out_err=sum(errs.values()) / len(errs), last_layer_out_err=errs[names[-1]]
        )
    if cfg.method == "saes":
        betas = [v.beta for v in res.layers.values() if v.beta is not None]
        row["betas"] = {k: v.beta for k, v in res.layers.items()}
        row["mean_beta"] = sum(betas) / max(len(betas), 1)
        row["capped"] = sum(bool(v.beta_capped) for v in res.layers.values())
        row["aces_vs_grid"] = aces_agreement(res.layers)
    return row


def compare_methods(
    load: Callable[[], nn.Module],
    calib_for_seed: Callable[[int], list[Tensor]],
    heldout: list[Tensor],
    methods: tuple[str, ...] = METHODS,
    ratios: tuple[float, ...] = (0.2, 0.4, 0.6),
    seeds: tuple[int, ...] = (0,),
    base: CompressConfig | None = None,
    progress: Callable[[str], None] | None = None,
    variants: dict[str, dict] | None = None,
    reference: nn.Module | None = None,
) -> dict:
    """Every method (and labelled ``variants``: config overrides) at every ratio and seed.

    ``load()`` returns a fresh copy of the original model for each row; ``calib_for_seed``
    the calibration batches of a seed; ``reference`` (optional) the original model for
    per-layer output errors. Rows are per seed; ``summary`` holds mean ± sd over seeds.
    """
    base = base or CompressConfig()
    model = load()
    out = {
        "ppl_original": perplexity(model, heldout),
        "params_original": count_params(model),
        "heldout_tokens": sum(b.numel() for b in heldout),
        "seeds": list(seeds),
        "config": to_dict(base),
        "rows": [],
    }
    del model
    runs = [(None, {"method": m}) for m in methods] + list((variants or {}).items())
    for seed in seeds:
        calib = calib_for_seed(seed)
        out["calib_tokens"] = sum(b.numel() for b in calib)
        sens: dict = {}  # ASVD sensitivity tables of this seed's calibration data
        for ratio in ratios:
            for label, over in runs:
                cfg = dataclasses.replace(base, ratio=ratio, **over)
                row = evaluate_one(load(), cfg, calib, heldout, reference, sens)
                row.update(label=label or label_of(cfg), seed=seed)
                out["rows"].append(row)
                if progress:
                    progress(f"{row['label']} ratio={ratio} seed={seed}: ppl={row['ppl']:.3f}")
    out["summary"] = summarise(out["rows"])
    return out


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and sample sd of ppl (and mean β) per (label, ratio) over seeds."""
    keys = list(dict.fromkeys((r["label"], r["ratio"]) for r in rows))
    out = []
    for label, ratio in keys:
        sel = [r for r in rows if r["label"] == label and r["ratio"] == ratio]
        ppl = [r["ppl"] for r in sel]
        item = {
            "label": label,
            "ratio": ratio,
            "n": len(sel),
            "ppl_mean": statistics.fmean(ppl),
            "ppl_sd": statistics.stdev(ppl) if len(ppl) > 1 else math.nan,
        }
        if "mean_beta" in sel[0]:
            item["mean_beta"] = statistics.fmean(r["mean_beta"] for r in sel)
            item["capped_frac"] = statistics.fmean(
                r["capped"] / max(len(r["betas"]), 1) for r in sel
            )
        out.append(item)
    return out


def markdown_table(result: dict) -> str:
    """Rows = methods, columns = ratios; cells = held-out ppl mean ± sd (best mean bold)."""
    summ = result.get("summary") or summarise(result["rows"])
    ratios = sorted({s["ratio"] for s in summ})
    labels = list(dict.fromkeys(s["label"] for s in summ))
    cell = {(s["label"], s["ratio"]): s for s in summ}
    seeds = result.get("seeds", [0])
    lines = [
        f"Held-out perplexity (original model: {result['ppl_original']:.3f}), mean ± sd over "
        f"{len(seeds)} calibration seed(s); columns = fraction of block parameters removed",
        "",
        "| method | " + " | ".join(f"{q:g}" for q in ratios) + " |",
        "|---|" + "---:|" * len(ratios),
    ]
    best = {q: min(cell[(m, q)]["ppl_mean"] for m in labels if (m, q) in cell) for q in ratios}
    for m in labels:
        cells = []
        for q in ratios:
            s = cell.get((m, q))
            if s is None:
                cells.append("—")
                continue
            txt = f"{s['ppl_mean']:.2f}"
            if not math.isnan(s["ppl_sd"]):
                txt += f" ± {s['ppl_sd']:.2f}"
            cells.append(f"**{txt}**" if s["ppl_mean"] == best[q] else txt)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
