"""aux-zipf (Ayonrinde 2024): the aux-k loss over dead *and under-used* latents.

Use it with any rule via ``SAEConfig(aux="zipf", aux_options={...})`` (the fields of
:class:`ZipfOptions`). What is the paper's and what is guessed:

* **paper** (abstract and reviews; the formula is not published): aux_zipf "generalises
  aux_k_loss to mitigate dead and underutilised features", using a Zipf fit of the feature
  densities, which "follow Zipf except at the low-frequency tail".
* **guessed** [our choice], each an option: the target of latent ``i`` is the Zipf law
  *fitted* to the observed firing rates, ``t_i = exp(c) / (rank_i + beta)^a`` with ``c, a``
  fitted by least squares on log rates over the top ``fit_ranks`` share of ranks
  (``profile="fit"``; ``profile="fixed"`` uses ``k * p_rank`` with a fixed exponent
  ``alpha``, the earlier reading); a latent is under-used when ``f_i < tau * t_i`` and, with
  ``tail_only``, it fires below the mean rate ``k / d_sae`` (the head of a real density
  profile is flatter than any Zipf law through it, so without this frequent latents fall
  below their target and take the aux-k slots); candidates ``U = dead ∪ under-used``; each
  under-used candidate's aux value is scaled by its deficit ``(t_i - f_i) / t_i``, dead
  ones by 1; only dead latents count for the first ``warmup_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saekit.errors import ConfigError
from saekit.losses.aux import AuxLoss, AuxOptions, register_aux
from saekit.options import option
from saekit.rules.feature_choice import zipf_profile, zipf_ranks

if TYPE_CHECKING:
    from saekit.sae import SAE

PROFILES = ("fit", "fixed")


@dataclass
class ZipfOptions(AuxOptions):
    """Options of aux-zipf (``SAEConfig.aux_options`` with ``aux="zipf"``)."""

    profile: str = option(
        "fit",
        "fit: Zipf law fitted to the observed rates; fixed: k * p_rank(alpha)",
        choices=PROFILES,
    )
    fit_ranks: float = option(0.5, "profile=fit: share of the top ranks the fit uses", gt=0, le=1)
    alpha: float = option(1.0, "profile=fixed: Zipf exponent of the target profile", ge=0)
    beta: float = option(0.0, "Zipf rank offset (ranks start at 1)", gt=-1)
    tau: float = option(1.0, "under-used: firing rate below tau * target rate", ge=0)
    tail_only: bool = option(True, "under-used latents also fire below the mean rate k / d_sae")
    deficit_weights: bool = option(True, "scale each candidate's aux value by (t_i - f_i)/t_i")
    warmup_tokens: int = option(0, "only dead latents count until this many tokens were seen", ge=0)


def zipf_target_rate(freq: Tensor, k: int, alpha: float = 1.0, beta: float = 0.0) -> Tensor:
    """Fixed profile: ``min(k * p_rank(i), 1)``, ``p`` the Zipf profile over latents ranked by
    ``freq`` (most frequent first); the targets sum to ``k`` except where capped at 1."""
    p = zipf_profile(freq.numel(), alpha, beta).to(freq.device)
    return (k * p[zipf_ranks(freq)]).clamp(max=1.0).to(freq.dtype)


def zipf_fit_rate(freq: Tensor, fit_ranks: float = 0.5, beta: float = 0.0) -> Tensor | None:
    """Fitted profile: ``exp(c) / (rank + beta)^a`` with ``(c, a)`` the least-squares fit of
    ``log freq`` against ``log(rank + beta)`` over the firing latents among the top
    ``fit_ranks`` share of ranks; None when fewer than two latents fire there."""
    if beta <= -1:
        raise ConfigError(f"aux_options.beta must be > -1 (ranks start at 1), got {beta}")
    f = freq.detach().double()
    n = f.numel()
    ranks = zipf_ranks(f).double() + 1.0 + beta  # 1-based, offset
    head = (ranks - beta <= max(2, round(fit_ranks * n))) & (f > 0)
    if int(head.sum()) < 2:
        return None
    x, y = ranks[head].log(), f[head].log()
    A = torch.stack([torch.ones_like(x), -x], 1)
    c, a = torch.linalg.lstsq(A, y[:, None]).solution[:, 0]
    return torch.exp(c - a * ranks.log()).to(freq.dtype)


@register_aux
class AuxZipf(AuxLoss):
    """aux-zipf: aux-k over dead latents and latents firing below a Zipf target (see module)."""

    name = "zipf"
    Options = ZipfOptions

    def __init__(self, cfg, rule) -> None:
        super().__init__(cfg, rule)
        o = self.opts
        if o.profile not in PROFILES:
            raise ConfigError(f"aux_options.profile={o.profile!r}; use {' or '.join(PROFILES)}")
        if not 0 < o.fit_ranks <= 1:
            raise ConfigError(f"aux_options.fit_ranks={o.fit_ranks} must be in (0, 1]")

    def target(self, sae: SAE) -> Tensor | None:
        """Per-latent target rates (None: no target yet, only dead latents count)."""
        o, f = self.opts, sae.fire_freq
        if o.profile == "fixed":
            return zipf_target_rate(f, sae.cfg.k, o.alpha, o.beta)
        return zipf_fit_rate(f, o.fit_ranks, o.beta)

    @torch.no_grad()
    def candidates(self, sae: SAE) -> tuple[Tensor, Tensor | None]:
        o = self.opts
        dead = sae.dead_latents()
        if int(sae.tokens_seen) == 0 or int(sae.tokens_seen) < o.warmup_tokens:
            return dead, None
        f = sae.fire_freq
        target = self.target(sae)
        if target is None:
            return dead, None
        under = f < o.tau * target
        if o.tail_only:
            under &= f < sae.cfg.k / sae.d_sae
        cand = dead | under
        if not o.deficit_weights:
            return cand, None
        w = ((target - f) / target.clamp_min(1e-12)).clamp(0.0, 1.0)
        w = torch.where(dead, torch.ones_like(w), w)
        return cand, w
