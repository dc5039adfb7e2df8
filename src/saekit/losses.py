"""Reconstruction and auxiliary losses shared by all rules.

Batch statistics go through a :class:`~saekit.distributed.comm.Comm` (default: one process),
so that a data-parallel loss is the loss of the global batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saekit import kernels
from saekit.distributed.comm import LOCAL, Comm
from saekit.errors import ConfigError


def mse(x_hat: Tensor, x: Tensor) -> Tensor:
    """Squared error summed over dimensions, averaged over tokens."""
    return (x_hat - x).pow(2).sum(-1).mean()


def nmse(x_hat: Tensor, x: Tensor, comm: Comm = LOCAL) -> Tensor:
    """Squared error over the batch's variance about its mean (= batch FVU), as in Gao et al.

    With ``comm``: sums and mean over the global batch.
    """
    if comm.batch_world == 1:
        num = (x_hat - x).pow(2).sum()
        den = (x - x.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12)
        return num / den
    mean = comm.batch_sum(x.detach().sum(0)) / comm.n_tokens(x.shape[0])
    num = comm.batch_sum((x_hat - x).pow(2).sum())
    den = comm.batch_sum((x - mean).pow(2).sum()).clamp_min(1e-12)
    return num / den


def recon_loss(kind: str, x_hat: Tensor, x: Tensor, comm: Comm = LOCAL) -> Tensor:
    if kind == "mse":
        return mse(x_hat, x)
    if kind == "nmse":
        return nmse(x_hat, x, comm)
    raise ConfigError(f"unknown recon_loss {kind!r}; use mse, nmse or auto")


def aux_k_loss(
    x_in: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    pre: Tensor,
    residual: Tensor,
    candidates: Tensor,
    k_aux: int,
    weights: Tensor | None = None,
    signed: bool = False,
    comm: Comm = LOCAL,
) -> Tensor:
    """Gao et al.'s aux-k loss: reconstruct the residual from the top-``k_aux`` candidates.

    ``candidates [d_sae]`` (bool) are the latents allowed (dead ones for aux-k, dead and
    under-used ones for aux-zipf); ``weights [d_sae]`` optionally scale each latent's value.
    Returns NMSE(aux reconstruction, residual), 0 when there is no candidate. With ``comm``
    the candidates, the top-k and the reconstruction span every latent shard and the NMSE
    the global batch.
    """
    n = int(comm.latent_sum(candidates.sum()))
    if n == 0 or k_aux <= 0:
        return pre.new_zeros(())
    k = min(k_aux, n)
    score = pre.abs() if signed else pre
    score = torch.where(candidates, score.detach(), torch.full_like(pre, float("-inf")))
    idx, mask = comm.topk(score, k)
    vals = kernels.sparse_encode(x_in, W_enc, b_enc, idx, pre)
    if not signed:
        vals = torch.relu(vals)
    if weights is not None:
        vals = vals * weights[idx]
    if mask is not None:
        vals = vals * mask.to(vals.dtype)
    aux_hat = comm.latent_sum(kernels.sparse_decode(idx, vals, W_dec))
    return nmse(aux_hat, residual, comm).nan_to_num(0.0)


#: aux-loss variants beyond "auxk": name -> fn(sae) -> (candidate mask [d_sae], weights or None)
aux_registry: dict = {}
