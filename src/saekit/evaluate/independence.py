"""Feature-independence metrics (vSAE paper, Baker & Li 2025).

* ``decoder_max_cos``: for each latent, max |cos| to any *other* decoder row; reported as
  the mean (and median) over latents. Computed in row chunks so memory is
  O(chunk · d_sae), never d_sae².
* single-feature ablation: zeroing latent f changes the reconstruction to x̂ − a_f d_f, so
  the increase in squared error is exactly ``a_f² ‖d_f‖² + 2 a_f ⟨x − x̂, d_f⟩`` per token
  (no re-decoding needed). We stream it for *every* latent and report, over the latents
  that fired, the mean / median of (i) the increase averaged over all eval tokens and
  (ii) the increase averaged over the tokens where the latent fired (our choice: the
  paper does not fix the averaging). Units: raw activations (the SAE's input space).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from saekit.evaluate.core import as_codes
from saekit.sae import Codes


@torch.no_grad()
def decoder_max_cos(W_dec: Tensor, chunk: int = 1024) -> Tensor:
    """``[d_sae]`` max |cos| of each decoder row to any other row (chunked)."""
    W = W_dec.detach().float()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    F = W.shape[0]
    out = torch.empty(F)
    for s in range(0, F, chunk):
        c = (W[s : s + chunk] @ W.T).abs()
        idx = torch.arange(s, min(s + chunk, F))
        c[idx - s, idx] = -1.0  # exclude self
        out[s : s + chunk] = c.max(1).values
    return out


def decoder_independence(W_dec: Tensor, chunk: int = 1024) -> dict[str, float]:
    """Mean / median of :func:`decoder_max_cos` and the fraction of latents above 0.9."""
    m = decoder_max_cos(W_dec, chunk).double()
    return {
        "decoder_max_cos_mean": float(m.mean()),
        "decoder_max_cos_median": float(m.median()),
        "decoder_frac_max_cos_gt_0.9": float((m > 0.9).double().mean()),
    }


def ablation_delta(x: Tensor, x_hat: Tensor, codes: Codes | Tensor, W_dec_raw: Tensor) -> Tensor:
    """``[N, d_sae]`` increase in ‖x − x̂‖² when each latent alone is zeroed (dense)."""
    a = as_codes(codes).to_dense().detach().double()
    D = W_dec_raw.detach().double()
    e = (x - x_hat).detach().double().reshape(-1, D.shape[1])
    return a.pow(2) * D.pow(2).sum(1) + 2 * a * (e @ D.T)


class AblationAccumulator:
    """Streams the exact single-latent ablation effect for every latent."""

    def __init__(self, sae: Any) -> None:
        self.sae = sae
        s = float(sae.input_scale) if sae.cfg.normalize_input else 1.0
        self.W_raw = sae.W_dec.detach().double().cpu() / s  # decoder rows in raw units
        self.dn2 = self.W_raw.pow(2).sum(1)
        F = sae.d_sae
        self.sum_delta = torch.zeros(F, dtype=torch.float64)
        self.fires = torch.zeros(F, dtype=torch.long)
        self.n = 0

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, codes: Codes | Tensor) -> None:
        c = as_codes(codes)
        if c.is_sparse:  # sparse path: only the active entries
            assert c.values is not None and c.indices is not None
            d = self.W_raw.shape[1]
            e_all = (x - x_hat).detach().double().reshape(-1, d).cpu()
            idx_all, v_all = c.indices.cpu(), c.values.detach().double().cpu()
            step = max(1, 2_000_000 // max(1, idx_all.shape[1] * d))  # bounded [n, K, d]
            for s in range(0, idx_all.shape[0], step):
                idx, v = idx_all[s : s + step], v_all[s : s + step]
                D = self.W_raw[idx]  # [n, K, d]
                dot = torch.bmm(D, e_all[s : s + step].unsqueeze(-1)).squeeze(-1)
                delta = v.pow(2) * self.dn2[idx] + 2 * v * dot
                delta = torch.where(v != 0, delta, torch.zeros_like(delta))
                self.sum_delta.index_add_(0, idx.reshape(-1), delta.reshape(-1))
        else:
            dense = c.to_dense().cpu()
            self.sum_delta += ablation_delta(x.cpu(), x_hat.cpu(), dense, self.W_raw).sum(0)
        self.fires += c.fire_counts().cpu().long()
        self.n += x.reshape(-1, self.W_raw.shape[1]).shape[0]

    def result(self) -> dict[str, Any]:
        alive = self.fires > 0
        if self.n == 0 or not alive.any():
            return {"n_tokens": self.n, "n_latents": 0}
        per_tok = self.sum_delta[alive] / self.n
        per_fire = self.sum_delta[alive] / self.fires[alive].double()
        return {
            "n_tokens": self.n,
            "n_latents": int(alive.sum()),
            "ablation_dmse_mean": float(per_tok.mean()),
            "ablation_dmse_median": float(per_tok.median()),
            "ablation_dmse_when_active_mean": float(per_fire.mean()),
            "ablation_dmse_when_active_median": float(per_fire.median()),
        }
