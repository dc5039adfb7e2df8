"""Core reconstruction and sparsity metrics, as pure functions and a streaming accumulator.

Definitions (``x`` input, ``x̂`` reconstruction, ``a`` codes; sums over tokens ``t``):

* ``l0``: mean over tokens of #{f: a_f != 0} (negative codes count: signed rules).
* ``l1``: mean over tokens of Σ_f |a_f| (|·| so that signed codes do not cancel).
* ``fve`` (pooled, mean-centred): 1 − Σ_t‖x−x̂‖² / Σ_t‖x−μ‖², μ the mean over *all* eval
  tokens. Streaming-exact: Σ‖x−μ‖² = Σ‖x‖² − N‖μ‖². ``fvu`` = 1 − ``fve``.
* ``fve_legacy``: SAEBench/Neuronpedia's per-token variant, mean over tokens of
  1 − ‖x−x̂‖²/‖x−μ_batch‖², μ_batch the mean of the batch given to ``update`` (so it depends
  on the eval batch size; reported only for comparison).
* ``nmse``: mean over tokens of ‖x−x̂‖² / ‖x‖², OpenAI's normalised MSE
  (``openai/sparse_autoencoder``'s ``normalized_mean_squared_error``: a per-token ratio,
  *not* mean-centred). ``nmse_pooled``: Σ‖x−x̂‖² / Σ‖x‖², the same ratio pooled over tokens.
* ``mse``: mean over tokens of ‖x−x̂‖² (summed over dims; never divided by a batch size).
* ``cos``: mean over tokens of cos(x, x̂). ``l2_ratio``: mean ‖x̂‖/‖x‖.
* ``rel_bias``: E‖x̂‖² / E⟨x, x̂⟩ (Gated-SAE paper, eq. 10; 1 = no shrinkage).
* density of latent f: fraction of tokens with a_f != 0; ``dead_frac``: density 0 (no firing
  on any eval token: ``SAE.dead_latents``'s predicate with the eval tokens as its window;
  ``saekit eval`` also reports ``dead_frac_train``, the training-time figure);
  ``dense_frac``: density > ``dense_threshold`` (0.1 by default, SAEBench's
  ``freq_over_10_percent``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from saekit.distributed.comm import LOCAL, Comm
from saekit.errors import DataError
from saekit.sae import Codes

#: edges of the log10-density histogram (dead latents are counted apart)
DENSITY_EDGES = [x / 4 for x in range(-32, 1)]  # 1e-8 .. 1 in quarter decades


def _f64(x: Tensor) -> Tensor:
    return x.detach().reshape(-1, x.shape[-1]).to(torch.float64)


def as_codes(codes: Codes | Tensor) -> Codes:
    """Wrap a dense ``[N, d_sae]`` tensor as :class:`Codes` (Codes pass through)."""
    if isinstance(codes, Codes):
        return codes
    if codes.dim() != 2:
        raise DataError(f"dense codes must be [N, d_sae], got shape {tuple(codes.shape)}")
    return Codes(codes.shape[1], dense=codes)


# ---------------------------------------------------------------------- pure functions
def fve(x: Tensor, x_hat: Tensor, comm: Comm = LOCAL) -> float:
    """Pooled, mean-centred fraction of variance explained over all rows of ``x`` (with
    ``comm``: of the global batch, this rank holding some of its rows)."""
    x, x_hat = _f64(x), _f64(x_hat)
    if comm.batch_world == 1:
        den = (x - x.mean(0)).pow(2).sum()
        return float(1 - (x - x_hat).pow(2).sum() / den.clamp_min(1e-300))
    mean = comm.batch_sum(x.sum(0)) / comm.n_tokens(x.shape[0])
    den = comm.batch_sum((x - mean).pow(2).sum())
    return float(1 - comm.batch_sum((x - x_hat).pow(2).sum()) / den.clamp_min(1e-300))


def fve_legacy(x: Tensor, x_hat: Tensor) -> float:
    """Legacy per-token FVE: mean_t 1 − ‖x_t−x̂_t‖²/‖x_t−μ‖² with μ the mean of ``x``."""
    x, x_hat = _f64(x), _f64(x_hat)
    den = (x - x.mean(0)).pow(2).sum(-1).clamp_min(1e-300)
    return float((1 - (x - x_hat).pow(2).sum(-1) / den).mean())


def nmse(x: Tensor, x_hat: Tensor) -> float:
    """OpenAI's normalised MSE: mean over rows of ‖x−x̂‖² / ‖x‖² (not mean-centred)."""
    x, x_hat = _f64(x), _f64(x_hat)
    return float(((x - x_hat).pow(2).sum(-1) / x.pow(2).sum(-1).clamp_min(1e-300)).mean())


