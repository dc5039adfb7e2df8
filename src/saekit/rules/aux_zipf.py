"""aux-zipf (Ayonrinde 2024): the aux-k loss over dead *and under-used* latents.

Registered as ``losses.aux_registry["zipf"]``; use it with any rule via
``SAEConfig(aux="zipf")``. Options live in ``SAEConfig.rule_options["aux_zipf"]`` (a dict
with the fields of :class:`AuxZipfOptions`; rules ignore that key).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saekit import losses
from saekit.errors import ConfigError
from saekit.rules.feature_choice import zipf_profile, zipf_ranks

if TYPE_CHECKING:
    from saekit.sae import SAE


@dataclass
class AuxZipfOptions:
    alpha: float = 1.0  # Zipf exponent of the target profile (as Feature Choice)
    beta: float = 0.0  # Zipf rank offset
    tau: float = 1.0  # under-used: firing rate below tau * target rate
    deficit_weights: bool = True  # scale each candidate's aux value by (p_i - f_i)/p_i
    warmup_tokens: int = 0  # only dead latents count until this many tokens were seen


def aux_zipf_options(sae: SAE) -> AuxZipfOptions:
    """The :class:`AuxZipfOptions` in ``sae.cfg.rule_options["aux_zipf"]``."""
    raw = sae.cfg.rule_options.get("aux_zipf", {}) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"rule_options['aux_zipf'] must be a dict, got {type(raw).__name__}")
    try:
        return AuxZipfOptions(**raw)
    except TypeError as e:
        known = [f.name for f in fields(AuxZipfOptions)]
        raise ConfigError(f"bad rule_options['aux_zipf']: {e}; known options: {known}") from e


def zipf_target_rate(freq: Tensor, k: int, alpha: float = 1.0, beta: float = 0.0) -> Tensor:
    """Per-token target firing rate of each latent: ``min(k * p_rank(i), 1)``.

    ``p`` is the Zipf profile over latents ranked by ``freq`` (most frequent first), so the
    targets sum to ``k`` (the mean L0) except where a rate would exceed 1 and is capped.
    """
    p = zipf_profile(freq.numel(), alpha, beta).to(freq.device)
    return (k * p[zipf_ranks(freq)]).clamp(max=1.0).to(freq.dtype)


@torch.no_grad()
def aux_zipf_candidates(sae: SAE) -> tuple[Tensor, Tensor | None]:
    """``U = dead ∪ {i : f_i < tau * target_i}`` and optional deficit weights.

    ``f_i`` is ``sae.fire_freq`` (EMA firing rate per token); dead means
    ``tokens_since_fired >= dead_tokens``. Deficit weights are ``(target_i - f_i)/target_i``
    (in (0, 1]) for under-used latents and 1 for dead ones [our choice of weighting].
    """
    o = aux_zipf_options(sae)
    dead = sae.tokens_since_fired >= sae.cfg.dead_tokens
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


losses.aux_registry["zipf"] = aux_zipf_candidates
