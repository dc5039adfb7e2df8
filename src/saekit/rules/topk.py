"""TopK (Gao et al. 2024): keep the k largest pre-activations of each token, then ReLU."""

from __future__ import annotations

from torch import Tensor

from saekit.rules.base import Context, Rule, Selection, register


@register
class TopK(Rule):
    """``z = ReLU(TopK_k(pre))``; the same per-token operation at inference.

    Trained with NMSE plus the aux-k loss on dead latents (coefficient ``aux_coeff``).
    """

    name = "topk"
    latent_shardable = True

    def select(self, pre: Tensor, ctx: Context) -> Selection:
        idx, mask = ctx.comm.topk(pre, self.cfg.k)
        return Selection(indices=idx, mask=mask)
