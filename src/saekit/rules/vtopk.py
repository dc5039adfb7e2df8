"""Variational TopK SAE (vSAE; Baker and Li 2025): TopK by |z| plus a KL term on the codes."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saekit.errors import ConfigError
from saekit.options import Options, option
from saekit.rules.base import Context, Rule, Selection, register, topk_indices
from saekit.rules.relu import _warmup


@dataclass
class VTopKOptions(Options):
    """Options of variational TopK (``--rule-options``)."""

    sample: bool = option(
        False, "True: paper text (sample z ~ N(mu, var) in training); False: code"
    )
    learn_variance: bool = option(False, "True: a log-variance head (code's var_flag=1)")
    kl_coeff: float = option(1.0, "weight of the KL term (paper run: 1.0)", ge=0)
    kl_warmup_steps: int = option(
        0, "linear warm-up of kl_coeff over this many steps (code: 10%)", ge=0
    )
    mu_clamp: float = option(10.0, "mu is clamped to +-mu_clamp inside the KL term", gt=0)
    log_var_init: float = option(-2.0, "initial log-variance (b_var; W_var starts at 0)")
    log_var_min: float = option(-6.0, "log-variance clamp")
    log_var_max: float = option(2.0, "log-variance clamp (upper)")


@register
class VTopK(Rule):
    """``mu = ReLU(pre)``; ``z = mu`` (or ``mu + eps*sigma`` when sampling); TopK_k by ``|z|``.

    Values are ``z`` at the k selected latents, signs kept. Only with ``sample`` can codes be
    negative, so ``signed`` is set per instance. ``sample=False, learn_variance=False`` is
    the authors' code as run in the paper (var_flag=0, no sampling): TopK plus an L2 penalty
    on the dense ReLU codes. ``sample=True`` follows the paper's description (unit variance,
    or the learned one with ``learn_variance``: ``log var = x_in W_var + b_var``, clamped to
    ``[log_var_min, log_var_max]``). Sampling happens only in training; inference is
    deterministic (``z = mu``).

    Loss: ``recon_loss`` (default ``mse``, the code's ``sum_d (x - x_hat)^2`` averaged over
    tokens) ``+ kl_coeff * w(t) * KL`` with ``KL = 0.5 * sum_i (mu_i^2 + var_i - 1 - log
    var_i)`` over all d_sae latents before the top-k (``mu`` clamped to ``+-mu_clamp``), which
    is ``0.5 ||mu||^2`` with unit variance, averaged over tokens; ``w(t)`` ramps linearly over
    ``kl_warmup_steps``. The paper's vSAE run used no aux loss: set ``SAEConfig.aux="none"``
    to reproduce it. When sampling, the aux loss (if on) ranks and uses the sampled ``z``
    (ReLU'd ``mu`` plus noise, signed), as the authors' ``get_auxiliary_loss`` does
    (:meth:`aux_latents`).

    **Sampling does not train here** (``sample=True`` warns): every latent gets noise before
    the top-k by ``|z|``, so the selection is mostly noise and the SAE gets worse as it
    trains (synthetic data, 256 latents, k=6, 100k tokens: held-out FVE 0.06 with unit
    variance, 0.18 with ``learn_variance``, against 0.56 without sampling).

    The authors' setting (``examples/vsae_authors.json``, the code as the paper ran it):
    no sampling, ``kl_coeff`` 1, no aux loss, lr 8e-4, and three SAE-level differences from
    saekit's defaults: ``apply_b_dec_to_input=False`` (their "April update" mode encodes
    ``x``, not ``x - b_dec``), ``init_b_dec="zeros"`` (their decoder bias starts at 0, not
    at the geometric median) and ``unit_norm_decoder=False`` (free decoder norms). Left
    different [our choice]: their tied init at norm 0.1 (saekit: unit rows, encoder
    rescaled to the data by ``SAE.init_from_data``) and their warm-up (max(200, 2%) steps).
    """

    name = "vtopk"
    Options = VTopKOptions
    needs_dense_grad = True
    default_recon = "mse"
    saelens_architecture = "topk"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        o = self.opts
        if o.log_var_min > o.log_var_max:
            raise ConfigError(f"log_var_min {o.log_var_min} > log_var_max {o.log_var_max}")
        self.signed = bool(o.sample)  # type: ignore[misc]
        if o.sample:
            warnings.warn(
                "vtopk sample=true: noise on every latent before the top-k makes the selection"
                " mostly noise and the SAE gets worse as it trains (see the rule's docstring);"
                " the authors' runs did not sample (examples/vsae_authors.json)",
                UserWarning,
                stacklevel=2,
            )
        if o.learn_variance:
            self.W_var = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae))
            self.b_var = nn.Parameter(torch.full((cfg.d_sae,), float(o.log_var_init)))

    def log_var(self, x_in: Tensor) -> Tensor | None:
        if not self.opts.learn_variance:
            return None
        lv = x_in @ self.W_var + self.b_var
        return lv.clamp(self.opts.log_var_min, self.opts.log_var_max)

    def select(self, pre: Tensor, ctx: Context) -> Selection:
        mu = torch.relu(pre)
        lv = self.log_var(ctx.x_in)
        z = mu
        if ctx.training and self.opts.sample:
            sigma = torch.ones_like(mu) if lv is None else (0.5 * lv).exp()
            z = mu + torch.randn_like(mu) * sigma
        idx = topk_indices(z.detach().abs(), self.cfg.k)
        return Selection(indices=idx, extras={"z": z, "mu": mu, "log_var": lv})

    def activate(self, pre_sel: Tensor, sel: Selection, ctx: Context) -> Tensor:
        assert sel.indices is not None
        return sel.extras["z"].gather(1, sel.indices)

    def aux_latents(self, out) -> Tensor | None:
        """The sampled ``z`` when sampling (the authors' aux-k ranks and uses it), else None."""
        return out.extras["z"] if self.opts.sample and self.training else None

    def loss_terms(self, out, ctx: Context) -> dict[str, Tensor]:
        mu = out.extras["mu"].clamp(-self.opts.mu_clamp, self.opts.mu_clamp)
        lv = out.extras.get("log_var")
        if lv is None:
            kl = 0.5 * mu.pow(2).sum(-1)
        else:
            kl = 0.5 * (mu.pow(2) + lv.exp() - 1.0 - lv).sum(-1)
        w = self.opts.kl_coeff * _warmup(ctx.step, self.opts.kl_warmup_steps)
        return {"kl": w * kl.mean()}
