"""Auxiliary losses, registered by name: ``SAEConfig.aux`` picks one, ``SAEConfig.aux_options``
holds its options (the fields of its ``Options`` dataclass), ``aux_coeff`` weighs it and
``aux_k`` is the number of latents it uses per token.

Every aux loss here is a form of Gao et al.'s aux-k: reconstruct the main reconstruction's
residual ``e = x - x_hat`` from the top-``aux_k`` *candidate* latents of each token (by
pre-activation, ReLU'd; no decoder bias). A loss says which latents are candidates
(:meth:`AuxLoss.candidates`: the dead ones for ``auxk``, see :mod:`saekit.losses.zipf` for
``zipf``). ``aux_options.form`` says how the term is scaled:

* ``"openai"`` (Gao et al. 2024, ``openai/sparse_autoencoder``; sparsify the same, with the
  factor below): ``aux_coeff * ||e_aux - e||^2 / ||e - mean(e)||^2`` with ``e`` detached,
  i.e. the NMSE of the residual: the term keeps its size as the residual shrinks.
* ``"saelens"`` (SAELens's TopK and BatchTopK training SAEs, ``calculate_topk_aux_loss``):
  ``aux_coeff * min(n_dead / aux_k, 1) * mean_tokens sum_d (e_aux - e)^2`` with ``e``
  detached, the top dead pre-activations taken as they are (not ReLU'd), no variance
  normalisation (SAELens's own defaults: ``aux_coeff`` 1, ``aux_k``
  = d_in / 2, on its plain-MSE reconstruction loss). saekit reduces the squared error like
  the SAE's reconstruction loss, so with ``recon_loss="mse"`` it is SAELens's term exactly.
* ``"bussmann"`` (BatchTopK's code, ``bartbussmann/BatchTopK``, and top-AFA's,
  ``SewoongLee/top-afa-sae``): ``aux_penalty * mean((e_aux - e)^2)`` with ``e`` *not*
  detached, on a plain-MSE reconstruction loss. saekit reduces the squared error the way the
  SAE's reconstruction loss does (same denominator), so the ratio of the aux term to the
  reconstruction term is exactly theirs for either ``recon_loss``.
* ``"auto"`` (default): the rule's ``aux_form`` (its paper's code, or where a rule
  chose otherwise on measurements, that choice; see each rule).

To add an aux loss, write one module in this package with a ``@register_aux`` subclass of
:class:`AuxLoss` (or in a plugin module, :mod:`saekit.plugins`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from saekit import kernels
from saekit.distributed.comm import LOCAL, Comm
from saekit.errors import ConfigError
from saekit.losses.recon import nmse, scaled_like_recon
from saekit.options import Options, from_dict, option
from saekit.plugins import registered, registered_names

if TYPE_CHECKING:
    from saekit.config import SAEConfig
    from saekit.rules.base import Rule
    from saekit.sae import SAE, SAEOutput

FORMS = ("openai", "bussmann", "saelens")


@dataclass
class AuxOptions(Options):
    """Options of an aux loss (``SAEConfig.aux_options``)."""

    form: str = option(
        "auto",
        "openai | bussmann | saelens | auto (the rule's default); see saekit.losses.aux",
        choices=("auto", *FORMS),
    )


def parse_options(cls: type, raw: Any, what: str) -> Any:
    """``raw`` as ``cls`` (names and types checked); a ConfigError names ``what``."""
    return from_dict(cls, {} if raw is None else raw, where=what)  # types and names checked


class AuxLoss:
    """Base class: an aux-k loss over :meth:`candidates`, scaled per ``form``."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = AuxOptions

    def __init__(self, cfg: SAEConfig, rule: Rule) -> None:
        self.opts = parse_options(self.Options, cfg.aux_options, f"aux_options for aux={self.name}")
        form = self.opts.form if self.opts.form != "auto" else rule.aux_form
        if form not in FORMS:
            raise ConfigError(
                f"aux_options.form={form!r} (aux={self.name}, rule={rule.name}); use"
                f" {', '.join(FORMS)} or auto"
            )
        self.form = form
        self.signed = rule.signed

    def candidates(self, sae: SAE) -> tuple[Tensor, Tensor | None]:
        """``[d_sae]`` bool mask of the latents the loss may use, and optional weights."""
        raise NotImplementedError

    def __call__(self, sae: SAE, out: SAEOutput, target: Tensor | None = None) -> Tensor:
        """The weighted term (``aux_coeff`` included); ``target``: what ``out`` reconstructs,
        in SAE units (None: ``out.x``; a transcoder's target site)."""
        cand, weights = self.candidates(sae)
        y = out.x if target is None else target
        if self.form == "openai":
            residual, scale_like = y - out.x_hat_n.detach(), None
        elif self.form == "saelens":
            residual, scale_like = y - out.x_hat_n.detach(), (sae.recon_kind, y)
        else:
            residual, scale_like = y - out.x_hat_n, (sae.recon_kind, y)
        pre = None if out.pre is None else out.pre if out.pre.requires_grad else out.pre.detach()
        loss = aux_k_loss(
            out.x_in,
            sae.W_enc,
            sae.b_enc,
            sae.W_dec,
            pre,
            residual,
            cand,
            sae.cfg.aux_k,
            weights,
            signed=self.signed,
            scale_like=scale_like,
            comm=sae.comm,
            latents=sae.rule.aux_latents(out),
            chunk=sae.cfg.encoder_chunk,
            few_candidates_scale=self.form == "saelens",
            relu=self.form != "saelens",
        )
        return sae.cfg.aux_coeff * loss