def nmse_pooled(x: Tensor, x_hat: Tensor) -> float:
    """Σ‖x−x̂‖² / Σ‖x‖² over all rows (not mean-centred)."""
    x, x_hat = _f64(x), _f64(x_hat)
    return float((x - x_hat).pow(2).sum() / x.pow(2).sum().clamp_min(1e-300))


def cosine(x: Tensor, x_hat: Tensor) -> float:
    """Mean over rows of cos(x, x̂)."""
    x, x_hat = _f64(x), _f64(x_hat)
    return float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1, eps=1e-12).mean())


def l2_ratio(x: Tensor, x_hat: Tensor) -> float:
    """Mean over rows of ‖x̂‖/‖x‖."""
    x, x_hat = _f64(x), _f64(x_hat)
    return float((x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-300)).mean())


def relative_reconstruction_bias(x: Tensor, x_hat: Tensor) -> float:
    """E‖x̂‖² / E⟨x, x̂⟩."""
    x, x_hat = _f64(x), _f64(x_hat)
    return float(x_hat.pow(2).sum() / (x * x_hat).sum())


def l0(codes: Codes | Tensor) -> float:
    """Mean nonzeros per token."""
    return float(as_codes(codes).l0().double().mean())


def l1(codes: Codes | Tensor) -> float:
    """Mean over tokens of Σ_f |a_f|."""
    c = as_codes(codes)
    vals = c.dense if c.dense is not None else c.values
    assert vals is not None
    return float(vals.detach().double().abs().sum(-1).mean())


def feature_density(codes: Codes | Tensor) -> Tensor:
    """``[d_sae]`` fraction of tokens on which each latent is nonzero."""
    c = as_codes(codes)
    n = c.dense.shape[0] if c.dense is not None else c.values.shape[0]  # type: ignore[union-attr]
    return c.fire_counts().double() / max(n, 1)


def density_histogram(density: Tensor, edges: list[float] | None = None) -> dict[str, Any]:
    """Histogram of log10 density over the alive latents; dead latents counted apart."""
    edges = DENSITY_EDGES if edges is None else edges
    alive = density[density > 0]
    logd = alive.double().log10().clamp(min=edges[0], max=edges[-1])
    counts = torch.histogram(logd.float(), bins=torch.tensor(edges, dtype=torch.float32))[0]
    return {
        "log10_edges": list(edges),
        "counts": [int(c) for c in counts.tolist()],
        "dead": int((density == 0).sum()),
    }


