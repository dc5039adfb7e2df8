"""Seam 3: aux losses have their own registry (saekit.losses) and options
(SAEConfig.aux_options); a new one is one class, with no special case in the SAE."""

from __future__ import annotations

import pytest
import torch

from peer_helpers import ROOT, needs_peers, run_peers
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
    top-AFA's code use aux_penalty * MSE of the live residual on the MSE reconstruction
    (top-AFA's default; BatchTopK's with ``form="bussmann"``: its default is Gao et al.'s,
    measured better, see the rule's docstring)."""
    assert make("topk").aux_loss.form == "openai"
    assert make("mutual_choice").aux_loss.form == make("batchtopk").aux_loss.form == "openai"
    assert make("topafa").aux_loss.form == "bussmann"
    for rule, kw in (("batchtopk", {"aux_options": {"form": "bussmann"}}), ("topafa", {})):
        sae, x, terms, out = _aux_parts(rule, **kw)
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
    assert make("batchtopk", aux_options={"form": "bussmann"}).aux_loss.form == "bussmann"
    assert make("topk", aux_options={"form": "bussmann"}).aux_loss.form == "bussmann"


SAELENS_AUX = """
import json, sys, torch
from rule_helpers import make
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
torch.manual_seed(0)
sae = make("topk", d_sae=48, k=3, aux_k=6, aux_coeff=1.0, recon_loss="mse",
           aux_options={"form": "saelens"})
sae.train()
x = torch.randn(64, 12) * 2
sae.init_from_data(x)
dead = torch.zeros(48, dtype=torch.bool)
dead[[3, 10, 17, 40]] = True  # 4 dead < k_aux = 6: SAELens scales the term by 4/6
sae.tokens_since_fired.copy_(dead.long() * sae.dead_window)
_, terms, _ = sae.loss(x)
sl = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=12, d_sae=48, k=3, dtype="float32",
                                           rescale_acts_by_decoder_norm=False))
with torch.no_grad():
    for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
        getattr(sl, n).copy_(getattr(sae, n))
acts, pre = sl.encode_with_hidden_pre(x)
want = sl.calculate_topk_aux_loss(x, sl.decode(acts), pre, dead)  # its trainer passes raw x
print(json.dumps({"saekit": float(terms["aux"]), "saelens": float(want)}))
"""


@pytest.mark.slow
@needs_peers
def test_saelens_aux_form_is_saelens_term(tmp_path) -> None:
    """Fidelity 11: ``aux_options.form="saelens"`` (with recon_loss mse, aux_k = d_in/2,
    aux_coeff 1) is SAELens's TopK aux term exactly, including its min(n_dead/k_aux, 1)."""
    import json
    import os

    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
    got = json.loads(run_peers(SAELENS_AUX, env=env).strip().splitlines()[-1])
    assert got["saelens"] > 0
    assert got["saekit"] == pytest.approx(got["saelens"], rel=1e-5)


def test_saelens_aux_form_scales_by_the_dead_share() -> None:
    """The saelens form: detached residual, per-token squared error, values not ReLU'd,
    x min(n_dead/aux_k, 1)."""
    sae, x, terms, out = _aux_parts("topk", aux_options={"form": "saelens"}, recon_loss="mse")
    e = out.x - out.x_hat_n.detach()
    cand = torch.ones(sae.d_sae, dtype=torch.bool)
    args = (out.x_in, sae.W_enc, sae.b_enc, sae.W_dec, out.pre, e, cand, 8)
    torch.testing.assert_close(
        terms["aux"], sae.cfg.aux_coeff * aux_k_loss(*args, scale_like=("mse", out.x))
    )
    cand[4:] = False  # 4 candidates of aux_k = 8: half the term
    half = aux_k_loss(*args[:6], cand, 8, scale_like=("mse", out.x), few_candidates_scale=True)
    full = aux_k_loss(*args[:6], cand, 8, scale_like=("mse", out.x))
    torch.testing.assert_close(half, full / 2)
    (g,) = torch.autograd.grad(terms["aux"], out.x_hat_n, allow_unused=True)
    assert g is None
