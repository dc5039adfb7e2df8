"""TopK (Gao et al. 2024): keep the k largest pre-activations of each token, then ReLU."""

from __future__ import annotations

from torch import Tensor

from saekit.rules.base import Context, Rule, Selection, register, saelens_int_k, topk_indices


@register
class TopK(Rule):
    """``z = ReLU(TopK_k(pre))``; the same per-token operation at inference.

    Trained with NMSE plus the aux-k loss on dead latents (coefficient ``aux_coeff``).
    """

    name = "topk"
    saelens_architecture = "topk"
    saelens_imports = ("topk",)

    def select(self, pre: Tensor, ctx: Context) -> Selection:
        return Selection(indices=topk_indices(pre, self.cfg.k))

    @classmethod
    def from_saelens(cls, cfg, weights):
        return {"k": saelens_int_k(cfg)}, {}
