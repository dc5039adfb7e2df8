"""The aux-zipf loss (saekit.losses.zipf)."""

import pytest
import torch

from rule_helpers import make
from saekit.losses import get_aux_class
from saekit.losses.zipf import AuxZipf, zipf_target_rate


def _sae(**kw):
    sae = make("topk", d_in=6, d_sae=8, k=2, dead_tokens=100, **kw)
    f = torch.tensor([0.9, 0.5, 0.3, 0.1, 0.05, 0.04, 0.03, 0.0])
    sae.fire_freq.copy_(f)
    sae.tokens_seen.fill_(1000)
    sae.tokens_since_fired.zero_()
    sae.tokens_since_fired[1] = 500  # dead though its (stale) rate is high
    return sae, f


def test_aux_zipf_candidates() -> None:
    assert get_aux_class("zipf") is AuxZipf
    sae, f = _sae(aux="zipf")
    target = 2 * (1 / torch.arange(1, 9.0)) / sum(1 / r for r in range(1, 9))
    assert torch.allclose(zipf_target_rate(f, 2), target.clamp(max=1))
    assert abs(float(target.sum()) - 2) < 1e-6
    cand, w = sae.aux_candidates()
    assert cand.tolist() == [False, True, False, True, True, True, True, True]
    assert w is not None
    assert w[1] == 1.0 and (w[3:] > 0).all() and (w[3:] <= 1).all()
    assert torch.allclose(w[3:], (target[3:] - f[3:]) / target[3:])
    # plain aux-k would only use the dead latent
    assert _sae(aux="auxk")[0].aux_candidates()[0].tolist() == [False, True] + [False] * 6
    sae = _sae(aux="zipf", aux_options={"tau": 0.3, "deficit_weights": False})[0]
    cand, w = sae.aux_candidates()
    assert w is None
    assert cand.tolist() == [False, True, False, False, False, False, True, True]
    with pytest.raises(ValueError, match="known options"):
        _sae(aux="zipf", aux_options={"nope": 1})


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
