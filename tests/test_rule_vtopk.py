"""vSAE (vtopk)."""

import math

import torch

from rule_helpers import dense_codes, make


def test_vtopk_sampling_train_only() -> None:
    sae = make("vtopk", k=4, rule_options={"sample": True})
    x = torch.randn(20, 12)
    sae.train()
    a, b = dense_codes(sae, x), dense_codes(sae, x)
    assert not torch.equal(a, b)
    assert (a < 0).any()  # sampled codes can be negative
    sae.eval()
    c, d = dense_codes(sae, x), dense_codes(sae, x)
    assert torch.equal(c, d)
    pre = sae.encode_pre(x).detach()
    topk = torch.relu(pre).topk(4, dim=1)
    ref = torch.zeros_like(pre).scatter(1, topk.indices, topk.values)
    assert torch.allclose(c, ref)


def test_vtopk_kl_term_and_warmup() -> None:
    sae = make("vtopk", k=4, rule_options={"kl_coeff": 0.5, "kl_warmup_steps": 10})
    sae.train()
    x = torch.randn(20, 12)
    _, terms, out = sae.loss(x, step=9)
    mu = torch.relu(out.pre).clamp(max=10)
    assert torch.allclose(terms["kl"], 0.5 * 0.5 * mu.pow(2).sum(-1).mean())
    _, terms2, _ = sae.loss(x, step=4)
    assert torch.allclose(terms2["kl"], terms["kl"] * 0.5)
    assert not sae.rule.signed
    # the KL reaches latents outside the top-k: W_enc gets gradient on unselected columns
    sae.zero_grad()
    terms["kl"].backward()
    sel = out.codes.fired()
    assert sae.W_enc.grad[:, ~sel].abs().sum() > 0


def test_vtopk_learned_variance() -> None:
    sae = make("vtopk", k=4, rule_options={"sample": True, "learn_variance": True})
    x = torch.randn(20, 12)
    lv = sae.rule.log_var(x)
    assert torch.allclose(lv, torch.full_like(lv, -2.0))
    _, terms, out = sae.loss(x)
    mu = torch.relu(out.pre)
    expect = 0.5 * (mu.pow(2) + math.exp(-2) - 1 + 2).sum(-1).mean()
    assert torch.allclose(terms["kl"], expect, rtol=1e-5)
    assert "rule.W_var" in sae.state_dict()
