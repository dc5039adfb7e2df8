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


def _old_selection(pre: torch.Tensor, k: int) -> torch.Tensor:
    """The selection on main at 9e49562: top-k of a full ``|pre|`` copy."""
    return pre.abs().topk(min(k, pre.shape[1]), dim=1, sorted=False).indices


def _check_exact(pre: torch.Tensor, k: int, got: torch.Tensor) -> None:
    ref = _old_selection(pre, k)
    assert got.shape == ref.shape
    assert (got.sort(1).values.diff(dim=1) > 0).all()  # no column picked twice
    a = pre.abs()
    # the same |values| as the old selection, and nothing left out beats what was kept
    assert torch.equal(a.gather(1, got).sort(1).values, a.gather(1, ref).sort(1).values)
    left = a.scatter(1, got, float("-inf"))
    assert (left.max(1).values <= a.gather(1, got).min(1).values).all()


def test_abs_row_topk_is_the_old_selection_without_a_dense_copy() -> None:
    """Issue 12: |pre| is no longer formed; the selection is the old one (ties included)."""
    from saekit import kernels

    torch.manual_seed(0)
    for F in (7, 40, 257):
        pre = torch.randn(33, F)
        for k in (1, 3, F // 2, F // 2 + 1, F - 1, F, F + 5):
            got = kernels.abs_row_topk(pre, k)[1]
            assert torch.equal(got.sort(1).values, _old_selection(pre, k).sort(1).values)
            # many ties, +-u pairs, zeros, rows of one value: same |values|, valid picks
            tied = torch.randint(-3, 4, (33, F)).float() / 2
            tied[0] = 0.5
            tied[1, : F // 2] = -tied[1, F // 2 : 2 * (F // 2)]
            _check_exact(tied, k, kernels.abs_row_topk(tied, k)[1])
    v, i = kernels.abs_row_topk(pre, 5)
    assert torch.equal(v, pre.abs().gather(1, i))


def test_abstopk_codes_equal_the_old_rule_and_no_abs_copy_is_made() -> None:
    from saekit.rules.base import Context
    from test_memory_paths import NewBigTensors

    sae = make("abstopk", k=5, d_sae=96)
    x = torch.randn(40, 12)
    pre = sae.encode_pre(x).detach()
    ref = torch.zeros_like(pre)
    idx = _old_selection(pre, 5)
    ref.scatter_(1, idx, pre.gather(1, idx))
    ctx = Context(sae=sae, training=True, x=x, x_in=x)
    with NewBigTensors(pre.numel()) as mode:
        sel = sae.rule.select(pre, ctx)
    assert mode.ops == []
    got = torch.zeros_like(pre).scatter_(1, sel.indices, pre.gather(1, sel.indices))
    assert torch.equal(got, ref)
    assert torch.equal(dense_codes(sae, x), ref)
