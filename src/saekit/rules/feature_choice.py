"""Feature Choice (Ayonrinde 2024): each feature picks its own top tokens, Zipf capacities."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saekit.distributed.comm import LOCAL, Comm
from saekit.errors import ConfigError
from saekit.options import Options, option
from saekit.rules.base import Context, Rule, Selection, register
from saekit.rules.batchtopk import start_step, threshold_selection

RANK_STATISTICS = ("topk", "mass")


@dataclass
class FeatureChoiceOptions(Options):
    """Options of Feature Choice (``--rule-options``)."""

    alpha: float = option(
        1.0, "Zipf exponent: p_i ~ 1/(rank_i + beta)^alpha (paper value unknown)", ge=0
    )
    beta: float = option(0.0, "Zipf rank offset (ranks start at 1; needs beta > -1)", gt=-1)
    min_capacity: int = option(
        1, "m_i >= this when k*B >= min_capacity*d_sae (no dead features)", ge=0
    )
    rank_by: str = option(
        "topk", "ranking statistic: topk (would-be TopK frequency) or mass", choices=RANK_STATISTICS
    )
    rank_decay: float = option(0.99, "EMA decay of the ranking statistic", ge=0, lt=1)
    threshold_decay: float = option(
        0.999, "EMA decay of the tracked per-feature thresholds", ge=0, lt=1
    )
    threshold_start_step: int = option(
        -1, "start the threshold EMA at this step (-1: half the run)", ge=-1
    )
    calibrate: bool = option(
        True, "set the inference thresholds on held-back batches after training"
    )


def zipf_profile(n: int, alpha: float = 1.0, beta: float = 0.0) -> Tensor:
    """``p_r ~ 1/(r + beta)^alpha`` for ranks ``r = 1..n``, normalised to sum to 1 (float64)."""
    if beta <= -1:
        raise ConfigError(f"Zipf beta must be > -1 (ranks start at 1), got {beta}")
    if alpha < 0:
        raise ConfigError(f"Zipf alpha must be >= 0, got {alpha}")
    r = torch.arange(1, n + 1, dtype=torch.float64)
    p = (r + beta).pow(-alpha)
    return p / p.sum()


def zipf_ranks(freq: Tensor, tiebreak: Tensor | None = None) -> Tensor:
    """Rank (0 = most frequent) of each feature by ``freq``.

    Ties are broken by ``tiebreak`` (smaller first; e.g. a random permutation), else by index.
    """
    if tiebreak is None:
        order = torch.sort(freq, descending=True, stable=True).indices
    else:
        pre_order = torch.argsort(tiebreak)
        order = pre_order[torch.sort(freq[pre_order], descending=True, stable=True).indices]
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(freq.numel(), device=freq.device)
    return ranks


def zipf_capacities(p: Tensor, total: int, cap: int | Tensor, floor: int = 1) -> Tensor:
    """Integer capacities ``m_r`` for a profile ``p`` sorted by rank (descending).

    ``cap``: one bound for every feature, or per feature (in rank order, e.g. how many
    positive entries each column has, so that no capacity goes unused); with per-feature
    caps the budget is ``min(total, sum(cap))``. Returns ``m`` (long) with ``sum(m) ==
    total``, ``lo_r <= m_r <= cap_r``, where ``lo_r = min(floor, cap_r)`` if ``floor *
    len(p) <= total`` else 0, and ``m`` non-increasing where the caps allow. ``m`` is the
    floor of the water-filled target ``clamp(c * p, lo, cap)`` (``c`` found by bisection so
    the targets sum to ``total``); the remainder goes one unit each to the highest-ranked
    features below their cap, which keeps the ranking.
    """
    n = p.numel()
    if isinstance(cap, Tensor):
        caps = cap.to(device=p.device, dtype=torch.float64)
        total = min(total, int(caps.sum()))
    else:
        if total > n * cap:
            raise ConfigError(f"budget {total} exceeds {n} features x {cap} tokens")
        caps = torch.full((n,), float(cap), dtype=torch.float64, device=p.device)
    lo = torch.minimum(caps, torch.full_like(caps, float(floor if floor * n <= total else 0)))
    p = p.to(torch.float64)
    a, b = 0.0, float(caps.max().clamp_min(1) / p.min().clamp_min(1e-300))
    for _ in range(100):
        c = 0.5 * (a + b)
        if float(torch.minimum(torch.maximum(c * p, lo), caps).sum()) < total:
            a = c
        else:
            b = c
    t = torch.minimum(torch.maximum(b * p, lo), caps)
    m = torch.minimum(torch.maximum(t.add(1e-9).floor(), lo), caps).long()
    caps_l, lo_l = caps.long(), lo.long()
    r = total - int(m.sum())
    if r > 0:
        ok = m < caps_l
        m += (ok & (ok.long().cumsum(0) <= r)).long()
    elif r < 0:
        ok = m > lo_l
        m -= (ok & (ok.long().flip(0).cumsum(0).flip(0) <= -r)).long()
    return m


@register
class FeatureChoice(Rule):
    """Feature i takes its top ``m_i`` tokens of ``Z' = ReLU(pre)`` in each training batch.

    Capacities [our reading of the paper, whose Zipf parameters are unknown]: features are
    ranked by a running statistic that does not depend on the capacities (``rank_by``,
    an EMA with decay ``rank_decay`` kept in ``rank_stat``): ``"topk"`` (default), how
    often the latent would be among its token's top ``k`` under TopK at the same ``k``;
    ``"mass"``, its mean ``ReLU(pre)``. (Ranking by the latent's own Feature Choice firing
    rate, which equals its capacity, would lock the ranks onto their first order for good.)
    Ties are broken by a random permutation (``rank_tiebreak``, drawn from the torch seed
    without consuming the global generator), so at step 0 no latent is favoured by its
    index. ``p_i ~ 1/(rank_i + beta)^alpha`` and ``m_i ~ k*B*p_i`` rounded so that ``sum
    m_i = k*B`` exactly, ``m_i <= B`` and ``m_i >= min_capacity`` whenever ``k*B >=
    min_capacity * d_sae`` (then every feature with a positive pre-activation somewhere in
    the batch fires: no dead features). Each ``m_i`` is also capped by the positive
    entries of column i, the budget it cannot use going to the others (water-filled
    again), so that exactly ``k*B`` entries are selected whenever the batch has that many
    positive ones [our choice]. See :func:`zipf_capacities`. Selection: column top-``m_i``
    (:func:`saekit.kernels.capacity_selection`, no ``[B, F]`` mask; across ranks
    ``ctx.comm.capacity_selection``); only positive entries count.

    Inference [our choice; the paper gives none, a flagged deviation]: JumpReLU with
    per-feature thresholds ``theta_i``, so that each feature fires at inference at its
    training rate ``m_i / B``:

    * **calibrated** (default, ``calibrate``): after training, on held-back batches,
      ``theta_i`` is the mean over the batches of the midpoint of feature i's ``m_i``-th
      and ``(m_i+1)``-th largest ``ReLU(pre)`` under the final capacities (the midpoint: a
      mean of batch maxima alone keeps a feature with ``m_i = 1`` at ~0.56 of its rate on
      new data); ``inf`` for a feature that never had a capacity there;
    * **tracked** (before calibration): from ``threshold_start_step`` on (default half
      the run) a per-feature bias-corrected EMA of the smallest selected activation (decay
      ``threshold_decay``), before it the latest value; ``inf`` for a feature never
      selected, every ``theta_i`` 0 (ReLU) before any training.

    ``extras["capacity"]`` holds ``m`` in training. Batch statistics pass through
    :meth:`Rule.batch_stat`.
    """

    name = "feature_choice"
    Options = FeatureChoiceOptions
    saelens_architecture = "jumprelu"
    calibrates = True
    optional_state = ("threshold_ema", "threshold_updates", "rank_stat", "rank_tiebreak")

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        zipf_profile(1, self.opts.alpha, self.opts.beta)  # validate early
        if self.opts.rank_by not in RANK_STATISTICS:
            raise ConfigError(
                f"feature_choice rank_by={self.opts.rank_by!r}; use {' or '.join(RANK_STATISTICS)}"
            )
        F = cfg.d_sae
        self.register_buffer("threshold", torch.full((F,), -1.0))
        self.register_buffer("threshold_ema", torch.zeros(F))
        self.register_buffer("threshold_updates", torch.zeros(F, dtype=torch.long))
        self.register_buffer("rank_stat", torch.full((F,), -1.0))  # -1: not yet observed
        g = torch.Generator().manual_seed(torch.initial_seed() % 2**63 + 0xFC)
        self.register_buffer("rank_tiebreak", torch.randperm(F, generator=g))
        self._total_steps: int | None = None
        self._cal_sum: Tensor | None = None
        self._cal_n: Tensor | None = None

    def setup_training(self, total_steps: int) -> None:
        self._total_steps = total_steps

    def ranks(self) -> Tensor:
        """Each feature's rank (0 = largest ``rank_stat``; ties by ``rank_tiebreak``)."""
        return zipf_ranks(self.rank_stat, self.rank_tiebreak.to(self.rank_stat.device))

    def capacities(
        self, n_tokens: int, freq: Tensor | None = None, positive: Tensor | None = None
    ) -> Tensor:
        """``m [d_sae]`` for a batch of ``n_tokens``, ranked by ``freq`` (default: ``ranks``).

        ``positive [d_sae]``: positive entries per column; capacities are then capped by
        them and the budget a column cannot use goes to the others.
        """
        F = self.cfg.d_sae
        p = zipf_profile(F, self.opts.alpha, self.opts.beta).to(self.rank_stat.device)
        ranks = self.ranks() if freq is None else zipf_ranks(freq, self.rank_tiebreak)
        cap: int | Tensor = n_tokens
        if positive is not None:
            order = torch.empty_like(ranks)
            order[ranks] = torch.arange(F, device=ranks.device)
            cap = positive.to(ranks.device)[order].clamp(max=n_tokens)
        m_by_rank = zipf_capacities(p, self.cfg.k * n_tokens, cap, self.opts.min_capacity)
        return m_by_rank[ranks]

    def _capacities(self, z: Tensor, comm: Comm) -> tuple[Tensor, Tensor]:
        """Capacities for the global batch of ``z = ReLU(pre)``, and its positives per column."""
        positive = self.batch_stat((z > 0).sum(0), "sum", comm)
        return self.capacities(comm.n_tokens(z.shape[0]), positive=positive), positive

    def _selection(self, pre: Tensor, comm: Comm) -> tuple[Selection, Tensor]:
        """The training selection under the current capacities, and each feature's ``low``
        (smallest selected value; ``inf`` where nothing was selected)."""
        z = torch.relu(pre.detach())
        m, _ = self._capacities(z, comm)
        # column top-m_i without a [B, F] mask (kernels.capacity_selection, tested against
        # the plain column top-max(m) in tests/test_selection_speedpaths.py); across ranks
        # the columns of the global batch
        idx, mask, counts, low = comm.capacity_selection(z, m)
        sel = Selection(indices=idx, mask=mask, extras={"counts": counts, "capacity": m})
        return sel, low

    def select(self, pre: Tensor, ctx: Context) -> Selection:
        if not ctx.training:
            return threshold_selection(pre, self.inference_threshold())
        sel, low = self._selection(pre, ctx.comm)
        self._update_rank_stat(pre, ctx.comm)
        self._update_threshold(low, ctx.step)
        return sel

    def init_selection(self, pre: Tensor, ctx: Context) -> Selection:
        # init_from_data sees the whole sample on every rank: the local selection
        return self._selection(pre, LOCAL)[0]

    @torch.no_grad()
    def _update_rank_stat(self, pre: Tensor, comm: Comm) -> None:
        B, F = pre.shape
        if self.opts.rank_by == "topk":
            v, i = pre.detach().topk(min(self.cfg.k, F), dim=1, sorted=False)
            stat = torch.zeros(F, dtype=pre.dtype, device=pre.device)
            stat.index_add_(0, i.reshape(-1), (v > 0).reshape(-1).to(pre.dtype))
        else:
            stat = torch.relu(pre.detach()).sum(0)
        rate = self.batch_stat(stat, "sum", comm) / max(comm.n_tokens(B), 1)
        if bool((self.rank_stat < 0).all()):
            self.rank_stat.copy_(rate)
        else:
            self.rank_stat.mul_(self.opts.rank_decay).add_(rate, alpha=1 - self.opts.rank_decay)

    @torch.no_grad()
    def _update_threshold(self, low: Tensor, step: int) -> None:
        """Track each feature's smallest selected activation (``inf``: not selected)."""
        hit = torch.isfinite(low)
        if step < start_step(self.opts.threshold_start_step, self._total_steps):
            self.threshold.copy_(torch.where(hit, low, self.threshold))
            return
        d = self.opts.threshold_decay
        ema = torch.where(hit, d * self.threshold_ema + (1 - d) * low, self.threshold_ema)
        self.threshold_ema.copy_(ema)
        self.threshold_updates += hit.long()
        debias = 1 - torch.pow(d, self.threshold_updates.to(torch.float64))
        tracked = (self.threshold_ema.double() / debias.clamp_min(1e-300)).to(self.threshold.dtype)
        self.threshold.copy_(torch.where(self.threshold_updates > 0, tracked, self.threshold))

    def inference_threshold(self) -> Tensor:
        """Per-feature thresholds: ``inf`` for features never selected in training, all 0
        before any training."""
        if bool((self.threshold < 0).all()):
            return torch.zeros_like(self.threshold)
        return torch.where(
            self.threshold < 0, torch.full_like(self.threshold, float("inf")), self.threshold
        )

    # ---------------------------------------------------------------- calibration
    def begin_calibration(self, comm: Comm = LOCAL) -> None:
        self._cal_sum = torch.zeros_like(self.threshold, dtype=torch.float64)
        self._cal_n = torch.zeros_like(self.threshold, dtype=torch.long)

    @torch.no_grad()
    def calibrate(self, pre: Tensor, ctx: Context) -> None:
        """Add each feature's cut at its capacity on this (global) batch: the midpoint of its
        ``m_i``-th and ``(m_i+1)``-th largest ``ReLU(pre)`` (0 for the latter when the
        column has no more than ``m_i`` positive entries)."""
        if not self.opts.calibrate or self._cal_sum is None or self._cal_n is None:
            return
        z = torch.relu(pre)
        m, positive = self._capacities(z, ctx.comm)
        low_m = ctx.comm.capacity_selection(z, m)[3]  # the m_i-th largest
        low_next = ctx.comm.capacity_selection(z, m + 1)[3]  # the (m_i+1)-th, if positive
        nxt = torch.where(positive > m, low_next, torch.zeros_like(low_next))
        hit = m > 0
        cut = torch.where(hit, 0.5 * (low_m + nxt), torch.zeros_like(low_m))
        self._cal_sum += cut.double()
        self._cal_n += hit.long()

    @torch.no_grad()
    def end_calibration(self, comm: Comm = LOCAL) -> None:
        n, total = self._cal_n, self._cal_sum
        self._cal_sum = self._cal_n = None
        if n is None or total is None or not bool((n > 0).any()):
            return
        th = torch.where(n > 0, total / n.clamp_min(1), float("inf"))
        self.threshold.copy_(th.to(self.threshold.dtype))

    def export_threshold(self) -> Tensor:
        return self.inference_threshold().clone()
