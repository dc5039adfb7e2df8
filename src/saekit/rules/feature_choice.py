"""Feature Choice (Ayonrinde 2024): each feature picks its own top tokens, Zipf capacities."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saekit.errors import ConfigError
from saekit.rules.base import Context, Rule, Selection, register
from saekit.rules.batchtopk import threshold_selection


@dataclass
class FeatureChoiceOptions:
    alpha: float = 1.0  # Zipf exponent: p_i ~ 1/(rank_i + beta)^alpha (paper value unknown)
    beta: float = 0.0  # Zipf rank offset (ranks start at 1; needs beta > -1)
    min_capacity: int = 1  # m_i >= this when k*B >= min_capacity*d_sae (no dead features)
    threshold_decay: float = 0.999  # EMA decay of the per-feature inference thresholds


def zipf_profile(n: int, alpha: float = 1.0, beta: float = 0.0) -> Tensor:
    """``p_r ~ 1/(r + beta)^alpha`` for ranks ``r = 1..n``, normalised to sum to 1 (float64)."""
    if beta <= -1:
        raise ConfigError(f"Zipf beta must be > -1 (ranks start at 1), got {beta}")
    if alpha < 0:
        raise ConfigError(f"Zipf alpha must be >= 0, got {alpha}")
    r = torch.arange(1, n + 1, dtype=torch.float64)
    p = (r + beta).pow(-alpha)
    return p / p.sum()


def zipf_ranks(freq: Tensor) -> Tensor:
    """Rank (0 = most frequent) of each feature by ``freq``; ties broken by index."""
    order = torch.sort(freq, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(freq.numel(), device=freq.device)
    return ranks


def zipf_capacities(p: Tensor, total: int, cap: int, floor: int = 1) -> Tensor:
    """Integer capacities ``m_r`` for a profile ``p`` sorted by rank (descending).

    Returns ``m`` (long) with ``sum(m) == total``, ``lo <= m_r <= cap`` and ``m`` non-increasing,
    where ``lo = floor`` if ``floor * len(p) <= total`` else 0. ``m`` is the floor of the
    water-filled target ``clamp(c * p, lo, cap)`` (``c`` found by bisection so the targets sum
    to ``total``); the remainder goes one unit each to the highest-ranked features below
    ``cap``, which keeps the ranking.
    """
    n = p.numel()
    if total > n * cap:
        raise ConfigError(f"budget {total} exceeds {n} features x {cap} tokens")
    lo = floor if floor * n <= total else 0
    p = p.to(torch.float64)
    a, b = 0.0, float(cap / p.min().clamp_min(1e-300))
    for _ in range(100):
        c = 0.5 * (a + b)
        if float((c * p).clamp(lo, cap).sum()) < total:
            a = c
        else:
            b = c
    m = (b * p).clamp(lo, cap).add(1e-9).floor().clamp(lo, cap).long()
    r = total - int(m.sum())
    if r > 0:
        ok = m < cap
        m += (ok & (ok.long().cumsum(0) <= r)).long()
    elif r < 0:
        ok = m > lo
        m -= (ok & (ok.long().flip(0).cumsum(0).flip(0) <= -r)).long()
    return m


@register
class FeatureChoice(Rule):
    """Feature i takes its top ``m_i`` tokens of ``Z' = ReLU(pre)`` in each training batch.

    Capacities [our reading of the paper, whose Zipf parameters are unknown]: features are
    ranked by their running firing frequency (``sae.fire_freq``), ``p_i ~ 1/(rank_i +
    beta)^alpha`` and ``m_i ~ k*B*p_i`` rounded so that ``sum m_i = k*B`` exactly, ``m_i <=
    B`` and ``m_i >= min_capacity`` whenever ``k*B >= min_capacity * d_sae`` (then every
    feature with a positive pre-activation somewhere in the batch fires: no dead features).
    See :func:`zipf_capacities`. Selection: :func:`saekit.kernels.capacity_selection`
    (capacities bucketed by powers of two, no ``[B, F]`` mask); only positive entries count.

    Inference [our choice; the paper gives none, a flagged deviation]: JumpReLU with
    per-feature thresholds ``theta_i``, the EMA (``threshold_decay``) of the smallest
    activation feature i selected in each training batch. A feature never selected in
    training has ``theta_i = inf``; before any training every ``theta_i`` is 0 (ReLU), as
    BatchTopK's global threshold (``SAE.init_from_data`` then scales the encoder alike).
    ``extras["capacity"]`` holds ``m`` in training.
    """

    name = "feature_choice"
    Options = FeatureChoiceOptions
    saelens_architecture = "jumprelu"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        zipf_profile(1, self.opts.alpha, self.opts.beta)  # validate early
        self.register_buffer("threshold", torch.full((cfg.d_sae,), -1.0))

    def capacities(self, n_tokens: int, freq: Tensor) -> Tensor:
        """``m [d_sae]`` for a batch of ``n_tokens`` given firing frequencies ``freq``."""
        F = freq.numel()
        p = zipf_profile(F, self.opts.alpha, self.opts.beta).to(freq.device)
        m_by_rank = zipf_capacities(p, self.cfg.k * n_tokens, n_tokens, self.opts.min_capacity)
        return m_by_rank[zipf_ranks(freq)]

    def select(self, pre: Tensor, ctx: Context) -> Selection:
        if not ctx.training:
            return threshold_selection(pre, self.inference_threshold())
        # capacities and column top-m_i over the global batch (ctx.comm); one rank: column
        # top-m_i without a [B, F] mask (kernels.capacity_selection, tested against the
        # plain column top-max(m) in tests/test_selection_speedpaths.py)
        m = self.capacities(ctx.comm.n_tokens(pre.shape[0]), ctx.sae.fire_freq)
        idx, mask, counts, low = ctx.comm.capacity_selection(torch.relu(pre.detach()), m)
        self._update_threshold(low)
        sel = Selection(indices=idx, mask=mask, extras={"counts": counts})
        sel.extras["capacity"] = m
        return sel

    @torch.no_grad()
    def _update_threshold(self, low: Tensor) -> None:
        """EMA of each feature's smallest selected activation (``inf``: not selected)."""
        hit = torch.isfinite(low)
        d = self.opts.threshold_decay
        new = torch.where(self.threshold < 0, low, d * self.threshold + (1 - d) * low)
        self.threshold.copy_(torch.where(hit, new, self.threshold))

    def inference_threshold(self) -> Tensor:
        """Per-feature thresholds: ``inf`` for features never selected in training, all 0
        before any training."""
        if bool((self.threshold < 0).all()):
            return torch.zeros_like(self.threshold)
        return torch.where(
            self.threshold < 0, torch.full_like(self.threshold, float("inf")), self.threshold
        )

    def export_threshold(self) -> Tensor:
        return self.inference_threshold().clone()
