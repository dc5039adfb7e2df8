"""Markdown reports of one evaluation (``report.md``) and of several runs (``compare``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

#: headline rows: (label, section, key); section is a key of ``result["sae"]``
HEADLINE: list[tuple[str, str, str]] = [
    ("L0", "core", "l0"),
    ("FVE (pooled)", "core", "fve"),
    ("FVE (legacy per-token)", "core", "fve_legacy"),
    ("NMSE", "core", "nmse"),
    ("cos(x, x̂)", "core", "cos"),
    ("L2 ratio", "core", "l2_ratio"),
    ("rel. recon. bias", "core", "rel_bias"),
    ("dead fraction (no firing in the eval tokens)", "core", "dead_frac"),
    ("dead fraction (training: last dead_tokens tokens)", "core", "dead_frac_train"),
    ("dense fraction (>0.1)", "core", "dense_frac"),
    ("CE recovered", "splice", "ce_recovered"),
    ("ΔCE (nats)", "splice", "delta_ce"),
    ("KL score", "splice", "kl_score"),
    ("MCC", "ground_truth", "mcc"),
    ("MMCS", "ground_truth", "mmcs"),
    ("uniqueness", "ground_truth", "uniqueness"),
    ("recovery (abs cos > 0.9)", "ground_truth", "recovery"),
    ("per-latent F1", "detection", "f1"),
    ("absorption", "absorption", "absorption"),
    ("FVU under the downstream loss", "downstream", "fvu_down"),
    ("ε_LBO (median)", "afa", "eps_lbo_median"),
    ("decoder max abs cos (mean)", "independence", "decoder_max_cos_mean"),
    ("ablation ΔMSE when active (mean)", "ablation", "ablation_dmse_when_active_mean"),
]


#: sections computed from the weights alone (no tokens)
WEIGHT_ONLY = ("ground_truth", "independence")


def fmt(v: Any) -> str:
    """Compact number formatting ('–' for missing / NaN)."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


def _get(section: dict[str, Any] | None, key: str) -> Any:
    return None if not section else section.get(key)


def _n(section: dict[str, Any] | None) -> Any:
    return None if not section else section.get("n_tokens")


def headline_table(result: dict[str, Any]) -> str:
    """Markdown table: metric | SAE | random | PCA | n_tokens."""
    sae = result.get("sae", {})
    base = result.get("baselines", {})
    rows = [
        "| metric | SAE | random-decoder SAE | PCA (same L0) | n_tokens |",
        "|---|---|---|---|---|",
    ]
    for label, sec, key in HEADLINE:
        v = _get(sae.get(sec), key)
        if v is None:
            continue
        r = _get(base.get("random", {}).get(sec), key)
        p = _get(base.get("pca", {}).get(sec), key)
        n = "weights" if sec in WEIGHT_ONLY else fmt(_n(sae.get(sec)))
        rows.append(f"| {label} | {fmt(v)} | {fmt(r)} | {fmt(p)} | {n} |")
    for sec in sae.values():  # sections' own rows (saekit.arch: per-prefix, per-site FVE)
        if isinstance(sec, dict) and isinstance(sec.get("headline"), dict):
            for label, v in sec["headline"].items():
                rows.append(f"| {label} | {fmt(v)} | – | – | {fmt(_n(sec))} |")
    return "\n".join(rows)


def render(result: dict[str, Any], images: dict[str, str] | None = None) -> str:
    """The full ``report.md`` text of one evaluation."""
    lines = [f"# saekit evaluation: {result.get('run_dir', '')}", ""]
    info = result.get("data", {})
    lines.append(
        f"Site `{result.get('site', '')}`, data: {info.get('description', '')}"
        f" (fresh data: {info.get('fresh', '?')})."
    )
    lines += ["", "## Headline", "", headline_table(result), ""]
    notes = result.get("notes") or []
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    probe = result.get("sae", {}).get("probing")
    if probe:
        lines += ["## Sparse probing", "", "| k | SAE top-k acc | LLM top-k acc |", "|---|---|---|"]
        for k in sorted(int(key.split("_")[2]) for key in probe if key.startswith("sae_top_")):
            lines.append(
                f"| {k} | {fmt(probe[f'sae_top_{k}_test_accuracy'])} |"
                f" {fmt(probe[f'llm_top_{k}_test_accuracy'])} |"
            )
        lines += [
            "",
            f"{probe.get('n_texts')} texts ({probe.get('n_train')} train / {probe.get('n_test')}"
            f" test), {probe.get('n_tokens')} tokens, classes {probe.get('classes')}.",
            "",
        ]
    sp = result.get("sae", {}).get("splice")
    if sp:
        lines += [
            "## Spliced CE / KL",
            "",
            f"CE clean {fmt(sp.get('ce_clean'))}, with SAE {fmt(sp.get('ce_sae'))}, zero-ablated"
            f" {fmt(sp.get('ce_zero'))}, SAE with error term kept {fmt(sp.get('ce_sae_err'))}"
            f" (sanity: CE recovered {fmt(sp.get('ce_recovered_err'))}); KL SAE"
            f" {fmt(sp.get('kl_sae'))}, KL zero {fmt(sp.get('kl_zero'))};"
            f" {sp.get('n_tokens_ce')} CE tokens, {sp.get('n_tokens_kl')} KL tokens.",
            "",
        ]
    for name, path in (images or {}).items():
        lines += [f"![{name}]({path})", ""]
    return "\n".join(lines)


#: columns of ``saekit compare``: (label, section, key)
COMPARE_COLS: list[tuple[str, str, str]] = [
    ("rule", "", "rule"),
    ("d_sae", "", "d_sae"),
    ("L0", "core", "l0"),
    ("FVE", "core", "fve"),
    ("FVE legacy", "core", "fve_legacy"),
    ("NMSE", "core", "nmse"),
    ("cos", "core", "cos"),
    ("dead", "core", "dead_frac"),
    ("CE rec.", "splice", "ce_recovered"),
    ("KL score", "splice", "kl_score"),
    ("MCC", "ground_truth", "mcc"),
    ("F1", "detection", "f1"),
    ("absorption", "absorption", "absorption"),
    ("tokens", "core", "n_tokens"),
]


def compare_table(results: Sequence[dict[str, Any]], names: Sequence[str]) -> str:
    """Markdown table with one row per run (baseline rows for each run's random / PCA)."""
    head = "| run | " + " | ".join(c[0] for c in COMPARE_COLS) + " |"
    rows = [head, "|" + "---|" * (len(COMPARE_COLS) + 1)]
    for res, name in zip(results, names):
        for kind, sections in [("", res.get("sae", {}))] + [
            (f" ({b})", s) for b, s in sorted(res.get("baselines", {}).items())
        ]:
            cells = []
            for _, sec, key in COMPARE_COLS:
                if sec == "":
                    src = res.get("sae_info", {}) if not kind else {}
                    cells.append(fmt(src.get(key)) if src.get(key) is not None else "–")
                else:
                    cells.append(fmt(_get(sections.get(sec), key)))
            rows.append(f"| {name}{kind} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
