"""AbsTopK."""

import torch

from rule_helpers import dense_codes, make


def test_abstopk_keeps_negative_codes() -> None:
    sae = make("abstopk", d_in=8, d_sae=8, k=2, init_b_dec="zeros")
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(8))
        sae.W_dec.copy_(torch.eye(8))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    x = torch.zeros(2, 8)
    x[0, 2], x[0, 5], x[0, 1] = -3.0, 1.0, 0.5  # built from the negated atom d_2
    x[1, 4], x[1, 6] = -2.0, -1.0
    codes = sae.encode(x)
    dense = codes.to_dense()
    assert dense[0, 2] == -3.0 and dense[0, 5] == 1.0 and dense[0, 1] == 0.0
    assert dense[1, 4] == -2.0 and dense[1, 6] == -1.0
    assert codes.l0().tolist() == [2, 2]  # negative codes count
    assert sae.rule.signed
    assert torch.allclose(sae(x).x_hat[1], x[1])
    topk = make("topk", d_in=8, d_sae=8, k=2)
    topk.load_state_dict(sae.state_dict())
    assert (topk.encode(x).to_dense() >= 0).all()  # plain TopK cannot express them


def test_abstopk_matches_naive() -> None:
    sae = make("abstopk", k=5)
    x = torch.randn(20, 12)
    pre = sae.encode_pre(x).detach()
    ref = torch.zeros_like(pre)
    for b in range(pre.shape[0]):
        idx = sorted(range(pre.shape[1]), key=lambda i: -abs(float(pre[b, i])))[:5]
        ref[b, idx] = pre[b, idx]
    assert torch.allclose(dense_codes(sae, x), ref)
