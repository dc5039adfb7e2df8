"""The aux-zipf loss (saekit.losses.zipf)."""

import pytest
import torch

from rule_helpers import make
from saekit.losses import get_aux_class
from saekit.losses.zipf import AuxZipf, zipf_fit_rate, zipf_target_rate


def _sae(**kw):
    sae = make("topk", d_in=6, d_sae=8, k=2, dead_tokens=100, **kw)
    f = torch.tensor([0.9, 0.5, 0.3, 0.1, 0.05, 0.04, 0.03, 0.0])
    sae.fire_freq.copy_(f)
    sae.tokens_seen.fill_(1000)
    sae.tokens_since_fired.zero_()
    sae.tokens_since_fired[1] = 500  # dead though its (stale) rate is high
    return sae, f


FIXED = {"profile": "fixed", "tail_only": False}  # the earlier reading: k * p_rank, no tail cut


def test_aux_zipf_candidates_fixed_profile() -> None:
    assert get_aux_class("zipf") is AuxZipf
    sae, f = _sae(aux="zipf", aux_options=FIXED)
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
    sae = _sae(aux="zipf", aux_options={**FIXED, "tau": 0.3, "deficit_weights": False})[0]
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


def _measured_profile(F: int = 256, k: int = 6) -> torch.Tensor:
    """Firing rates shaped like a trained TopK SAE's (k=6, 256 latents, bench data): a head
    flatter than Zipf (top rate 0.3), a power-law middle and a fast-falling tail; shuffled."""
    r = torch.arange(1, F + 1, dtype=torch.float64)
    f = 0.3 * r.pow(-0.75) * torch.exp(-((r / (0.55 * F)) ** 3))
    f = f / f.sum() * k
    return f[torch.randperm(F, generator=torch.Generator().manual_seed(0))].float()


def test_under_used_candidates_are_infrequent_at_tau_1() -> None:
    """Fidelity 9: at tau=1 the fixed Zipf(1) target put the most frequent latents among the
    'under-used' ones (its head is steeper than any real profile); the default target now
    comes from a Zipf fit and under-used latents fire below the mean rate."""
    F, k = 256, 6
    f = _measured_profile(F, k)
    mean = k / F

    def cands(opts):
        sae = make("topk", d_in=16, d_sae=F, k=k, aux="zipf", aux_options=opts, dead_tokens=10**9)
        sae.fire_freq.copy_(f)
        sae.tokens_seen.fill_(10**6)
        return sae.aux_candidates()

    top = f.argsort(descending=True)[:10]
    old, _ = cands(FIXED)
    assert old[top].sum() >= 3  # the defect: frequent latents are candidates
    new, w = cands({})
    assert not new[top].any() and (f[new] < mean).all()
    assert float(f[new].median()) < mean / 2
    assert int(new.sum()) >= F // 4  # the low-frequency tail is there
    # reference: under = f < fit, with the least-squares Zipf fit over the top half of ranks
    order = f.argsort(descending=True)
    rank = torch.empty(F, dtype=torch.float64)
    rank[order] = torch.arange(1, F + 1, dtype=torch.float64)
    head = rank <= F // 2
    A = torch.stack([torch.ones(int(head.sum()), dtype=torch.float64), -rank[head].log()], 1)
    c, a = torch.linalg.lstsq(A, f.double()[head].log()[:, None]).solution[:, 0]
    fit = torch.exp(c - a * rank.log()).float()
    torch.testing.assert_close(zipf_fit_rate(f), fit)
    assert torch.equal(new, (f < fit) & (f < mean))
    torch.testing.assert_close(w[new], ((fit - f) / fit)[new])
