"""Neuronpedia export: a run's dashboard data in the batch form Neuronpedia's upload takes.

``saekit dashboard RUN --out DIR --neuronpedia true`` writes ``DIR/neuronpedia/batch-N.json``
(``features_per_batch`` features each), the layout SAEDashboard's ``NeuronpediaRunner``
writes for upload: ``{"model_id", "layer", "sae_set", "features": [...]}`` with, per
feature,

- ``feature_index``; ``frac_nonzero`` (its density on the collected tokens);
- ``freq_hist_data_bar_values`` / ``_heights``: histogram of its nonzero activations (bin
  centres, counts);
- ``pos_str`` / ``pos_values``, ``neg_str`` / ``neg_values``: the most promoted and
  suppressed tokens by the direct logit effect ``d_i W_U`` (models with an LM head; else
  empty), and ``logits_hist_data_bar_values`` / ``_heights``: its histogram over the vocab;
- ``neuron_alignment_indices`` / ``_values`` / ``_l1``: the largest decoder entries of the
  latent (value, and share of the row's L1 norm);
- ``activations``: the top-activating texts (``bin_min`` -1, ``bin_max`` the max,
  ``bin_contains`` -1) then each activation quantile's samples (``bin_min`` / ``bin_max``
  the quantile's range, ``bin_contains`` its share of the nonzero activations), each with
  every token of its text and the latent's value on each (0 where it did not fire);
- ``n_prompts_total``, ``n_tokens_in_prompt``, ``dataset``.

Activation-correlation tables (``correlated_neurons_*``, ``correlated_features_*``) and
``decoder_weights_dist`` (attention heads) are empty lists [our choice: not computed].
Values are rounded to 3 decimals, as SAEDashboard does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from saekit.io.atomic import json_safe, write_json

EMPTY_TABLES = (
    "correlated_neurons_indices",
    "correlated_neurons_l1",
    "correlated_neurons_pearson",
    "correlated_features_indices",
    "correlated_features_l1",
    "correlated_features_pearson",
    "decoder_weights_dist",
)


def _r(x: Any) -> list[float]:
    return [round(float(v), 3) for v in np.asarray(x).reshape(-1)]


def _hist(x: np.ndarray, bins: int) -> tuple[list[float], list[float]]:
    if len(x) == 0:
        return [], []
    heights, edges = np.histogram(x, bins=bins)
    return _r((edges[:-1] + edges[1:]) / 2), [float(h) for h in heights]


def _text_activation(
    tokens: list[str], values: dict[int, float], lo: float, hi: float, share: float
) -> dict[str, Any]:
    return {
        "bin_min": lo,
        "bin_max": hi,
        "bin_contains": share,
        "tokens": list(tokens),
        "values": [round(values.get(p, 0.0), 3) for p in range(len(tokens))],
    }


def feature_record(
    f: int,
    seq: np.ndarray,
    pos: np.ndarray,
    val: np.ndarray,
    tokens: list[list[str]],
    n_tokens: int,
    decoder_row: np.ndarray,
    logit_effect: np.ndarray | None,
    decode: Any,
    cfg: Any,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """One feature in Neuronpedia's form (see the module doc); ``cfg`` a DashboardConfig."""
    rec: dict[str, Any] = {"feature_index": int(f), **{k: [] for k in EMPTY_TABLES}}
    top = np.argsort(-np.abs(decoder_row))[:3]
    l1 = float(np.abs(decoder_row).sum()) or 1.0
    rec["neuron_alignment_indices"] = [int(i) for i in top]
    rec["neuron_alignment_values"] = _r(decoder_row[top])
    rec["neuron_alignment_l1"] = _r(np.abs(decoder_row[top]) / l1)
    rec["frac_nonzero"] = float(len(val) / max(n_tokens, 1))
    rec["freq_hist_data_bar_values"], rec["freq_hist_data_bar_heights"] = _hist(val, cfg.bins)
    rec["pos_str"], rec["pos_values"], rec["neg_str"], rec["neg_values"] = [], [], [], []
    rec["logits_hist_data_bar_values"], rec["logits_hist_data_bar_heights"] = [], []
    if logit_effect is not None:
        hi, lo = np.argsort(-logit_effect)[: cfg.n_logits], np.argsort(logit_effect)[: cfg.n_logits]
        rec["pos_str"] = [decode([int(i)]) for i in hi]
        rec["pos_values"] = _r(logit_effect[hi])
        rec["neg_str"] = [decode([int(i)]) for i in lo]
        rec["neg_values"] = _r(logit_effect[lo])
        v, h = _hist(logit_effect, cfg.bins)
        rec["logits_hist_data_bar_values"], rec["logits_hist_data_bar_heights"] = v, h
    acts: list[dict[str, Any]] = []
    if len(val):
        by_text: dict[int, dict[int, float]] = {}
        for s, p, v in zip(seq, pos, val):
            by_text.setdefault(int(s), {})[int(p)] = float(v)
        vmax = round(float(np.abs(val).max()), 3)
        seen: set[int] = set()
        for i in np.argsort(-np.abs(val), kind="stable"):
            s = int(seq[i])
            if s not in seen:
                seen.add(s)
                acts.append(_text_activation(tokens[s], by_text[s], -1, vmax, -1))
            if len(seen) >= cfg.n_top:
                break
        order = np.argsort(np.abs(val), kind="stable")
        for chunk in reversed(np.array_split(order, cfg.n_quantiles)):
            if len(chunk) == 0:
                continue
            lo_q, hi_q = (
                round(float(np.abs(val[chunk]).min()), 3),
                round(float(np.abs(val[chunk]).max()), 3),
            )
            share = round(len(chunk) / len(val), 3)
            pick = rng.choice(chunk, size=min(cfg.per_quantile, len(chunk)), replace=False)
            for i in pick:
                s = int(seq[i])
                acts.append(_text_activation(tokens[s], by_text[s], lo_q, hi_q, share))
    rec["activations"] = acts
    return rec


def write_batches(
    out_dir: str | Path,
    features: list[dict[str, Any]],
    model_id: str,
    layer: int,
    sae_set: str,
    per_batch: int = 128,
    prompts: dict[str, Any] | None = None,
) -> list[Path]:
    """``out_dir/batch-N.json`` files of ``per_batch`` features each; their paths."""
    out = Path(out_dir)
    paths = []
    for n, start in enumerate(range(0, max(len(features), 1), per_batch)):
        chunk = [{**f, **(prompts or {})} for f in features[start : start + per_batch]]
        batch = {"model_id": model_id, "layer": layer, "sae_set": sae_set, "features": chunk}
        write_json(out / f"batch-{n}.json", json_safe(batch))
        paths.append(out / f"batch-{n}.json")
    return paths


__all__ = ["EMPTY_TABLES", "feature_record", "write_batches"]