def aux_k_loss(
    x_in: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    pre: Tensor | None,
    residual: Tensor,
    candidates: Tensor,
    k_aux: int,
    weights: Tensor | None = None,
    signed: bool = False,
    scale_like: tuple[str, Tensor] | None = None,
    comm: Comm = LOCAL,
    latents: Tensor | None = None,
    chunk: int = 0,
    few_candidates_scale: bool = False,
    relu: bool = True,
) -> Tensor:
    """Gao et al.'s aux-k: reconstruct ``residual`` from the top-``k_aux`` candidates.

    ``latents [B, d_sae]`` (with grad; ``Rule.aux_latents``): the rule's own latent values
    (e.g. the vSAE's sampled ``z``) from which the candidates are ranked (``|.|`` when
    ``signed``) and taken, instead of the (ReLU'd) pre-activations.

    ``candidates [d_sae]`` (bool) are the latents allowed; ``weights [d_sae]`` optionally
    scale each latent's value. Returns the NMSE of the residual (``scale_like`` None: its own
    variance as denominator), or ``sum((e_aux - residual)^2)`` scaled as ``recon_loss(kind,
    ., x)`` scales (``scale_like = (kind, x)``); 0 without candidates. With ``comm`` the
    candidates, the top-k and the reconstruction span every latent shard and the sums the
    global batch. ``pre`` None (``SAEConfig.encoder_chunk``): the candidates'
    pre-activations are computed ``chunk`` latents at a time. ``few_candidates_scale``: the
    result is multiplied by ``min(n_candidates / k_aux, 1)`` (SAELens, sparsify). ``relu``
    False: the selected values are used as they are, negative ones too (SAELens).
    """
    n = int(comm.latent_sum(candidates.sum()))
    if n == 0 or k_aux <= 0:
        return residual.new_zeros(())
    k = min(k_aux, n)
    ranked = latents if latents is not None else pre  # what the candidates are ranked by
    sel = None
    if ranked is None:
        cols = candidates.nonzero(as_tuple=True)[0]
        with torch.no_grad():
            sel, idx = kernels.chunked_row_topk(
                x_in, W_enc, b_enc, k, max(chunk, 1), cols=cols, absolute=signed
            )
        mask = None
    elif comm.latent_world == 1:  # no [B, d_sae] score tensor (see kernels.masked_row_topk)
        assert ranked is not None
        idx = kernels.masked_row_topk(ranked.detach(), candidates, k, absolute=signed)
        mask = None
    else:
        assert ranked is not None
        score = (ranked.abs() if signed else ranked).detach()
        score = torch.where(candidates, score, torch.full_like(score, float("-inf")))
        idx, mask = comm.topk(score, k)
    if latents is not None:
        vals = latents.gather(1, idx)
    else:
        vals = kernels.sparse_encode(x_in, W_enc, b_enc, idx, pre, selected=sel)
    if relu and not signed:
        vals = torch.relu(vals)
    if weights is not None:
        vals = vals * weights[idx]
    if mask is not None:
        vals = vals * mask.to(vals.dtype)
    aux_hat = comm.latent_sum(kernels.sparse_decode(idx, vals, W_dec))
    if scale_like is None:
        return nmse(aux_hat, residual, comm).nan_to_num(0.0)
    kind, x = scale_like
    loss = scaled_like_recon(kind, (aux_hat - residual).pow(2).sum(), x, comm).nan_to_num(0.0)
    return loss * min(n / k_aux, 1.0) if few_candidates_scale else loss


