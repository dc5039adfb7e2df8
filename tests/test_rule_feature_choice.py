"""Feature Choice and its Zipf capacities."""

import math

import pytest
import torch

from rule_helpers import dense_codes, make
from saekit.rules.feature_choice import zipf_capacities, zipf_profile


def test_zipf_capacities_exact_bounded_monotone() -> None:
    for n, total, cap in [(48, 192, 64), (10, 37, 5), (100, 50, 8), (7, 49, 7), (30, 31, 4)]:
        for alpha in (0.0, 0.7, 1.0, 2.5):
            p = zipf_profile(n, alpha, 0.0)
            m = zipf_capacities(p, total, cap)
            assert int(m.sum()) == total
            assert int(m.max()) <= cap
            lo = 1 if total >= n else 0
            assert int(m.min()) >= lo
            assert (m[:-1] >= m[1:]).all()  # follows the ranking
    with pytest.raises(ValueError, match="exceeds"):
        zipf_capacities(zipf_profile(4), 100, 5)
    with pytest.raises(ValueError, match="beta"):
        zipf_profile(4, 1.0, -1.0)


def test_feature_choice_capacities_and_no_dead() -> None:
    d_sae, k, B = 48, 3, 64
    sae = make("feature_choice", d_sae=d_sae, k=k)
    sae.train()
    freq = torch.rand(d_sae)
    sae.rule.rank_stat.copy_(freq)
    x = torch.randn(B, 12)
    out = sae(x)
    m = out.extras["capacity"]
    assert int(m.sum()) == k * B
    assert (m >= 1).all() and (m <= B).all()
    ranked = m[torch.argsort(freq, descending=True)]
    assert (ranked[:-1] >= ranked[1:]).all() and ranked[0] > ranked[-1]
    counts = out.codes.fire_counts()
    assert (counts <= m).all()
    pre = out.pre.detach()
    has_pos = (pre > 0).any(0)
    assert has_pos.all()
    assert (counts > 0).all()  # no dead feature on this batch
    # naive reference: column i keeps its top m_i positive entries
    ref = torch.zeros_like(pre)
    z = torch.relu(pre)
    for i in range(d_sae):
        top = z[:, i].topk(int(m[i])).indices
        ref[top, i] = z[top, i]
    assert torch.allclose(out.codes.to_dense().detach(), ref)
    assert int(out.codes.l0().sum()) == int((ref > 0).sum())


def test_feature_choice_inference_thresholds() -> None:
    sae = make("feature_choice", d_sae=48, k=3)
    x = torch.randn(64, 12)
    sae.eval()
    pre = sae.encode_pre(x).detach()
    assert torch.equal(dense_codes(sae, x) != 0, pre > 0)  # untrained: thresholds 0
    sae.train()
    out = sae(x)
    dense = out.codes.to_dense().detach()
    low = torch.where(dense > 0, dense, torch.full_like(dense, math.inf)).min(0).values
    # before the tracking starts: the latest batch's smallest selected value
    assert torch.allclose(sae.rule.threshold, low)
    sae.eval()
    pre = sae.encode_pre(x).detach()
    assert torch.equal(dense_codes(sae, x) != 0, pre > sae.rule.threshold)
    assert torch.allclose(sae.rule.export_threshold(), sae.rule.threshold)
    from saekit.io.saelens import saelens_export

    assert torch.equal(saelens_export(sae)[1]["threshold"], sae.rule.export_threshold())


def test_aux_options_apart_and_bad_options() -> None:
    make("feature_choice", rule_options={"alpha": 1.2}, aux="zipf", aux_options={"tau": 0.5})
    with pytest.raises(ValueError, match="known options"):  # aux options are not rule options
        make("feature_choice", rule_options={"alpha": 1.2, "aux_zipf": {"tau": 0.5}})
    with pytest.raises(ValueError, match="known options"):
        make("feature_choice", rule_options={"gamma": 1.0})
    with pytest.raises(ValueError, match="beta"):
        make("feature_choice", rule_options={"beta": -2.0})
