"""g-SAE (Olmo et al. 2024): TopK whose selection is boosted by each latent's loss effect."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from saekit.errors import ConfigError
from saekit.options import Options, option
from saekit.rules.base import Context, Rule, Selection, register, topk_indices


@dataclass
class GTopKOptions(Options):
    """Options of gradient TopK (``--rule-options``)."""

    beta: float = option(1.0, "weight of the gradient term in the selection score (paper: unknown)")
    normalize_grad: bool = option(True, "use g / ||g|| per token (our choice: scale-free beta)")
    require_grad: bool = option(
        False, "True: training without dLoss/dx is an error (else TopK + warning)"
    )


@register
class GTopK(Rule):
    """Score ``s = z + beta * z * |W_dec g|``, ``z = ReLU(pre)``; keep TopK_k by ``s``.

    ``(W_dec g)_i = d_i . g`` with ``g = dLoss/dx`` (the LM's next-token loss gradient at the
    hooked activation, detached; the named input ``"grad"``), so ``z_i * d_i . g`` is the
    first-order loss change from ablating latent i. Values are ``z`` at the selected
    latents: the gradient only changes *which* latents are selected [inference from
    summaries; no code found]. ``normalize_grad`` divides g by its per-token norm, since its
    scale varies by layer [our choice, default on]. Inference: uses g when given
    (``SAE.encode(x, {"grad": g})``), else plain TopK (beta ignored). Training batches
    without g also fall back to TopK, with a one-time warning (``require_grad=True`` makes
    that an error). Loss: NMSE + aux-k, as TopK.
    """

    name = "gtopk"
    Options = GTopKOptions
    requires = ("grad",)
    saelens_architecture = "topk"  # SAELens has no gradient input: exact as plain TopK
    _warned: bool = False

    def select(self, pre: Tensor, ctx: Context) -> Selection:
        z = torch.relu(pre.detach())
        g = ctx.inputs.get("grad")
        if g is None:
            if ctx.training and self.opts.require_grad:
                raise ConfigError(
                    "rule gtopk needs dLoss/dx in training: use a source that supplies"
                    " gradients (the HF source on a decoder LM, a cache written with"
                    " --inputs grad) or set rule_options"
                    ' {"require_grad": false} to train as plain TopK'
                )
            if ctx.training and not self._warned:
                self._warned = True
                warnings.warn(
                    "gtopk trained without dLoss/dx: selecting by plain TopK"
                    " (its source supplies no 'grad' input; see saekit.inputs)",
                    stacklevel=2,
                )
            return Selection(indices=topk_indices(z, self.cfg.k))
        g = g.detach().to(z.dtype)
        if self.opts.normalize_grad:
            g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        effect = (g @ ctx.sae.W_dec.detach().t()).abs()
        score = z + self.opts.beta * z * effect
        return Selection(indices=topk_indices(score, self.cfg.k))
