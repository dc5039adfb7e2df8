"""Research rules: abstopk, mutual_choice, feature_choice, topafa, vtopk, gtopk; aux-zipf."""

import math

import pytest
import torch

from saekit import SAE, SAEConfig
from saekit.losses import aux_registry
from saekit.rules.aux_zipf import aux_zipf_candidates, zipf_target_rate
from saekit.rules.feature_choice import zipf_capacities, zipf_profile
from saekit.rules.topafa import afa_k

RESEARCH = ["abstopk", "mutual_choice", "feature_choice", "topafa", "vtopk", "gtopk"]


def make(rule: str, d_in: int = 12, d_sae: int = 48, k: int = 3, **kw) -> SAE:
    return SAE(SAEConfig(d_in=d_in, d_sae=d_sae, rule=rule, k=k, **kw))


def dense_codes(sae: SAE, x: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return sae(x, **kw).codes.to_dense()


# ---------------------------------------------------------------- every rule trains
@pytest.mark.parametrize("rule", RESEARCH)
def test_training_step_finite_and_moves(rule: str) -> None:
    opts = {"sample": True, "learn_variance": True} if rule == "vtopk" else {}
    sae = make(rule, rule_options=opts, aux_k=8, dead_tokens=1)
    sae.train()
    x = torch.randn(64, 12)
    g = torch.randn(64, 12) if rule == "gtopk" else None
    sae.init_from_data(x)
    sae.tokens_since_fired.fill_(10)  # everything dead: the aux loss is active too
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    total, terms, out = sae.loss(x, grad=g, step=3)
    assert torch.isfinite(total) and "recon" in terms and float(terms["aux"].detach()) > 0
    total.backward()
    for n, p in sae.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), n
    assert sae.W_dec.grad is not None and sae.W_dec.grad.abs().sum() > 0
    opt.step()
    sae.observe(out.codes, x.shape[0])
    assert not torch.equal(before["W_enc"], sae.W_enc)
    assert (out.codes.l0() > 0).any()


# ---------------------------------------------------------------- AbsTopK
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


# ---------------------------------------------------------------- Mutual Choice
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


# ---------------------------------------------------------------- Feature Choice
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
    sae.fire_freq.copy_(freq)
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
    assert torch.allclose(sae.rule.threshold, low)  # first batch: the smallest selected value
    sae.eval()
    pre = sae.encode_pre(x).detach()
    assert torch.equal(dense_codes(sae, x) != 0, pre > sae.rule.threshold)
    assert torch.allclose(sae.rule.export_threshold(), sae.rule.threshold)
    assert "threshold" in sae.folded_weights()


def test_shared_option_key_and_bad_options() -> None:
    make("feature_choice", rule_options={"alpha": 1.2, "aux_zipf": {"tau": 0.5}})
    with pytest.raises(ValueError, match="known options"):
        make("feature_choice", rule_options={"gamma": 1.0})
    with pytest.raises(ValueError, match="beta"):
        make("feature_choice", rule_options={"beta": -2.0})


# ---------------------------------------------------------------- aux-zipf
def test_aux_zipf_candidates() -> None:
    assert aux_registry["zipf"] is aux_zipf_candidates
    sae = make("topk", d_in=6, d_sae=8, k=2, aux="zipf", dead_tokens=100)
    f = torch.tensor([0.9, 0.5, 0.3, 0.1, 0.05, 0.04, 0.03, 0.0])
    sae.fire_freq.copy_(f)
    sae.tokens_seen.fill_(1000)
    sae.tokens_since_fired.zero_()
    sae.tokens_since_fired[1] = 500  # dead though its (stale) rate is high
    target = 2 * (1 / torch.arange(1, 9.0)) / sum(1 / r for r in range(1, 9))
    assert torch.allclose(zipf_target_rate(f, 2), target.clamp(max=1))
    assert abs(float(target.sum()) - 2) < 1e-6
    cand, w = sae.aux_candidates()
    assert cand.tolist() == [False, True, False, True, True, True, True, True]
    assert w is not None
    assert w[1] == 1.0 and (w[3:] > 0).all() and (w[3:] <= 1).all()
    assert torch.allclose(w[3:], (target[3:] - f[3:]) / target[3:])
    # plain aux-k would only use the dead latent
    sae.cfg.aux = "auxk"
    assert sae.aux_candidates()[0].tolist() == [False, True] + [False] * 6
    sae.cfg.aux = "zipf"
    sae.cfg.rule_options = {"aux_zipf": {"tau": 0.3, "deficit_weights": False}}
    cand, w = sae.aux_candidates()
    assert w is None
    assert cand.tolist() == [False, True, False, False, False, False, True, True]
    sae.cfg.rule_options = {"aux_zipf": {"nope": 1}}
    with pytest.raises(ValueError, match="known options"):
        sae.aux_candidates()


def test_aux_zipf_loss_trains_underused() -> None:
    sae = make("topk", k=2, aux="zipf", aux_k=4)
    sae.train()
    x = torch.randn(32, 12)
    _, terms, out = sae.loss(x)
    assert float(terms["aux"].detach()) == 0.0  # nothing observed yet: no candidate
    sae.observe(out.codes, 32)
    fired = out.codes.fired()
    sae.zero_grad()
    total, terms, _ = sae.loss(x)
    assert float(terms["aux"].detach()) > 0
    total.backward()
    assert torch.isfinite(sae.W_enc.grad).all()
    # never-fired latents are under-used candidates and receive encoder gradient from aux
    assert sae.W_enc.grad[:, ~fired].abs().sum() > 0


