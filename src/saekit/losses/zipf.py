"""aux-zipf (Ayonrinde 2024): the aux-k loss over dead *and under-used* latents.

Use it with any rule via ``SAEConfig(aux="zipf", aux_options={...})`` (the fields of
:class:`ZipfOptions`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saekit.losses.aux import AuxLoss, AuxOptions, register_aux
from saekit.rules.feature_choice import zipf_profile, zipf_ranks

if TYPE_CHECKING:
    from saekit.sae import SAE


@dataclass
class ZipfOptions(AuxOptions):
    alpha: float = 1.0  # Zipf exponent of the target profile (as Feature Choice)
    beta: float = 0.0  # Zipf rank offset
    tau: float = 1.0  # under-used: firing rate below tau * target rate
    deficit_weights: bool = True  # scale each candidate's aux value by (p_i - f_i)/p_i
    warmup_tokens: int = 0  # only dead latents count until this many tokens were seen


def zipf_target_rate(freq: Tensor, k: int, alpha: float = 1.0, beta: float = 0.0) -> Tensor:
    """Per-token target firing rate of each latent: ``min(k * p_rank(i), 1)``.

    ``p`` is the Zipf profile over latents ranked by ``freq`` (most frequent first), so the
    targets sum to ``k`` (the mean L0) except where a rate would exceed 1 and is capped.
    """
    p = zipf_profile(freq.numel(), alpha, beta).to(freq.device)
    return (k * p[zipf_ranks(freq)]).clamp(max=1.0).to(freq.dtype)


@register_aux
class AuxZipf(AuxLoss):
    """``U = dead ∪ {i : f_i < tau * target_i}`` and optional deficit weights.

    ``f_i`` is ``sae.fire_freq`` (EMA firing rate per token); dead is ``SAE.dead_latents``.
    Deficit weights are ``(target_i - f_i)/target_i`` (in (0, 1]) for under-used latents and
    1 for dead ones [our choice of weighting].
    """

    name = "zipf"
    Options = ZipfOptions

    @torch.no_grad()
    def candidates(self, sae: SAE) -> tuple[Tensor, Tensor | None]:
        o = self.opts
        dead = sae.dead_latents()
        if int(sae.tokens_seen) == 0 or int(sae.tokens_seen) < o.warmup_tokens:
            return dead, None
        f = sae.fire_freq
        target = zipf_target_rate(f, sae.cfg.k, o.alpha, o.beta)
        under = f < o.tau * target
        cand = dead | under
        if not o.deficit_weights:
            return cand, None
        w = ((target - f) / target.clamp_min(1e-12)).clamp(0.0, 1.0)
        w = torch.where(dead, torch.ones_like(w), w)
        return cand, w
