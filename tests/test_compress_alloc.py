"""Per-layer rank allocation: ASVD's sensitivity search (perplexity per layer and kept
fraction, then a threshold that meets the parameter budget)."""

from __future__ import annotations

import pytest
import torch

from compress_helpers import batches, llama
from saekit.compress import CompressConfig, compress_model
from saekit.compress.allocate import kept_rank, search_ranks, sensitivity_ranks


def _kept(ranks, shapes):
    tot = sum(m * n for m, n in shapes.values())
    kept = sum(r * (m + n) if r else m * n for (m, n), r in ((shapes[k], ranks[k]) for k in ranks))
    return kept / tot


def test_search_spends_the_budget_on_sensitive_layers():
    """Three equal layers; 'a' is insensitive, 'c' very sensitive: the search compresses 'a'
    most, keeps 'c' densest, and meets the kept-parameter budget."""
    shapes = {k: (64, 64) for k in "abc"}
    ps = (0.1, 0.3, 0.5, 0.7, 0.9)
    sens = {
        "a": {p: 10 + 1 * (1 - p) for p in ps},
        "b": {p: 10 + 5 * (1 - p) for p in ps},
        "c": {p: 10 + 50 * (1 - p) for p in ps},
    }
    ranks = search_ranks(sens, shapes, kept_target=0.5)
    assert _kept(ranks, shapes) <= 0.5
    ra, rb, rc = ranks["a"], ranks["b"], ranks["c"]
    assert ra <= rb and (rc == 0 or rb <= rc)
    assert ra == kept_rank(64, 64, 0.1)
    # a looser budget keeps more
    loose = search_ranks(sens, shapes, kept_target=0.8)
    assert _kept(loose, shapes) <= 0.8 and _kept(loose, shapes) >= _kept(ranks, shapes)


@pytest.mark.parametrize("method", ["asvd", "svdllm"])
def test_sensitivity_allocation_end_to_end(method):
    model = llama(2)
    data = batches(2, 4, 16)
    cfg = CompressConfig(method=method, ratio=0.5, allocation="sensitivity", sensitivity_seqs=4)
    ranks, table = sensitivity_ranks(model, cfg, data)
    assert set(table) == set(ranks) and all(len(v) == 9 for v in table.values())
    assert sensitivity_ranks(model, cfg, [], table=table)[0] == ranks  # reused, not re-measured
    assert all(v > 0 for row in table.values() for v in row.values())
    res = compress_model(model, cfg, data, ranks=ranks)
    removed = res.params_before - res.params_after
    block = sum(r.params_before for r in res.layers.values())
    assert removed >= 0.5 * block - max(sum(r.shape) for r in res.layers.values())
    assert len({r.rank for r in res.layers.values()}) > 1  # not uniform
    with torch.no_grad():
        assert torch.isfinite(model(data[0]).logits).all()


def test_sensitivity_per_kind_budgets():
    model = llama(2)
    data = batches(2, 4, 16)
    cfg = CompressConfig(
        method="svd",
        ratio=0.5,
        ratio_attn=0.2,
        ratio_mlp=0.6,
        allocation="sensitivity",
        sensitivity_seqs=4,
    )
    ranks, _ = sensitivity_ranks(model, cfg, data)
    from saekit.compress.lowrank import dense_weight

    shapes = {n: tuple(dense_weight(model.get_submodule(n)).shape) for n in ranks}
    for kind, q in (("self_attn", 0.2), ("mlp", 0.6)):
        sub = {n: r for n, r in ranks.items() if kind in n}
        assert _kept(sub, {n: shapes[n] for n in sub}) <= 1 - q
