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
