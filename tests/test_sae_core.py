import pytest
import torch

from saekit import SAE, SAEConfig
from saekit.rules import rule_names


def make(rule="topk", **kw):
    cfg = SAEConfig(d_in=12, d_sae=48, rule=rule, k=kw.pop("k", 3), **kw)
    return SAE(cfg)


def test_topk_exactly_k_per_token():
    sae = make("topk", k=5)
    x = torch.randn(40, 12)
    codes = sae.encode(x)
    assert (codes.l0() == 5).all()
    # they are the 5 largest pre-activations (all positive here after a bias shift)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)
        pre = sae.encode_pre(x)
        dense = sae.encode(x).to_dense()
    top = pre.topk(5, dim=1).indices
    assert torch.equal(dense.gather(1, top), pre.gather(1, top))


def test_batchtopk_budget_in_training_and_threshold_at_inference():
    sae = make("batchtopk", k=4)
    sae.train()
    x = torch.randn(64, 12)
    with torch.no_grad():
        sae.b_enc.fill_(5.0)  # all positive: budget is exactly met
    out = sae(x)
    assert int(out.codes.l0().sum()) == 4 * 64
    assert out.codes.l0().float().std() > 0  # tokens differ in how many they take
    assert float(sae.rule.threshold) > 0
    sae.eval()
    th = float(sae.rule.threshold)
    with torch.no_grad():
        pre = sae.encode_pre(x)
        dense = sae.encode(x).to_dense()
    assert torch.equal(dense != 0, pre > th)
    # inference is per token: a token's code does not depend on the rest of the batch
    assert torch.allclose(sae.encode(x[:1]).to_dense(), dense[:1])


def test_relu_dense_and_l1():
    sae = make("relu", rule_options={"l1_coeff": 2.0, "weight_by_decoder_norm": False})
    x = torch.randn(10, 12)
    _, terms, out = sae.loss(x)
    f = torch.relu(sae.encode_pre(x))
    assert torch.allclose(out.codes.to_dense(), f)
    assert torch.allclose(terms["l1"], 2.0 * f.sum(-1).mean())


def test_jumprelu_threshold_and_ste_gradient():
    sae = make("jumprelu", rule_options={"init_threshold": 0.5, "bandwidth": 0.2})
    x = torch.randn(30, 12)
    pre = sae.encode_pre(x).detach()
    dense = sae.encode(x).to_dense().detach()
    assert torch.equal(dense != 0, pre > 0.5)
    # theta gradient of the L0 term: -(1/eps) * #{tokens with |z - theta| < eps/2}
    sae.zero_grad()
    _, terms, _ = sae.loss(x)
    terms["l0"].backward()
    theta = sae.rule.threshold.detach()
    near = ((pre - theta).abs() < 0.1).float().sum(0)
    coeff = sae.rule.opts.l0_coeff
    expected_dtheta = coeff * (-(1 / 0.2)) * near / x.shape[0]
    # d/dlog_theta = d/dtheta * theta
    assert torch.allclose(sae.rule.log_threshold.grad, expected_dtheta * theta, atol=1e-6)


def test_unknown_rule_and_bad_width():
    with pytest.raises(ValueError, match="SAEConfig.rule = 'nope' is not one of"):
        make("nope")
    sae = make()
    with pytest.raises(ValueError, match="expects d_in=12"):
        sae.encode(torch.randn(3, 13))


def test_decoder_parallel_gradient_removed():
    sae = make()
    x = torch.randn(20, 12)
    total, _, _ = sae.loss(x)
    total.backward()
    g_before = sae.W_dec.grad.clone()
    sae.remove_parallel_grad()
    d = sae.W_dec.detach()
    d = d / d.norm(dim=1, keepdim=True)
    g = sae.W_dec.grad
    assert torch.allclose((g * d).sum(1), torch.zeros(48), atol=1e-6)
    # and only the parallel part changed: g = g_before - (g_before . d) d
    assert torch.allclose(g, g_before - (g_before * d).sum(1, keepdim=True) * d, atol=1e-6)
    # after an SGD step and renormalisation the rows are unit-norm
    with torch.no_grad():
        sae.W_dec -= 0.1 * g
    sae.normalize_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(48), atol=1e-6)


def test_normalisation_folds_into_weights():
    sae = make("topk", normalize_input=True)
    x = torch.randn(50, 12) * 7
    sae.init_from_data(x)
    assert abs(float((x * sae.input_scale).pow(2).sum(-1).mean()) - 12) < 1e-3
    w = sae.folded_weights()
    raw = make("topk")
    with torch.no_grad():
        for k in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(raw, k).copy_(w[k])
    assert torch.allclose(raw(x).x_hat, sae(x).x_hat, atol=1e-4)


@pytest.mark.parametrize("rule", rule_names())
def test_every_rule_trains_a_step(rule):
    sae = make(rule, dead_tokens=1)
    x = torch.randn(16, 12)
    sae.init_from_data(x)
    sae.train()
    total, terms, out = sae.loss(x)
    assert torch.isfinite(total)
    total.backward()
    assert sae.W_enc.grad is not None and torch.isfinite(sae.W_enc.grad).all()
