"""Mutual Choice."""

import torch

from rule_helpers import dense_codes, make


def test_mutual_choice_batch_budget_and_reference() -> None:
    sae = make("mutual_choice", k=4)
    sae.train()
    x = torch.randn(64, 12)
    out = sae(x)
    pre = out.pre.detach()
    n_pos = int((pre > 0).sum())
    assert n_pos > 4 * 64
    assert int(out.codes.l0().sum()) == 4 * 64  # exactly k*B in the batch
    assert out.codes.l0().float().std() > 0
    flat = torch.relu(pre).flatten()
    ref = torch.zeros_like(flat)
    top = flat.topk(4 * 64).indices
    ref[top] = flat[top]
    assert torch.allclose(out.codes.to_dense().detach(), ref.view_as(pre))


def test_mutual_choice_inference() -> None:
    sae = make("mutual_choice", k=4)
    x = torch.randn(32, 12)
    sae.eval()
    pre = sae.encode_pre(x).detach()
    assert torch.equal(dense_codes(sae, x) != 0, pre > 0)  # untrained: threshold 0, as batchtopk
    sae.train()
    sae(x)
    sae.eval()
    th = float(sae.rule.threshold)
    assert th > 0
    pre = sae.encode_pre(x).detach()
    assert torch.equal(dense_codes(sae, x) != 0, pre > th)
    assert torch.allclose(dense_codes(sae, x[:3]), dense_codes(sae, x)[:3])


def test_mutual_choice_trains_exactly_like_batchtopk() -> None:
    torch.manual_seed(1)
    mc = make("mutual_choice", k=4)
    torch.manual_seed(1)
    bt = make("batchtopk", k=4)
    x = torch.randn(64, 12)
    for sae in (mc, bt):
        sae.init_from_data(x)
        sae.train()
        opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
        for step in range(3):
            loss, _, out = sae.loss(x, step=step)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sae.observe(out.codes, 64)
    assert torch.equal(mc.W_enc, bt.W_enc) and torch.equal(mc.rule.threshold, bt.rule.threshold)
