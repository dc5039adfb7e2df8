"""top-AFA (Lee et al. 2025): per-token k chosen so the code's norm matches the input's."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saekit.errors import ConfigError, FormatError
from saekit.losses.recon import nmse_denominator
from saekit.options import Options, option
from saekit.rules.base import Context, Rule, SAELensExport, Selection, SparsityKnob, register

NORMALIZE = ("token", "none")


@dataclass
class TopAFAOptions(Options):
    """Options of top-AFA (``--rule-options``)."""

    afa_coeff: float = option(
        1 / 32, "lambda_AFA of the norm-matching loss (paper sweeps 1/128..1/16)", ge=0
    )
    k_max: int = option(0, "cap on k per token (0: no cap, the paper's setting)", ge=0)
    normalize: str = option(
        "token", "token: standardise each token (the authors' code); none", choices=NORMALIZE
    )


def afa_k(
    a: Tensor, dec_norm: Tensor, target: Tensor, k_max: int = 0, m_hint: int = 0
) -> tuple[Tensor, Tensor]:
    """Per-token k* and the latents sorted by decoder-scaled activation.

    ``s_i = (a_i ||d_i||)^2`` sorted descending, ``c_j = sqrt(cumsum(s)_j)`` with the last
    entry set to 1e8 (as in the authors' code, so that not every latent is kept), ``k* =
    argmin_j |c_j - target| + 1``. With ``k_max`` below the width only the top ``k_max``
    entries are considered, with no 1e8 entry, so ``k*`` can reach ``k_max``. Returns
    ``(k* [B], order [B, M])`` with ``M >= max(k*)``.

    ``c`` is non-decreasing, so the argmin lies at the first ``j`` with ``c_j >= target`` or
    just before it: only a sorted prefix is needed. The prefix starts at ``m_hint`` entries
    (0: all) and doubles until it holds every token's crossing; the result is the same for
    any ``m_hint``, only the cost changes.
    """
    s = (a * dec_norm).pow(2)
    K = s.shape[1] if k_max <= 0 else min(k_max, s.shape[1])
    m = K if m_hint <= 0 else min(m_hint, K)
    while True:
        top = s.topk(m, dim=1, sorted=True)
        c = top.values.cumsum(1)
        if m == K:
            if s.shape[1] == K:  # every latent: the authors' guard against keeping all
                c[:, -1] = 1e8
            break
        if bool((c[:, -1].sqrt() >= target).all()):
            break
        m = min(K, 2 * m)
    k = (c.sqrt() - target[:, None]).abs().argmin(1) + 1
    return k, top.indices


@register
class TopAFA(Rule):
    """``a = ReLU(pre)``; keep each token's top ``k*`` latents, k* from the AFA bound.

    k* (see :func:`afa_k`) makes ``||f||`` (the code scaled by decoder norms) closest to
    ``||x - b_dec||``. Loss: NMSE + aux-k + ``afa_coeff * mean_b(||f_b|| - ||x_b||)^2 /
    v`` with the un-centred x (as in the authors' code) and ``v`` the batch's per-element
    variance, the NMSE denominator, so that the term keeps the code's ratio to the MSE on
    their per-token standardised inputs [our normalisation]. Deviations: the authors' code
    has no ``b_enc`` (it starts at 0 here and is learned); their norm uses raw codes with a
    unit-norm decoder, which is the same thing. Inference: the same per-token rule.
    ``extras["k_per_token"]`` holds k*. Aux loss: the authors' code's scaling
    (``aux_form = "bussmann"``: ``aux_penalty * MSE`` of the live residual; their code is
    built on BatchTopK's).

    Inputs: with ``normalize="token"`` (default: the authors' code, ``input_unit_norm``
    on in its default config and every reported run) each token is standardised, ``(x -
    mean) / (std + 1e-5)`` over ``d_in``, before the SAE and the reconstruction mapped
    back with the token's mean and std (:func:`saekit.sae.token_standardise`), so ``||x||``
    is the same for every token in the AFA bound and loss; ``"none"`` feeds the (scaled)
    raw inputs.

    SAELens has no top-AFA architecture: :meth:`saelens_export` refuses (the run directory
    is saekit's only). Exporting as TopK with ``k = cfg.k`` gave other codes (SAELens L0
    4.0 against 20.8 here), and no fixed k nor threshold reproduces a per-token k.
    """

    name = "topafa"
    Options = TopAFAOptions
    default_recon = "nmse"
    sparsity = SparsityKnob("free")
    aux_form = "bussmann"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        if self.opts.normalize not in NORMALIZE:
            raise ConfigError(
                f"topafa normalize={self.opts.normalize!r} (rule_options); use"
                f" {' or '.join(NORMALIZE)}"
            )
        self._m_hint = 0  # sorted-prefix length tried first by afa_k (not state: speed only)

    @property
    def input_norm(self) -> str:
        return self.opts.normalize

    def saelens_export(self) -> SAELensExport:
        raise FormatError(
            "top-AFA chooses k per token from the norm bound and SAELens has no such"
            " architecture (as TopK with a fixed k its codes would differ); load the run"
            " directory with saekit.io.load_sae"
        )

    def select(self, pre: Tensor, ctx: Context) -> Selection:
        a = torch.relu(pre.detach())
        dec_norm = ctx.sae.W_dec.detach().norm(dim=1)
        target = ctx.x_in.detach().norm(dim=1)
        k, order = afa_k(a, dec_norm, target, self.opts.k_max, self._m_hint)
        kmax = int(k.max())
        self._m_hint = kmax + kmax // 2 + 8  # prefix for the next batch (speed only)
        idx = order[:, :kmax]
        mask = torch.arange(kmax, device=pre.device)[None, :] < k[:, None]
        mask &= a.gather(1, idx) > 0
        return Selection(indices=idx, mask=mask, extras={"k_per_token": k})

    def loss_terms(self, out, ctx: Context) -> dict[str, Tensor]:
        codes = out.codes
        assert codes.values is not None and codes.indices is not None
        dn = ctx.sae.W_dec.norm(dim=1)
        f_norm = (codes.values * dn[codes.indices]).pow(2).sum(1).clamp_min(1e-12).sqrt()
        x = ctx.x
        # the global batch's per-element variance (the NMSE denominator over B * d_in)
        n = ctx.comm.n_tokens(x.shape[0]) * x.shape[1]
        var = (nmse_denominator(x.detach(), ctx.comm) / n).clamp_min(1e-12)
        sq = ctx.comm.batch_sum((f_norm - x.norm(dim=1)).pow(2).sum())  # over the global batch
        afa = sq / ctx.comm.n_tokens(x.shape[0]) / var
        return {"afa": self.opts.afa_coeff * afa}
