"""Seam 3: aux losses have their own registry (saekit.losses) and options
(SAEConfig.aux_options); a new one is one class, with no special case in the SAE."""

from __future__ import annotations

import pytest
import torch

from rule_helpers import make
from saekit import SAE, SAEConfig
from saekit.errors import ConfigError
from saekit.losses import aux_k_loss, aux_names, build_aux


def test_registry_and_options(plugin) -> None:
    from saekit.plugins import load_plugins

    assert {"auxk", "zipf"} <= set(aux_names())
    load_plugins([plugin])
    assert "plugin_every" in aux_names()
    sae = make("topk", d_sae=10, aux="plugin_every", aux_options={"share": 0.3})
    cand, w = sae.aux_candidates()
    assert cand.tolist() == [True] * 3 + [False] * 7 and w is None
    sae.train()
    x = torch.randn(32, 12)
    total, terms, out = sae.loss(x)
    # the term equals aux_coeff * aux-k over the plugin's candidates (openai form)
    want = sae.cfg.aux_coeff * aux_k_loss(
        out.x_in, sae.W_enc, sae.b_enc, sae.W_dec, out.pre, out.x - out.x_hat_n, cand, sae.cfg.aux_k
    )
    torch.testing.assert_close(terms["aux"], want)
    with pytest.raises(ConfigError, match="known options"):
        make("topk", aux="plugin_every", aux_options={"shares": 0.3})


def test_aux_zipf_options_live_in_aux_options_not_rule_options() -> None:
    sae = make("topk", aux="zipf", aux_options={"tau": 0.5, "alpha": 1.2})
    assert sae.aux_loss.opts.tau == 0.5 and sae.aux_loss.opts.alpha == 1.2
    with pytest.raises(ConfigError, match="known options"):
        make("topk", aux="zipf", rule_options={"aux_zipf": {"tau": 0.5}})


def test_off_and_unknown() -> None:
    assert make("topk", aux="none").aux_loss is None
    assert make("topk", aux_coeff=0.0).aux_loss is None
    assert make("relu").aux_loss is None  # the rule has no aux loss
    sae = make("topk", aux="none")
    assert "aux" not in sae.loss(torch.randn(8, 12))[1]
    with pytest.raises(ConfigError, match="'nope' is not one of .*'auxk'"):
        SAE(SAEConfig(d_in=4, d_sae=8, aux="nope"))  # at construction, not at the first loss


def test_build_aux_names_the_form() -> None:
    with pytest.raises(ConfigError, match="form"):
        make("topk", aux_options={"form": "mystery"})
    rule = make("topk").rule
    assert build_aux(SAEConfig(d_in=12, d_sae=48), rule).form == rule.aux_form


def _aux_parts(rule: str, **kw):
    sae = make(rule, d_sae=48, k=3, aux_k=8, **kw)
    sae.train()
    x = torch.randn(64, 12) * 2
    sae.init_from_data(x)
    sae.tokens_since_fired.fill_(sae.dead_window)  # every latent dead: aux-k over all
    total, terms, out = sae.loss(x)
    return sae, x, terms, out


def test_aux_form_follows_each_rules_paper_code() -> None:
    """Fidelity 5: TopK (Gao et al.) uses NMSE of the detached residual; BatchTopK's and
    top-AFA's code use aux_penalty * MSE of the live residual on the MSE reconstruction."""
    assert make("topk").aux_loss.form == "openai"
    assert make("mutual_choice").aux_loss.form == "openai"
    assert make("batchtopk").aux_loss.form == make("topafa").aux_loss.form == "bussmann"
    for rule in ("batchtopk", "topafa"):
        sae, x, terms, out = _aux_parts(rule)
        cand = torch.ones(sae.d_sae, dtype=torch.bool)
        args = (out.x_in, sae.W_enc, sae.b_enc, sae.W_dec, out.pre, out.x - out.x_hat_n, cand, 8)
        e_aux_sq = aux_k_loss(*args, scale_like=("mse", out.x)) * x.shape[0]  # sum of sq. err
        var = (out.x - out.x.mean(0)).pow(2).sum()
        # the ratio aux / recon is the paper code's: aux_penalty * sum(e_aux - e)^2 / sum(e^2)
        torch.testing.assert_close(terms["aux"], sae.cfg.aux_coeff * e_aux_sq / var)
        ratio = terms["aux"] / terms["recon"]
        sq_e = (out.x - out.x_hat_n).pow(2).sum()
        torch.testing.assert_close(ratio, sae.cfg.aux_coeff * e_aux_sq / sq_e)
        # the residual is live: the aux term sends gradient into the main reconstruction
        (g,) = torch.autograd.grad(terms["aux"], out.x_hat_n, allow_unused=True)
        assert g is not None and g.abs().sum() > 0
    # Gao et al.'s form: NMSE of the residual, detached (no b_dec gradient from aux)
    sae, x, terms, out = _aux_parts("topk")
    e = out.x - out.x_hat_n.detach()
    cand = torch.ones(sae.d_sae, dtype=torch.bool)
    want = aux_k_loss(out.x_in, sae.W_enc, sae.b_enc, sae.W_dec, out.pre, e, cand, 8)
    torch.testing.assert_close(terms["aux"], sae.cfg.aux_coeff * want)
    (g,) = torch.autograd.grad(terms["aux"], out.x_hat_n, allow_unused=True)
    assert g is None
    # the choice is an aux option for any rule
    assert make("batchtopk", aux_options={"form": "openai"}).aux_loss.form == "openai"
    assert make("topk", aux_options={"form": "bussmann"}).aux_loss.form == "bussmann"
