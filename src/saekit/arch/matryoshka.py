"""Matryoshka SAEs (Bussmann, Nabeshima, Karvonen, Nanda 2025; Nabeshima 2024): nested
prefixes of the dictionary each reconstruct the target.

The codes ``f`` come from the SAE's rule over the whole dictionary, as in the reference
code (dictionary_learning's ``MatryoshkaBatchTopKTrainer``, SAELens's
``matryoshka_batchtopk``), so any rule works: TopK, BatchTopK, Feature Choice, JumpReLU,
AbsTopK... The prefix of width ``m`` reconstructs ``x̂_m = b_dec + Σ_{i<m} f_i W_dec[i]`` (plus
a transcoder's skip term) and the loss is ``Σ_g w_g recon(x̂_{m_g}, x)`` over the prefixes
``m_1 < ... < m_G = d_sae``, each scaled like the SAE's reconstruction loss. The full prefix
is the SAE's own ``recon`` term; the others are logged as ``recon_m<width>``.

* ``widths``: the prefix widths; empty: ``d_sae/16, d_sae/4, d_sae`` [our choice]; ``d_sae``
  is appended when missing (SAELens does the same).
* ``weights``: ``w_g``; empty: 1 each, the papers' sum (and SAELens's); dictionary_learning
  uses ``1/G`` each.
* ``sample``: Nabeshima's variant: each training step draws ``sample`` prefix widths below
  ``d_sae`` (without replacement, from his truncated Pareto law with ``pareto_power``, at
  least ``min_width``) plus ``d_sae``, weight 1 each [our choice: the sum, like the fixed
  widths; he averages]. Evaluation reports the fixed ``widths``.

The aux loss is the SAE's (aux-k on the full residual; SAELens's optional per-level aux is not
implemented). Inference is the rule's own, so SAELens loads the SAE as the rule's inference
architecture (``jumprelu`` for BatchTopK, SAELens's own choice for Matryoshka BatchTopK);
the widths are recorded in the metadata (``matryoshka_widths``). ``saekit eval`` reports the
FVE of every prefix (section ``matryoshka``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from saekit import kernels
from saekit.arch.base import ArchPart, SAELensImport, register_arch
from saekit.errors import ConfigError
from saekit.losses import recon_loss
from saekit.options import Options, option

if TYPE_CHECKING:
    from saekit.rules.base import Context, SAELensExport
    from saekit.sae import SAE, Codes, SAEOutput


@dataclass
class MatryoshkaOptions(Options):
    """Options of Matryoshka SAEs (``--arch-options``)."""

    widths: list[int] = option([], "prefix widths ([]: d_sae/16, d_sae/4, d_sae)")
    weights: list[float] = option([], "per-prefix loss weights ([]: 1 each, the papers' sum)")
    sample: int = option(0, ">0: this many widths below d_sae drawn per step (Nabeshima)", ge=0)
    pareto_power: float = option(0.5, "Nabeshima's truncated-Pareto exponent", gt=0)
    min_width: int = option(1, "smallest sampled width", ge=1)


def resolve_widths(widths: list[int], d_sae: int) -> list[int]:
    """Strictly increasing prefix widths ending at ``d_sae`` (empty: ``d_sae/16, /4, d_sae``)."""
    w = list(widths) or sorted({max(d_sae // 16, 1), max(d_sae // 4, 1)} - {d_sae})
    if not w or w[-1] != d_sae:
        w.append(d_sae)
    bad = [m for m in w if m < 1 or m > d_sae]
    if bad or any(a >= b for a, b in zip(w, w[1:])):
        raise ConfigError(
            f"arch_options.widths={list(widths)}: prefix widths must be strictly increasing,"
            f" between 1 and d_sae={d_sae}; e.g. [{max(d_sae // 16, 1)}, {max(d_sae // 4, 1)}]"
        )
    return w


def pareto_widths(d_sae: int, n: int, power: float, min_width: int) -> list[int]:
    """``n`` distinct widths in ``[min_width, d_sae)`` drawn without replacement from
    Nabeshima's truncated Pareto law, ``P(w) ∝ ((w - a + 1)/s)^p - ((w - a)/s)^p`` with
    ``a = min_width``, ``s = d_sae - a + 1``, ``p = power`` (small widths likelier for
    ``p < 1``), plus ``d_sae``; torch's global generator (checkpointed: resume is exact)."""
    span = d_sae - min_width + 1
    u = (torch.arange(span, dtype=torch.float64) / span) ** power
    pdf = torch.cat([torch.zeros(min_width, dtype=torch.float64), u[1:] - u[:-1]])[:d_sae]
    n = min(n, int((pdf > 0).sum()))
    if n <= 0:
        return [d_sae]
    picked = torch.multinomial(pdf, n, replacement=False)
    return sorted(int(m) for m in picked) + [d_sae]


def prefix_codes(codes: Codes, lo: int, hi: int) -> Codes:
    """``codes`` with every latent outside ``[lo, hi)`` set to 0 (same layout)."""
    from saekit.sae import Codes

    if codes.is_sparse:
        assert codes.indices is not None and codes.values is not None
        keep = (codes.indices >= lo) & (codes.indices < hi)
        return Codes(codes.d_sae, values=codes.values * keep, indices=codes.indices)
    assert codes.dense is not None
    dense = torch.zeros_like(codes.dense)
    dense[:, lo:hi] = codes.dense[:, lo:hi]
    return Codes(codes.d_sae, dense=dense)