# ---------------------------------------------------------------------- accumulator
class CoreAccumulator:
    """Streams batches of ``(x, x̂, codes)``; :meth:`result` gives every core metric exactly.

    Holds only O(d_in + d_sae) state (sums in float64), never the activations.
    """

    def __init__(self, d_in: int, d_sae: int, dense_threshold: float = 0.1) -> None:
        self.d_in, self.d_sae, self.dense_threshold = d_in, d_sae, dense_threshold
        self.n = 0
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)
        self.sum_x2 = 0.0  # Σ‖x‖²
        self.sum_err = 0.0  # Σ‖x−x̂‖²
        self.sum_xhat2 = 0.0
        self.sum_dot = 0.0
        self.sum_cos = 0.0
        self.sum_l2r = 0.0
        self.sum_nmse = 0.0  # Σ_t ‖x−x̂‖²/‖x‖²
        self.sum_legacy = 0.0
        self.sum_l0 = 0.0
        self.sum_l1 = 0.0
        self.fire_counts = torch.zeros(d_sae, dtype=torch.long)
        self.l0_counts = torch.zeros(d_sae + 1, dtype=torch.long)  # tokens per L0 value

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, codes: Codes | Tensor) -> None:
        """Add a batch: ``x``, ``x_hat`` ``[N, d_in]`` (any leading shape), codes ``[N, ...]``."""
        x, x_hat = _f64(x).cpu(), _f64(x_hat).cpu()
        if x.shape != x_hat.shape or x.shape[1] != self.d_in:
            raise DataError(
                f"x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} must both be [N, {self.d_in}]"
            )
        c = as_codes(codes)
        if c.d_sae != self.d_sae:
            raise DataError(f"codes have d_sae={c.d_sae}, expected {self.d_sae}")
        n = x.shape[0]
        if n == 0:
            return
        err = (x - x_hat).pow(2).sum(-1)
        xn, xhn = x.norm(dim=-1), x_hat.norm(dim=-1)
        self.n += n
        self.sum_x += x.sum(0)
        self.sum_x2 += float(x.pow(2).sum())
        self.sum_err += float(err.sum())
        self.sum_xhat2 += float(x_hat.pow(2).sum())
        self.sum_dot += float((x * x_hat).sum())
        self.sum_cos += float((x * x_hat).sum(-1).div((xn * xhn).clamp_min(1e-300)).sum())
        self.sum_l2r += float((xhn / xn.clamp_min(1e-300)).sum())
        self.sum_nmse += float((err / xn.pow(2).clamp_min(1e-300)).sum())
        den = (x - x.mean(0)).pow(2).sum(-1).clamp_min(1e-300)
        self.sum_legacy += float((1 - err / den).sum())
        tok_l0 = c.l0().cpu()
        self.sum_l0 += float(tok_l0.double().sum())
        vals = c.dense if c.dense is not None else c.values
        assert vals is not None
        self.sum_l1 += float(vals.detach().double().abs().sum())
        self.fire_counts += c.fire_counts().cpu().long()
        self.l0_counts += torch.bincount(tok_l0.long(), minlength=self.d_sae + 1)[: self.d_sae + 1]

    def density(self) -> Tensor:
        """``[d_sae]`` firing fraction per latent over the tokens seen."""
        return self.fire_counts.double() / max(self.n, 1)

    def result(self) -> dict[str, Any]:
        """Every core metric with ``n_tokens`` (NaN where undefined, e.g. no tokens)."""
        n = self.n
        if n == 0:
            return {"n_tokens": 0}
        mu = self.sum_x / n
        var_sum = self.sum_x2 - n * float(mu.pow(2).sum())
        fve_ = 1 - self.sum_err / var_sum if var_sum > 0 else math.nan
        dens = self.density()
        return {
            "n_tokens": n,
            "l0": self.sum_l0 / n,
            "l1": self.sum_l1 / n,
            "fve": fve_,
            "fvu": 1 - fve_,
            "fve_legacy": self.sum_legacy / n,
            "nmse": self.sum_nmse / n,
            "nmse_pooled": self.sum_err / self.sum_x2 if self.sum_x2 > 0 else math.nan,
            "mse": self.sum_err / n,
            "cos": self.sum_cos / n,
            "l2_ratio": self.sum_l2r / n,
            "rel_bias": self.sum_xhat2 / self.sum_dot if self.sum_dot != 0 else math.nan,
            "dead_frac": float((dens == 0).double().mean()),
            "dense_frac": float((dens > self.dense_threshold).double().mean()),
            "dense_threshold": self.dense_threshold,
            "n_dead": int((dens == 0).sum()),
            "density_hist": density_histogram(dens),
        }

    def l0_histogram(self) -> dict[str, list[int]]:
        """Tokens per L0 value, trimmed after the largest L0 seen."""
        nz = torch.nonzero(self.l0_counts).flatten()
        top = int(nz.max()) + 1 if nz.numel() else 1
        return {"l0": list(range(top)), "count": self.l0_counts[:top].tolist()}


@torch.no_grad()
def core_metrics(
    sae: Any, batches: Any, dense_threshold: float = 0.1, site: str | None = None
) -> tuple[dict[str, Any], CoreAccumulator]:
    """Stream ``batches`` (tensors ``[N, d_in]`` or :class:`Batch` es) through ``sae``."""
    acc = CoreAccumulator(sae.d_in, sae.d_sae, dense_threshold)
    was = sae.training
    sae.train(False)
    try:
        for b in batches:
            x = b if isinstance(b, Tensor) else b.acts[site or next(iter(b.acts))]
            out = sae(x)
            acc.update(x, out.x_hat, out.codes)
    finally:
        sae.train(was)
    return acc.result(), acc
