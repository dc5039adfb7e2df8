"""Approximate Feature Activation (AFA) diagnostics of the top-AFA paper (Lee et al. 2025).

Following the paper's ``zf-plot`` notebook: ``z`` is the dense input at the hook (the raw
activation ``x``, not centred), and ``f̃ = [a ⊙ ‖d_i‖, ‖b_dec‖]``, so ``b_dec`` is one more
atom with coefficient 1. If all atoms were ε-quasi-orthogonal,
``‖z‖²/(1+ε(h−1)) ≤ ‖f̃‖² ≤ ‖z‖²/(1−ε(h−1))`` with h the SAE width (``d_sae``; the paper's
h, we do not add the bias atom to it). Per token
``ε_LBO = |‖z‖² − ‖f̃‖²| / ((h−1)‖f̃‖²)`` is a lower bound on ε (lower is better).
With ``center=True`` (our option) ``z = x − b_dec`` and the bias atom is dropped.
Everything is in the SAE's units (inputs times ``input_scale`` when ``normalize_input``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from saekit.errors import DataError
from saekit.evaluate.core import as_codes
from saekit.sae import Codes

#: bound lines of the ZF plot: values of ε(h−1)
ZF_BOUNDS = (0.25, 0.5, 1.0)


def f_tilde_sq_norm(
    codes: Codes | Tensor, dec_norms: Tensor, b_dec: Tensor | None = None
) -> Tensor:
    """Per token ‖f̃‖² = Σ_i (a_i‖d_i‖)² (+ ‖b_dec‖² when ``b_dec`` is given)."""
    c = as_codes(codes)
    dn = dec_norms.detach().double()
    if c.dense is not None:
        s = (c.dense.detach().double() * dn).pow(2).sum(-1)
    else:
        assert c.values is not None and c.indices is not None
        s = (c.values.detach().double() * dn[c.indices]).pow(2).sum(-1)
    if b_dec is not None:
        s = s + b_dec.detach().double().pow(2).sum()
    return s


def eps_lbo(z_sq: Tensor, f_sq: Tensor, h: int) -> Tensor:
    """Per token |‖z‖² − ‖f̃‖²| / ((h−1)‖f̃‖²)."""
    if h < 2:
        raise DataError(f"eps_LBO needs a width h >= 2, got {h}")
    return (z_sq - f_sq).abs() / ((h - 1) * f_sq.clamp_min(1e-300))


def summarize(values: Tensor, prefix: str = "") -> dict[str, float]:
    """Mean, median and the 5/25/75/95 % quantiles of a 1-D tensor."""
    v = values.double().flatten()
    qs = torch.quantile(v, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64))
    return {
        f"{prefix}mean": float(v.mean()),
        f"{prefix}median": float(qs[2]),
        f"{prefix}q05": float(qs[0]),
        f"{prefix}q25": float(qs[1]),
        f"{prefix}q75": float(qs[3]),
        f"{prefix}q95": float(qs[4]),
    }


class AFAAccumulator:
    """Collects per-token (‖z‖, ‖f̃‖) (a seeded reservoir of at most ``max_points``)."""

    def __init__(self, sae: Any, center: bool = False, max_points: int = 20_000) -> None:
        self.sae, self.center, self.max_points = sae, center, max_points
        self.h = sae.d_sae
        self.z: list[Tensor] = []
        self.f: list[Tensor] = []
        self.n = 0

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        sae = self.sae
        out = sae(x)
        z = out.x_in if self.center else out.x  # SAE units
        self.update_from(z, out.codes)

    @torch.no_grad()
    def update_from(self, z: Tensor, codes: Codes | Tensor) -> None:
        """Add tokens given ``z [N, d]`` and their codes (SAE units)."""
        sae = self.sae
        b = None if self.center else sae.b_dec
        fsq = f_tilde_sq_norm(codes, sae.W_dec.norm(dim=1), b)
        zsq = z.detach().double().pow(2).sum(-1)
        self.z.append(zsq.cpu())
        self.f.append(fsq.cpu())
        self.n += zsq.shape[0]

    def result(self) -> dict[str, Any]:
        if self.n == 0:
            return {"n_tokens": 0}
        zsq, fsq = torch.cat(self.z), torch.cat(self.f)
        e = eps_lbo(zsq, fsq, self.h)
        out: dict[str, Any] = {"n_tokens": self.n, "h": self.h, "center": self.center}
        out.update(summarize(e, "eps_lbo_"))
        out["norm_ratio_mean"] = float((fsq.sqrt() / zsq.sqrt().clamp_min(1e-300)).mean())
        return out

    def points(self, seed: int = 0) -> tuple[Tensor, Tensor]:
        """(‖z‖, ‖f̃‖) of up to ``max_points`` tokens for the ZF plot."""
        zsq, fsq = torch.cat(self.z), torch.cat(self.f)
        if zsq.numel() > self.max_points:
            g = torch.Generator().manual_seed(seed)
            i = torch.randperm(zsq.numel(), generator=g)[: self.max_points]
            zsq, fsq = zsq[i], fsq[i]
        return zsq.sqrt(), fsq.sqrt()