# ---------------------------------------------------------------- top-AFA
def test_topafa_hand_example() -> None:
    q, _ = torch.linalg.qr(torch.randn(6, 6))
    sae = make("topafa", d_in=6, d_sae=6, k=1, init_b_dec="zeros")
    with torch.no_grad():
        sae.W_dec.copy_(q)  # orthonormal atoms (rows)
        sae.W_enc.copy_(q.t())
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    coeffs = torch.tensor(
        [
            [3.0, 0, 0, 0, 0, 0],  # one atom carries the whole norm: k* = 1
            [1.0, 1, 1, 1, 0, 0],  # ||x|| = 2 = sqrt(4 * 1): k* = 4
            [2.0, 1, -2, 0, 0, 0],  # ||x|| = 3; c = (2, 2.24, 2.24, ...): k* = 2
        ]
    )
    x = coeffs @ q
    out = sae(x)
    assert out.extras["k_per_token"].tolist() == [1, 4, 2]
    assert out.codes.l0().tolist() == [1, 4, 2]
    assert torch.allclose(out.codes.to_dense()[:2], coeffs[:2], atol=1e-5)


def test_topafa_naive_reference_and_loss() -> None:
    sae = make("topafa", d_sae=24)
    x = torch.randn(16, 12) * 2
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(24, 1) + 0.5)  # decoder norms matter in s_i
    out = sae(x)
    pre = out.pre.detach()
    a = torch.relu(pre)
    dn = sae.W_dec.detach().norm(dim=1)
    xc = out.x_in.detach().norm(dim=1)
    ks = []
    for b in range(16):
        s = sorted(((float(a[b, i] * dn[i]) ** 2) for i in range(24)), reverse=True)
        c, best, kb = 0.0, math.inf, 0
        for j, v in enumerate(s):
            c += v
            cj = 1e4 if j == len(s) - 1 else math.sqrt(c)
            if abs(cj - float(xc[b])) < best:
                best, kb = abs(cj - float(xc[b])), j + 1
        ks.append(kb)
    assert out.extras["k_per_token"].tolist() == ks
    assert len(set(ks)) > 1
    k, _ = afa_k(a, dn, xc, k_max=3)
    assert int(k.max()) <= 3
    _, terms, out = sae.loss(x)
    f = out.codes.to_dense() * sae.W_dec.norm(dim=1)
    xs = out.x
    var = (xs - xs.mean(0)).pow(2).mean()
    expect = (1 / 32) * (f.norm(dim=1) - xs.norm(dim=1)).pow(2).mean() / var
    assert torch.allclose(terms["afa"], expect, rtol=1e-5)


# ---------------------------------------------------------------- vSAE
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


# ---------------------------------------------------------------- g-SAE
def test_gtopk_beta_zero_is_topk_and_huge_beta_ranks_by_effect() -> None:
    x, g = torch.randn(30, 12), torch.randn(30, 12)
    sae0 = make("gtopk", k=4, rule_options={"beta": 0.0})
    ref = make("topk", k=4)
    ref.load_state_dict(sae0.state_dict())
    sae0.train()
    assert torch.equal(dense_codes(sae0, x, grad=g), dense_codes(ref, x))
    big = make("gtopk", k=4, rule_options={"beta": 1e6})
    big.load_state_dict(sae0.state_dict())
    with torch.no_grad():
        big.b_enc.fill_(3.0)  # every z > 0
    big.train()
    z = torch.relu(big.encode_pre(x)).detach()
    gn = g / g.norm(dim=1, keepdim=True)
    effect = z * (gn @ big.W_dec.detach().t()).abs()
    codes = dense_codes(big, x, grad=g)
    want = effect.topk(4, dim=1).indices
    assert torch.equal(codes.gather(1, want), z.gather(1, want))
    assert (codes != 0).sum(1).eq(4).all()
    # scale-free with normalize_grad; and different from plain TopK here
    assert torch.equal(dense_codes(big, x, grad=100 * g), codes)
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


@pytest.mark.parametrize("rule", RESEARCH)
def test_save_load_roundtrip(rule: str, tmp_path) -> None:
    from saekit.io import load_sae, save_sae

    opts = {"learn_variance": True} if rule == "vtopk" else {}
    sae = make(rule, rule_options=opts, normalize_input=True)
    x, g = torch.randn(64, 12) * 3, torch.randn(64, 12)
    sae.init_from_data(x)
    sae.train()
    _, _, out = sae.loss(x, grad=g)
    sae.observe(out.codes, 64)
    save_sae(sae, tmp_path / rule)
    back = load_sae(tmp_path / rule)
    assert back.cfg.rule == rule
    sae.eval()
    back.eval()
    assert torch.equal(dense_codes(sae, x, grad=g), dense_codes(back, x, grad=g))


@pytest.mark.parametrize("m_hint", [1, 3, 17, 0])
def test_topafa_prefix_search_equals_full_sort(m_hint):
    """afa_k's sorted-prefix search gives the full sort's k* for any starting prefix."""
    from saekit.rules.topafa import afa_k

    g = torch.Generator().manual_seed(3)
    a = torch.relu(torch.randn(64, 50, generator=g))
    dec_norm = torch.rand(50, generator=g) + 0.5
    target = torch.rand(64, generator=g) * 6  # some tokens need many latents, some few
    k_full, order_full = afa_k(a, dec_norm, target, 0, 0)
    k, order = afa_k(a, dec_norm, target, 0, m_hint)
    assert torch.equal(k, k_full)
    assert k.float().std() > 0
    km = int(k.max())
    s = (a * dec_norm).pow(2)
    # the selected sets agree (orders may differ only among equal scores)
    assert torch.equal(s.gather(1, order[:, :km]), s.gather(1, order_full[:, :km]))
