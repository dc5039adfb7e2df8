"""Ground-truth metrics against a known dictionary (synthetic data).

``W`` is the SAE decoder ``[d_sae, d]``, ``G`` the true dictionary ``[n_features, d]``; every
match uses |cos| (a latent with the sign flipped still tracks the feature; our choice for
signed rules, as SAELens's MCC).

* ``mcc``: one-to-one Hungarian matching on |cos| (scipy ``linear_sum_assignment``); mean
  matched |cos| over the min(d_sae, n_features) pairs (O'Neill et al.; SynthSAEBench).
* ``mmcs``: mean over true features of max over latents |cos| (Sharkey et al.).
* ``uniqueness``: #distinct best-|cos| true features over the latents / d_sae (SAELens).
* ``recovery``: fraction of true features with some latent at |cos| > ``threshold`` (0.9).
* per-latent precision / recall / F1 / accuracy: latent f is a detector of its best-|cos|
  true feature (fires: a_f != 0 vs c_g != 0); 0/0 counts as 0; averaged over all latents
  (SAELens's ``ClassificationMetricsCalculator``), and also over alive latents.
* ``absorption`` (our definition; documented here because SynthSAEBench does not define
  one): for a parent/child pair (p, c) of the hierarchy, take the Hungarian-matched
  latents l_p, l_c. On tokens where the child is active (so the parent is too), absorption
  is the fraction where l_c fires but l_p does not: the child latent has absorbed the
  parent direction. Averaged over pairs with at least ``min_support`` child-active
  tokens; pairs also reported as a count.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from saekit.errors import DataError
from saekit.evaluate.core import as_codes
from saekit.sae import Codes


def abs_cos(W: Tensor, G: Tensor) -> Tensor:
    """``[d_sae, n_features]`` |cos| between the rows of ``W`` and ``G``."""
    if W.shape[1] != G.shape[1]:
        raise DataError(f"decoder width {W.shape[1]} != true dictionary width {G.shape[1]}")
    Wn = W.detach().double() / W.detach().double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    Gn = G.detach().double() / G.detach().double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (Wn @ Gn.T).abs()


def hungarian(cos: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching maximising total |cos|: (latent indices, feature indices)."""
    rows, cols = linear_sum_assignment(-cos.cpu().numpy())
    return rows, cols


def mcc(W: Tensor, G: Tensor) -> float:
    """Mean matched |cos| under the Hungarian matching."""
    c = abs_cos(W, G)
    r, k = hungarian(c)
    return float(c[r, k].mean())


def mmcs(W: Tensor, G: Tensor) -> float:
    """Mean over true features of the best latent's |cos|."""
    return float(abs_cos(W, G).max(0).values.mean())


def uniqueness(W: Tensor, G: Tensor) -> float:
    """Distinct best-matching true features / number of latents."""
    best = abs_cos(W, G).argmax(1)
    return best.unique().numel() / W.shape[0]


def recovery(W: Tensor, G: Tensor, threshold: float = 0.9) -> float:
    """Fraction of true features recovered by some latent with |cos| > ``threshold``."""
    return float((abs_cos(W, G).max(0).values > threshold).double().mean())


def dictionary_metrics(W: Tensor, G: Tensor, threshold: float = 0.9) -> dict[str, float]:
    """MCC, MMCS, uniqueness and recovery in one pass over the |cos| matrix."""
    c = abs_cos(W, G)
    r, k = hungarian(c)
    return {
        "mcc": float(c[r, k].mean()),
        "mmcs": float(c.max(0).values.mean()),
        "uniqueness": c.argmax(1).unique().numel() / W.shape[0],
        "recovery": float((c.max(0).values > threshold).double().mean()),
        "recovery_threshold": threshold,
    }


def _fires(codes: Codes | Tensor) -> Tensor:
    c = as_codes(codes)
    return c.to_dense().detach() != 0


class DetectionAccumulator:
    """Streaming per-latent TP/FP/FN/TN against each latent's best-|cos| true feature."""

    def __init__(self, W: Tensor, G: Tensor) -> None:
        self.best = abs_cos(W, G).argmax(1).cpu()
        F = W.shape[0]
        self.tp = torch.zeros(F, dtype=torch.long)
        self.fp = torch.zeros(F, dtype=torch.long)
        self.fn = torch.zeros(F, dtype=torch.long)
        self.n = 0

    @torch.no_grad()
    def update(self, codes: Codes | Tensor, true_codes: Tensor) -> None:
        a = _fires(codes).cpu()
        g = (true_codes.detach().cpu() != 0)[:, self.best]
        self.tp += (a & g).sum(0)
        self.fp += (a & ~g).sum(0)
        self.fn += (~a & g).sum(0)
        self.n += a.shape[0]

    def result(self) -> dict[str, Any]:
        tp, fp, fn = self.tp.double(), self.fp.double(), self.fn.double()
        tn = self.n - tp - fp - fn
        prec = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), torch.zeros_like(tp))
        rec = torch.where(tp + fn > 0, tp / (tp + fn).clamp_min(1), torch.zeros_like(tp))
        f1 = torch.where(prec + rec > 0, 2 * prec * rec / (prec + rec).clamp_min(1e-300), 0 * tp)
        acc = (tp + tn) / max(self.n, 1)
        alive = (tp + fp) > 0
        out: dict[str, Any] = {
            "n_tokens": self.n,
            "precision": float(prec.mean()),
            "recall": float(rec.mean()),
            "f1": float(f1.mean()),
            "accuracy": float(acc.mean()),
        }
        out["f1_alive"] = float(f1[alive].mean()) if alive.any() else 0.0
        return out


class AbsorptionAccumulator:
    """Ground-truth absorption on parent/child pairs (see the module docstring)."""

    def __init__(
        self, W: Tensor, G: Tensor, parent: Tensor | np.ndarray | list, min_support: int = 10
    ) -> None:
        parent = torch.as_tensor(np.asarray(parent), dtype=torch.long)
        if parent.shape[0] != G.shape[0]:
            raise DataError(f"parent has {parent.shape[0]} entries, expected {G.shape[0]}")
        r, k = hungarian(abs_cos(W, G))
        latent_of = torch.full((G.shape[0],), -1, dtype=torch.long)
        latent_of[torch.as_tensor(k)] = torch.as_tensor(r)
        child = torch.nonzero(parent >= 0).flatten()
        par = parent[child]
        ok = (latent_of[child] >= 0) & (latent_of[par] >= 0)
        self.child, self.par = child[ok], par[ok]
        self.l_child, self.l_par = latent_of[self.child], latent_of[self.par]
        self.min_support = min_support
        self.support = torch.zeros(len(self.child), dtype=torch.long)
        self.absorbed = torch.zeros(len(self.child), dtype=torch.long)
        self.n = 0

    @torch.no_grad()
    def update(self, codes: Codes | Tensor, true_codes: Tensor) -> None:
        if len(self.child) == 0:
            return
        a = _fires(codes).cpu()
        t = true_codes.detach().cpu() != 0
        child_on = t[:, self.child]
        absorbed = a[:, self.l_child] & ~a[:, self.l_par] & child_on
        self.support += child_on.sum(0)
        self.absorbed += absorbed.sum(0)
        self.n += a.shape[0]

    def result(self) -> dict[str, Any]:
        ok = self.support >= self.min_support
        frac = self.absorbed[ok].double() / self.support[ok].double()
        return {
            "n_tokens": self.n,
            "absorption": float(frac.mean()) if ok.any() else float("nan"),
            "n_pairs": int(ok.sum()),
            "min_support": self.min_support,
        }
