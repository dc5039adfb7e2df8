"""Neuronpedia export of a run's dashboard data (SAEDashboard's batch layout)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from saekit import SAE, SAEConfig
from saekit.apply.common import decoder_directions, unembedding
from saekit.apply.dashboard import DashboardConfig, build_dashboard, collect
from saekit.apply.toy import tiny_gpt2, word_tokenizer

#: NeuronpediaDashboardFeature's fields (SAEDashboard), every one written
FEATURE_FIELDS = {
    "feature_index", "neuron_alignment_indices", "neuron_alignment_values",
    "neuron_alignment_l1", "correlated_neurons_indices", "correlated_neurons_l1",
    "correlated_neurons_pearson", "correlated_features_indices", "correlated_features_l1",
    "correlated_features_pearson", "neg_str", "neg_values", "pos_str", "pos_values",
    "frac_nonzero", "freq_hist_data_bar_values", "freq_hist_data_bar_heights",
    "logits_hist_data_bar_heights", "logits_hist_data_bar_values", "n_prompts_total",
    "n_tokens_in_prompt", "dataset", "decoder_weights_dist", "activations",
}  # fmt: skip
ACTIVATION_FIELDS = {"bin_min", "bin_max", "bin_contains", "tokens", "values"}


def test_neuronpedia_batches(tmp_path: Path) -> None:
    texts = [f"the object {w} is returned when the key {w} is missing" for w in "abcdefgh"] * 3
    tok = word_tokenizer(texts, 64)
    model = tiny_gpt2(len(tok), n_layer=2, n_embd=32, seed=0)
    sae = SAE(SAEConfig(d_in=32, d_sae=64, rule="topk", k=4)).eval()
    col = collect(sae, model, tok, "layers.1.resid_post", texts, max_len=16)
    cfg = DashboardConfig(feature_ids=list(range(10)), neuronpedia=True, features_per_batch=4,
                          n_top=3, n_quantiles=2, per_quantile=2, n_logits=5)  # fmt: skip
    meta = {"model": "org/tiny", "site": "layers.1.resid_post", "rule": "topk", "data": "t"}
    build_dashboard(sae, col, tmp_path, cfg, model, tok, meta)
    batches = sorted((tmp_path / "neuronpedia").glob("batch-*.json"))
    assert [b.name for b in batches] == ["batch-0.json", "batch-1.json", "batch-2.json"]
    feats = [f for b in batches for f in json.loads(b.read_text())["features"]]
    head = json.loads(batches[0].read_text())
    assert (head["model_id"], head["layer"], head["sae_set"]) == ("tiny", 1, "saekit-topk")
    assert [f["feature_index"] for f in feats] == list(range(10))
    W = decoder_directions(sae).float()
    W_U = unembedding(model).float()
    for f in feats:
        i = f["feature_index"]
        assert set(f) == FEATURE_FIELDS
        fired = col.val[col.feat == i]
        assert abs(f["frac_nonzero"] - len(fired) / col.n_tokens) < 1e-12
        assert sum(f["freq_hist_data_bar_heights"]) == len(fired)
        eff = (W_U @ W[i]).numpy()
        assert f["pos_values"] == [round(float(v), 3) for v in np.sort(eff)[::-1][:5]]
        assert f["pos_str"][0] == tok.decode([int(np.argmax(eff))])
        assert f["n_prompts_total"] == len(col.tokens) and f["dataset"] == "t"
        if len(fired):
            top = f["activations"][0]
            assert set(top) == ACTIVATION_FIELDS and top["bin_min"] == -1
            assert top["bin_max"] == round(float(np.abs(fired).max()), 3)
            assert max(top["values"]) == top["bin_max"] and len(top["tokens"]) == len(top["values"])
            quant = [a for a in f["activations"] if a["bin_min"] != -1]
            assert quant and all(0 < a["bin_contains"] <= 1 for a in quant)


def test_index_lists_features_by_density(tmp_path: Path) -> None:
    """The README's claim: the dashboard index is in density order (it was in id order)."""
    import re

    texts = [f"the object {w} is returned when the key {w} is missing" for w in "abcdefgh"] * 3
    tok = word_tokenizer(texts, 64)
    model = tiny_gpt2(len(tok), n_layer=2, n_embd=32, seed=0)
    sae = SAE(SAEConfig(d_in=32, d_sae=64, rule="topk", k=4)).eval()
    col = collect(sae, model, tok, "layers.1.resid_post", texts, max_len=16)
    build_dashboard(sae, col, tmp_path, DashboardConfig(feature_ids=list(range(20))), model, tok)
    html = (tmp_path / "index.html").read_text()
    rows = re.findall(r"<tr><td data-v='(\d+)'>.*?<td data-v='([0-9.e+-]+)'>", html)
    dens = [float(d) for _, d in rows]
    assert len(rows) == 20 and dens == sorted(dens, reverse=True)
    assert [int(f) for f, _ in rows] != sorted(int(f) for f, _ in rows)  # not id order here