_AUX: dict[str, type[AuxLoss]] = {}


def register_aux(cls: type[AuxLoss]) -> type[AuxLoss]:
    """Class decorator: make an aux loss available as ``SAEConfig.aux = cls.name``."""
    if not cls.name or cls.name == "none":
        raise ValueError(f"{cls.__name__} needs a name other than 'none'")
    old = _AUX.get(cls.name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"aux loss {cls.name!r} registered twice")
    _AUX[cls.name] = cls
    return cls


def aux_names() -> list[str]:
    """Registered aux losses (``"none"`` turns the aux loss off)."""
    return registered_names(_AUX)


def get_aux_class(name: str) -> type[AuxLoss]:
    cls = registered(_AUX, name)
    if cls is None:
        raise ConfigError(
            f"unknown aux loss {name!r} (SAEConfig.aux / --aux); known: none,"
            f" {', '.join(aux_names())}"
        )
    return cls


def build_aux(cfg: SAEConfig, rule: Rule) -> AuxLoss | None:
    """The aux loss of an SAE, or None when it is off (``aux="none"``, ``aux_coeff`` or
    ``aux_k`` 0, or a rule with ``uses_aux=False``). The name is checked in every case."""
    cls = None if cfg.aux == "none" else get_aux_class(cfg.aux)
    if cls is None or not rule.uses_aux or cfg.aux_coeff <= 0 or cfg.aux_k <= 0:
        return None
    return cls(cfg, rule)


#: Gao et al.'s dead window (10M tokens): the cap of the automatic window, and the window of
#: an SAE with ``dead_tokens=0`` used outside a trainer
DEAD_TOKENS_MAX = 10_000_000
#: the automatic window's share of the run [our choice; the bench used it before]
DEAD_TOKENS_FRACTION = 0.05


def auto_dead_tokens(total_tokens: int, batch_size: int) -> int:
    """The dead window of a run with ``dead_tokens=0``: 5% of its tokens, at least one batch,
    at most 10M [our choice]. Gao et al.'s fixed 10M never triggers in runs shorter than
    that (saekit's default run is 2M tokens); BatchTopK's code uses 5 batches."""
    return int(min(DEAD_TOKENS_MAX, max(batch_size, round(DEAD_TOKENS_FRACTION * total_tokens))))


@register_aux
class AuxK(AuxLoss):
    """aux-k (Gao et al. 2024): the candidates are the dead latents (``SAE.dead_latents``)."""

    name = "auxk"

    def candidates(self, sae: SAE) -> tuple[Tensor, Tensor | None]:
        return sae.dead_latents(), None
