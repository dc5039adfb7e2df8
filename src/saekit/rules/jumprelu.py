"""JumpReLU (Rajamanoharan et al. 2024): learned per-latent thresholds, L0 penalty, STE."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saekit.errors import FormatError
from saekit.options import Options, option
from saekit.rules.base import Context, Rule, Selection, SparsityKnob, register
from saekit.rules.relu import _warmup


@dataclass
class JumpReLUOptions(Options):
    """Options of JumpReLU (``--rule-options``)."""

    l0_coeff: float = option(
        1e-3, "lambda of the L0 penalty (sum_i H(z_i - theta_i), mean over tokens)", ge=0
    )
    bandwidth: float = option(
        1e-3, "epsilon of the rectangle kernel in the straight-through estimator", gt=0
    )
    init_threshold: float = option(1e-3, "theta_i at initialisation", gt=0)
    l0_warmup_steps: int = option(0, "linear warm-up of l0_coeff (Gemma Scope)", ge=0)


def _rect(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLUFn(torch.autograd.Function):
    """``z * H(z - theta)`` with pseudo-derivative ``-(theta/eps) K((z - theta)/eps)`` for theta."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        gz = g * (z > theta).to(z.dtype)
        gtheta = (g * (-(theta / eps) * _rect((z - theta) / eps))).sum(0)
        return gz, gtheta, None


class _StepFn(torch.autograd.Function):
    """``H(z - theta)`` with pseudo-derivative ``-(1/eps) K((z - theta)/eps)`` for theta."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        gtheta = (g * (-(1.0 / eps) * _rect((z - theta) / eps))).sum(0)
        return torch.zeros_like(z), gtheta, None


def jumprelu(z: Tensor, theta: Tensor, eps: float) -> Tensor:
    return _JumpReLUFn.apply(z, theta, eps)


def heaviside_step(z: Tensor, theta: Tensor, eps: float) -> Tensor:
    return _StepFn.apply(z, theta, eps)


@register
class JumpReLU(Rule):
    """``f = z * H(z - theta)``, ``theta = exp(log_theta)``; loss ``||x-x_hat||^2 + l0 * L0``.

    Gradients to ``theta`` use the rectangle-kernel straight-through estimator; the gradient
    to ``z`` passes only where the latent is active. Inference: the same thresholding.
    """

    name = "jumprelu"
    Options = JumpReLUOptions
    needs_dense_grad = True
    default_recon = "mse"
    uses_aux = False
    saelens_architecture = "jumprelu"
    saelens_imports = ("jumprelu",)
    #: the paper's init (theta = 1e-3, bandwidth 1e-3) barely moves the thresholds in a short
    #: run (measured: L0 stays ~d_sae), so comparisons start them at 1 with bandwidth 0.1
    sparsity = SparsityKnob(
        "option",
        "l0_coeff",
        grid=(0.3, 1.0, 3.0),
        fixed=(("init_threshold", 1.0), ("bandwidth", 0.1)),
    )

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(
            torch.full((cfg.d_sae,), math.log(self.opts.init_threshold))
        )

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def select(self, pre: Tensor, ctx: Context) -> Selection:
        return Selection(dense=jumprelu(pre, self.threshold, self.opts.bandwidth))

    def loss_terms(self, out, ctx: Context) -> dict[str, Tensor]:
        l0 = heaviside_step(out.pre, self.threshold, self.opts.bandwidth).sum(-1).mean()
        w = self.opts.l0_coeff * _warmup(ctx.step, self.opts.l0_warmup_steps)
        return {"l0": w * l0}

    def export_threshold(self) -> Tensor:
        return self.threshold.detach().clone()

    @classmethod
    def from_saelens(cls, cfg, weights):
        """SAELens ``threshold`` (or ``log_threshold``) -> ``log_threshold``."""
        if "threshold" in weights:
            return {}, {"log_threshold": weights["threshold"].clamp_min(0).log()}
        if "log_threshold" in weights:
            return {}, {"log_threshold": weights["log_threshold"]}
        raise FormatError("SAELens jumprelu weights lack 'threshold'")
