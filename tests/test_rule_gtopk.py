"""g-SAE (gtopk)."""

import pytest
import torch

from rule_helpers import dense_codes, make


def test_gtopk_beta_zero_is_topk_and_huge_beta_ranks_by_effect() -> None:
    x, g = torch.randn(30, 12), torch.randn(30, 12)
    sae0 = make("gtopk", k=4, rule_options={"beta": 0.0})
    ref = make("topk", k=4)
    ref.load_state_dict(sae0.state_dict())
    sae0.train()
    assert torch.equal(dense_codes(sae0, x, inputs={"grad": g}), dense_codes(ref, x))
    big = make("gtopk", k=4, rule_options={"beta": 1e6})
    big.load_state_dict(sae0.state_dict())
    with torch.no_grad():
        big.b_enc.fill_(3.0)  # every z > 0
    big.train()
    z = torch.relu(big.encode_pre(x)).detach()
    gn = g / g.norm(dim=1, keepdim=True)
    effect = z * (gn @ big.W_dec.detach().t()).abs()
    codes = dense_codes(big, x, inputs={"grad": g})
    want = effect.topk(4, dim=1).indices
    assert torch.equal(codes.gather(1, want), z.gather(1, want))
    assert (codes != 0).sum(1).eq(4).all()
    # scale-free with normalize_grad; and different from plain TopK here
    assert torch.equal(dense_codes(big, x, inputs={"grad": 100 * g}), codes)
    assert not torch.equal(codes != 0, dense_codes(ref, x) != 0)


def test_gtopk_without_grad() -> None:
    sae = make("gtopk", k=4)
    ref = make("topk", k=4)
    ref.load_state_dict(sae.state_dict())
    x = torch.randn(10, 12)
    sae.eval()
    assert torch.equal(dense_codes(sae, x), dense_codes(ref, x))
    sae.train()
    with pytest.warns(UserWarning, match="without dLoss/dx"):
        assert torch.equal(dense_codes(sae, x), dense_codes(ref, x))
    strict = make("gtopk", k=4, rule_options={"require_grad": True})
    strict.train()
    with pytest.raises(ValueError, match="needs dLoss/dx"):
        strict(x)
