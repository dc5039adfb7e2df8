"""Acausal crosscoders (Lindsey, Templeton, Marcus, Conerly, Batson, Olah 2024).

One encoder reads the concatenated activations of several sites (``sites``: layers of one
model, or one layer of two models for model diffing, when a source names both, e.g. a cache
or a :class:`~saekit.sources.base.MemorySource` with sites ``base.l3`` and ``chat.l3``);
the decoder writes into each of them: ``W_dec [d_sae, Σ_l d_l]`` is the blocks
``W_dec^l [d_sae, d_l]`` side by side, so ``x̂^l = b_dec^l + Σ_i f_i W_dec^l_i`` and the
reconstruction loss is summed over the sites (the SAE's loss on the concatenation).

* Any rule selects the latents from the shared pre-activations.
* Norm-weighted penalties (the ``relu`` rule's L1 with ``weight_by_decoder_norm``) use the
  paper's ``Σ_l ||W_dec^l_i||`` per latent (:meth:`SAE.decoder_norms`), summed over sites.
* ``saekit eval`` reports the FVE of each site (section ``crosscoder``).
* One SAE is planned, at the first of ``sites`` (every listed site must come from the
  source; other sites of the run get no SAE).
* ``site_widths``: each site's width; empty: ``d_in`` split equally [our choice: layers of
  one model, or two models of one family]; the trainer checks the split against the data.
* Input normalisation is the SAE's single scale over the concatenation [our choice; the
  paper normalises each layer, which differs when the sites' norms differ a lot].

SAELens has no crosscoder class: the run directory is saekit's only (``load_sae``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from saekit.arch.base import ArchPart, register_arch
from saekit.errors import ConfigError, FormatError
from saekit.options import Options, option

if TYPE_CHECKING:
    from saekit.rules.base import SAELensExport
    from saekit.sae import SAE, SAEOutput


@dataclass
class CrosscoderOptions(Options):
    """Options of crosscoders (``--arch-options``)."""

    sites: list[str] = option(help="the sites read and reconstructed, in order", nonempty=True)
    site_widths: list[int] = option([], "width of each site ([]: d_in split equally)")


def site_widths(opts: CrosscoderOptions, d_in: int) -> list[int]:
    """Each site's width: ``site_widths`` or ``d_in`` split equally (a ConfigError when the
    split does not add up)."""
    n = len(opts.sites)
    w = list(opts.site_widths) or ([d_in // n] * n if d_in % n == 0 else [])
    if len(w) != n or sum(w) != d_in or min(w) < 1:
        raise ConfigError(
            f"arch_options.site_widths={list(opts.site_widths)}: crosscoder sites {opts.sites}"
            f" need one width each, adding up to d_in={d_in}; give site_widths (--arch-options"
            " '{\"site_widths\": [...]}')"
        )
    return w


@register_arch
class Crosscoder(ArchPart):
    """Encoder over concatenated sites, a decoder block into each; see the module docstring."""

    name = "crosscoder"
    stage = "wiring"
    Options = CrosscoderOptions

    def __init__(self, cfg, opts: CrosscoderOptions) -> None:
        super().__init__(cfg, opts)
        if len(set(opts.sites)) != len(opts.sites):
            raise ConfigError(f"arch_options.sites={opts.sites}: each site once")
        self.widths = site_widths(opts, cfg.d_in)

    @classmethod
    def sites(cls, opts: CrosscoderOptions, site: str) -> tuple[list[str], list[str]]:
        return list(opts.sites), list(opts.sites)

    @classmethod
    def plan_sites(cls, opts: CrosscoderOptions, sites: list[str]) -> list[str]:
        return [opts.sites[0]]

    @classmethod
    def check_widths(cls, opts: CrosscoderOptions, ins: list[int], outs: list[int]) -> None:
        if site_widths(opts, sum(ins)) != ins:
            raise ConfigError(
                f"crosscoder sites {opts.sites} have widths {ins} in the data, not"
                f" {site_widths(opts, sum(ins))}; set arch_options.site_widths to {ins}"
            )

    def blocks(self, t: Tensor) -> list[Tensor]:
        """``t [..., Σ d_l]`` split into the sites' blocks."""
        return list(torch.split(t, self.widths, dim=-1))

    def decoder_norms(self, sae: SAE) -> Tensor:
        return torch.stack([b.norm(dim=1) for b in self.blocks(sae.W_dec)]).sum(0)

    def saelens_export(self, sae: SAE, exp: SAELensExport, weights: dict[str, Tensor]) -> None:
        raise FormatError(
            "SAELens has no crosscoder class; use the saekit run directory with saekit.io.load_sae"
        )

    def eval_accumulators(self, sae: SAE) -> dict[str, Any]:
        return {"crosscoder": SiteFVE(list(self.opts.sites), self.widths)}


class SiteFVE:
    """Streaming pooled FVE of each site's block of the reconstruction (raw units)."""

    def __init__(self, sites: list[str], widths: list[int]) -> None:
        self.sites, self.widths = sites, widths
        n = len(sites)
        self.err, self.sq = np.zeros(n), np.zeros(n)
        self.sum: list[Tensor] | None = None
        self.n = 0

    @torch.no_grad()
    def update(self, sae: SAE, x: Tensor, target: Tensor, out: SAEOutput) -> None:
        y = torch.split(target.reshape(-1, target.shape[-1]).double(), self.widths, -1)
        p = torch.split(out.x_hat.reshape(-1, out.x_hat.shape[-1]).double(), self.widths, -1)
        sums = [b.sum(0) for b in y]
        self.sum = sums if self.sum is None else [a + b for a, b in zip(self.sum, sums)]
        for i, (yb, pb) in enumerate(zip(y, p)):
            self.err[i] += float((yb - pb).pow(2).sum())
            self.sq[i] += float(yb.pow(2).sum())
        self.n += y[0].shape[0]

    def result(self) -> dict[str, Any]:
        fve: dict[str, float] = {}
        if self.n and self.sum is not None:
            for i, s in enumerate(self.sites):
                var = self.sq[i] - float(self.sum[i].pow(2).sum()) / self.n
                fve[s] = 1 - self.err[i] / var if var > 0 else float("nan")
        rows = {f"FVE at site {s}": v for s, v in fve.items()}
        return {
            "sites": self.sites,
            "widths": self.widths,
            "site_fve": fve,
            "n_tokens": self.n,
            "headline": rows,
        }
