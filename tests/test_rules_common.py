"""Every research rule: one training step, save/load round trip."""

import pytest
import torch

from rule_helpers import dense_codes, make

RESEARCH = ["abstopk", "mutual_choice", "feature_choice", "topafa", "vtopk", "gtopk"]


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
    total, terms, out = sae.loss(x, inputs=None if g is None else {"grad": g}, step=3)
    assert torch.isfinite(total) and "recon" in terms and float(terms["aux"].detach()) > 0
    total.backward()
    for n, p in sae.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), n
    assert sae.W_dec.grad is not None and sae.W_dec.grad.abs().sum() > 0
    opt.step()
    sae.observe(out.codes, x.shape[0])
    assert not torch.equal(before["W_enc"], sae.W_enc)
    assert (out.codes.l0() > 0).any()


@pytest.mark.parametrize("rule", RESEARCH)
def test_save_load_roundtrip(rule: str, tmp_path) -> None:
    from saekit.io import load_sae, save_sae

    opts = {"learn_variance": True} if rule == "vtopk" else {}
    sae = make(rule, rule_options=opts, normalize_input=True)
    x, g = torch.randn(64, 12) * 3, torch.randn(64, 12)
    sae.init_from_data(x)
    sae.train()
    _, _, out = sae.loss(x, inputs={"grad": g})
    sae.observe(out.codes, 64)
    save_sae(sae, tmp_path / rule)
    back = load_sae(tmp_path / rule)
    assert back.cfg.rule == rule
    sae.eval()
    back.eval()
    assert torch.equal(
        dense_codes(sae, x, inputs={"grad": g}), dense_codes(back, x, inputs={"grad": g})
    )
