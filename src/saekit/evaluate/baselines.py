"""Floors for every metric: a random-decoder SAE and PCA at the same L0.

* :func:`random_sae`: same config, random unit decoder rows (seeded), encoder = decoder^T,
  ``b_enc`` = 0, and the trained SAE's ``b_dec`` and ``input_scale`` (so the baseline
  centres inputs as the trained one does: our choice). Rules with learned state (e.g.
  BatchTopK's threshold, JumpReLU's thresholds) would carry meaningless values for a
  random dictionary, so for those the baseline uses the ``topk`` rule with
  k = round(measured L0 of the trained SAE); state-free rules keep the same rule and k.
  With these fixed weights the scale of the codes is not fitted, so shrinkage metrics of
  this baseline are pessimistic by construction. Architecture parts other than the wiring
  (Matryoshka, Gated) are dropped [our choice: the baseline is a random plain dictionary];
  a transcoder's (``d_out != d_in``) gets an independent random unit encoder.
* :class:`PCABaseline`: mean μ and the top-r principal directions U ``[r, d]`` of fit
  tokens (streaming covariance in float64); ``x̂ = μ + (x − μ) Uᵀ U``; codes are the r
  projections (L0 = r). r = round(L0 of the trained SAE), clipped to [1, d].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from saekit.config import SAEConfig
from saekit.errors import ConfigError, DataError
from saekit.sae import SAE, Codes


def _rule_has_state(sae: SAE) -> bool:
    return any(True for _ in sae.rule.parameters()) or any(True for _ in sae.rule.buffers())


@torch.no_grad()
def random_sae(sae: SAE, seed: int = 0, l0: float | None = None) -> SAE:
    """Random-decoder SAE matching ``sae`` (see the module docstring)."""
    from saekit.arch import get_arch_class

    cfg: SAEConfig = dataclasses.replace(sae.cfg, rule_options=dict(sae.cfg.rule_options))
    wiring = [a for a in cfg.arch if get_arch_class(a).stage == "wiring"]
    if wiring != list(cfg.arch):
        keep = {f.name for a in wiring for f in dataclasses.fields(get_arch_class(a).Options)}
        opts = {k: v for k, v in cfg.arch_options.items() if k in keep}
        cfg = dataclasses.replace(cfg, arch=wiring, arch_options=opts)
    if _rule_has_state(sae):
        if l0 is None:
            raise ConfigError(f"rule {cfg.rule!r} has learned state: pass the measured l0")
        cfg = dataclasses.replace(cfg, rule="topk", k=max(1, round(l0)), rule_options={})
    base = SAE(cfg)
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(cfg.d_sae, sae.d_out, generator=g, dtype=torch.float64)
    W = (W / W.norm(dim=1, keepdim=True)).to(sae.W_dec.dtype)
    base.W_dec.copy_(W)
    if sae.d_out != sae.d_in:
        W = torch.randn(cfg.d_sae, sae.d_in, generator=g, dtype=torch.float64)
        W = (W / W.norm(dim=1, keepdim=True)).to(sae.W_dec.dtype)
    base.W_enc.copy_(W.t())
    base.b_enc.zero_()
    base.b_dec.copy_(sae.b_dec)
    base.input_scale.copy_(sae.input_scale)
    own = dict(sae.arch.named_buffers())  # scales of the kept parts (a transcoder's output's)
    for name, buf in base.arch.named_buffers():
        if name in own:
            buf.copy_(own[name])
    base.to(sae.W_dec.device)
    base.train(False)
    return base


@dataclasses.dataclass
class _PCAOut:
    x_hat: Tensor
    codes: Codes


class PCABaseline:
    """PCA reconstruction with ``r`` components; call like an SAE: ``pca(x).x_hat``."""

    def __init__(self, d_in: int, r: int) -> None:
        if not 1 <= r <= d_in:
            raise ConfigError(f"PCA rank must be in [1, {d_in}], got {r}")
        self.d_in, self.r = d_in, r
        self.n = 0
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)
        self.sum_xx = torch.zeros(d_in, d_in, dtype=torch.float64)
        self.mean: Tensor | None = None
        self.U: Tensor | None = None  # [r, d]
        self.explained: Tensor | None = None

    @property
    def d_sae(self) -> int:
        return self.r

    @torch.no_grad()
    def partial_fit(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, self.d_in).double().cpu()
        self.n += x.shape[0]
        self.sum_x += x.sum(0)
        self.sum_xx += x.T @ x

    @torch.no_grad()
    def finish(self) -> PCABaseline:
        if self.n < 2:
            raise DataError("PCA needs at least two fit tokens")
        mu = self.sum_x / self.n
        cov = (self.sum_xx - self.n * torch.outer(mu, mu)) / (self.n - 1)
        evals, evecs = torch.linalg.eigh(cov)
        order = torch.argsort(evals, descending=True)[: self.r]
        self.mean, self.U = mu, evecs[:, order].T.contiguous()
        self.explained = evals[order]
        return self

    def fit(self, batches: Iterable[Tensor]) -> PCABaseline:
        for x in batches:
            self.partial_fit(x)
        return self.finish()

    @torch.no_grad()
    def __call__(self, x: Tensor) -> _PCAOut:
        if self.U is None or self.mean is None:
            raise RuntimeError("PCABaseline used before fit()/finish()")
        shape, dt = x.shape, x.dtype
        xc = x.detach().reshape(-1, self.d_in).double().cpu() - self.mean
        proj = xc @ self.U.T  # [N, r]
        x_hat = (self.mean + proj @ self.U).to(dt).reshape(shape)
        return _PCAOut(x_hat=x_hat, codes=Codes(self.r, dense=proj.float()))

    def train(self, mode: bool = True) -> PCABaseline:  # SAE-like no-op
        return self

    @property
    def training(self) -> bool:
        return False


def pca_rank(l0: float, d_in: int) -> int:
    """round(l0) clipped to [1, d_in]."""
    return int(min(max(round(l0), 1), d_in))


def fit_pca(batches: Iterable[Tensor], d_in: int, l0: float) -> PCABaseline:
    """PCA at the SAE's L0 fitted on ``batches``."""
    return PCABaseline(d_in, pca_rank(l0, d_in)).fit(batches)


def baseline_names() -> list[str]:
    return ["random", "pca"]


def describe(pca: PCABaseline | None, rnd: SAE | None) -> dict[str, Any]:
    """Short description of the baselines used (for the report)."""
    out: dict[str, Any] = {}
    if pca is not None:
        out["pca"] = {"rank": pca.r, "fit_tokens": pca.n}
    if rnd is not None:
        out["random"] = {"rule": rnd.cfg.rule, "k": rnd.cfg.k, "d_sae": rnd.d_sae}
    return out