def prefix_reconstructions(sae: SAE, codes: Codes, widths: list[int], base: Tensor) -> list[Tensor]:
    """``x̂_m`` in SAE units for each width: ``base`` (``b_dec`` plus any skip term) plus the
    decoded contribution of latents ``< m``; built block by block (each latent decoded once)."""
    out, acc, lo = [], base, 0
    for m in widths:
        blk = prefix_codes(codes, lo, m)
        if blk.is_sparse:
            assert blk.indices is not None and blk.values is not None
            dec = kernels.sparse_decode(blk.indices, blk.values, sae.W_dec)
        else:
            assert blk.dense is not None
            dec = blk.dense[:, lo:m] @ sae.W_dec[lo:m]
        acc = acc + dec
        out.append(acc)
        lo = m
    return out


@register_arch
class Matryoshka(ArchPart):
    """Nested-prefix reconstruction losses; see the module docstring."""

    name = "matryoshka"
    stage = "objective"
    Options = MatryoshkaOptions

    def __init__(self, cfg, opts: MatryoshkaOptions) -> None:
        super().__init__(cfg, opts)
        self.widths = resolve_widths(opts.widths, cfg.d_sae)
        if opts.weights and len(opts.weights) != len(self.widths):
            raise ConfigError(
                f"arch_options.weights has {len(opts.weights)} entries for the"
                f" {len(self.widths)} prefixes {self.widths}; give one weight per prefix"
            )
        if opts.sample and opts.weights:
            raise ConfigError("arch_options: sampled widths (sample > 0) take no weights")
        if opts.sample < 0 or not 1 <= opts.min_width < cfg.d_sae or opts.pareto_power <= 0:
            raise ConfigError(
                "arch_options: sample >= 0, 1 <= min_width < d_sae and pareto_power > 0 needed"
            )

    def step_widths(self, training: bool) -> list[int]:
        """The prefixes of this step: sampled while training with ``sample``, else fixed."""
        o = self.opts
        if training and o.sample > 0:
            return pareto_widths(self.cfg.d_sae, o.sample, o.pareto_power, o.min_width)
        return self.widths

    def _base(self, sae: SAE, out: SAEOutput) -> Tensor:
        """``x̂`` minus the decoded latents: ``b_dec`` plus any skip term, per token."""
        extra = sae.arch.decode_extra(sae, out.x)
        b = sae.b_dec.expand(out.x_hat_n.shape)
        return b if extra is None else b + extra

    def loss_terms(
        self, sae: SAE, out: SAEOutput, ctx: Context, target: Tensor
    ) -> dict[str, Tensor]:
        if sae.comm.latent_world > 1:
            raise ConfigError("arch matryoshka cannot be latent-sharded: use --strategy ddp")
        widths = self.step_widths(ctx.training)
        weights = self.opts.weights or [1.0] * len(widths)
        kind = sae.recon_kind
        terms: dict[str, Tensor] = {}
        preds = prefix_reconstructions(sae, out.codes, widths[:-1], self._base(sae, out))
        for m, w, pred in zip(widths, weights, preds):
            terms[f"recon_m{m}"] = w * recon_loss(kind, pred, target, sae.comm)
        if weights[-1] != 1.0:
            terms["recon"] = weights[-1] * recon_loss(kind, out.x_hat_n, target, sae.comm)
        return terms

    def saelens_export(self, sae: SAE, exp: SAELensExport, weights: dict[str, Tensor]) -> None:
        exp.cfg["matryoshka_widths"] = list(self.widths)  # SAELens's training-cfg field

    @classmethod
    def from_saelens(cls, cfg: dict[str, Any], weights: dict[str, Tensor]) -> SAELensImport | None:
        """``matryoshka_widths`` (a SAELens training cfg's field, which its inference saves
        keep in ``metadata.training_architecture_details``); SAELens's training architecture
        ``matryoshka_batchtopk`` is then the ``batchtopk`` rule's."""
        meta = cfg.get("metadata") or {}
        details = meta.get("training_architecture_details") or {}
        widths = cfg.get("matryoshka_widths") or details.get("matryoshka_widths")
        if not widths:
            return None
        if cfg.get("architecture") == "matryoshka_batchtopk":
            cfg = {**cfg, "architecture": "batchtopk"}
        return SAELensImport({"widths": [int(w) for w in widths]}, cfg, weights)

    def eval_accumulators(self, sae: SAE) -> dict[str, Any]:
        return {"matryoshka": PrefixFVE(self.widths)}


class PrefixFVE:
    """Streaming pooled FVE of each prefix reconstruction (raw units; see evaluate.core)."""

    def __init__(self, widths: list[int]) -> None:
        self.widths = list(widths)
        self.err = np.zeros(len(widths))
        self.sq = 0.0
        self.sum: Tensor | None = None
        self.n = 0

    @torch.no_grad()
    def update(self, sae: SAE, x: Tensor, target: Tensor, out: SAEOutput) -> None:
        base = sae.arch["matryoshka"]._base(sae, out)
        preds = prefix_reconstructions(sae, out.codes, self.widths, base)
        y = target.reshape(-1, target.shape[-1]).double()
        for i, p in enumerate(preds):
            p = sae._to_raw_units(p, x).double()
            self.err[i] += float((y - p).pow(2).sum())
        self.sq += float(y.pow(2).sum())
        s = y.sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.n += y.shape[0]

    def result(self) -> dict[str, Any]:
        if not self.n or self.sum is None:
            return {"widths": self.widths, "prefix_fve": {}, "n_tokens": 0}
        var = self.sq - float(self.sum.pow(2).sum()) / self.n
        nan = float("nan")
        fve = {str(m): 1 - e / var if var > 0 else nan for m, e in zip(self.widths, self.err)}
        d = self.widths[-1]
        rows = {f"FVE of the prefix {m}/{d}": fve[str(m)] for m in self.widths[:-1]}
        return {"widths": self.widths, "prefix_fve": fve, "n_tokens": self.n, "headline": rows}
