"""ReLU SAE with an L1 penalty (Bricken et al. 2023; Anthropic's April update)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saekit.options import Options, option
from saekit.rules.base import Context, Rule, Selection, SparsityKnob, register


@dataclass
class ReLUOptions(Options):
    """Options of ReLU + L1 (``--rule-options``)."""

    l1_coeff: float = option(5.0, "weight of the L1 penalty (on inputs with E||x||^2 = d_in)", ge=0)
    weight_by_decoder_norm: bool = option(True, "penalise sum_i |f_i| * ||d_i|| (April update)")
    l1_warmup_steps: int = option(0, "linear warm-up of l1_coeff from 0", ge=0)


@register
class ReLU(Rule):
    """``f = ReLU(pre)``, dense codes; loss ``||x - x_hat||^2 + l1_coeff * sum_i |f_i| w_i``.

    ``w_i = ||d_i||`` when ``weight_by_decoder_norm`` (then the decoder is usually left
    unconstrained), else 1.
    """

    name = "relu"
    Options = ReLUOptions
    needs_dense_grad = True
    default_recon = "mse"
    uses_aux = False
    saelens_architecture = "standard"
    saelens_imports = ("standard",)
    sparsity = SparsityKnob("option", "l1_coeff", grid=(3.0, 4.0, 5.0))

    def select(self, pre: Tensor, ctx: Context) -> Selection:
        return Selection(dense=torch.relu(pre))

    def loss_terms(self, out, ctx: Context) -> dict[str, Tensor]:
        f = out.codes.to_dense()
        if self.opts.weight_by_decoder_norm:
            f = f * ctx.sae.decoder_norms()
        w = self.opts.l1_coeff * _warmup(ctx.step, self.opts.l1_warmup_steps)
        return {"l1": w * f.abs().sum(-1).mean()}


def _warmup(step: int, steps: int) -> float:
    return 1.0 if steps <= 0 else min(1.0, (step + 1) / steps)
