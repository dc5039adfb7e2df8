"""TopK (Gao et al. 2024): keep the k largest pre-activations of each token, then ReLU."""

from __future__ import annotations

from torch import Tensor

from saekit.rules.base import Context, Rule, Selection, register, saelens_int_k


@register
class TopK(Rule):
    """``z = ReLU(TopK_k(pre))``; the same per-token operation at inference.

    Trained with NMSE plus the aux-k loss on dead latents (coefficient ``aux_coeff``).
    """

    name = "topk"
    saelens_architecture = "topk"
    saelens_imports = ("topk",)
    latent_shardable = True
    row_topk = True

    def select(self, pre: Tensor, ctx: Context) -> Selection:
        idx, mask = ctx.comm.topk(pre, self.cfg.k)
        return Selection(indices=idx, mask=mask)

    @classmethod
    def from_saelens(cls, cfg, weights):
        return {"k": saelens_int_k(cfg)}, {}
