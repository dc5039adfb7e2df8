"""AbsTopK (Zhu, Khalili, Zhu 2025): keep the k largest ``|pre|`` with their signs, no ReLU."""

from __future__ import annotations

from torch import Tensor

from saekit.rules.base import Context, Rule, SAELensExport, Selection, register, saelens_int_k


@register
class AbsTopK(Rule):
    """``z_i = u_i`` if ``|u_i|`` is among the k largest of the token, else 0 (hard threshold).

    ``u = W_enc^T (x - b_dec) + b_enc`` [paper: ``u = W_enc x + b_enc``; subtracting b_dec
    follows Gao et al. and is SAEConfig.apply_b_dec_to_input]. Codes are signed, so L0 counts
    nonzeros and the aux-k loss ranks dead latents by ``|u|`` and keeps their signs (our
    choice; the paper does not specify an aux loss). Loss: NMSE + aux-k, as TopK. Inference:
    the same per-token operation, which is SAELens's ``abstopk`` architecture (exported and
    imported as such).
    """

    name = "abstopk"
    signed = True
    saelens_architecture = "abstopk"
    saelens_imports = ("abstopk",)
    latent_shardable = True

    def select(self, pre: Tensor, ctx: Context) -> Selection:
        idx, mask = ctx.comm.topk(pre, self.cfg.k, absolute=True)  # no |pre| copy
        return Selection(indices=idx, mask=mask)

    def activate(self, pre_sel: Tensor, sel: Selection, ctx: Context) -> Tensor:
        return pre_sel

    def saelens_export(self) -> SAELensExport:
        return SAELensExport("abstopk", {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False})

    @classmethod
    def from_saelens(cls, cfg, weights):
        return {"k": saelens_int_k(cfg)}, {}
