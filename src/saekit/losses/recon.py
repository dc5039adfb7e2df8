"""Reconstruction losses, registered by name (``SAEConfig.recon_loss``; "auto": the rule's
``default_recon``).

Batch statistics go through a :class:`~saekit.distributed.comm.Comm` (default: one process),
so that a data-parallel loss is the loss of the global batch.
"""

from __future__ import annotations

from torch import Tensor

from saekit.distributed.comm import LOCAL, Comm
from saekit.errors import ConfigError


def mse(x_hat: Tensor, x: Tensor) -> Tensor:
    """Squared error summed over dimensions, averaged over tokens."""
    return (x_hat - x).pow(2).sum(-1).mean()


def nmse(x_hat: Tensor, x: Tensor, comm: Comm = LOCAL) -> Tensor:
    """Squared error over the batch's variance about its mean (= batch FVU), as in Gao et al.

    With ``comm``: sums and mean over the global batch.
    """
    return comm.batch_sum((x_hat - x).pow(2).sum()) / nmse_denominator(x, comm)


def nmse_denominator(x: Tensor, comm: Comm = LOCAL) -> Tensor:
    """What :func:`nmse` divides the summed squared error by: the batch's variance sum."""
    if comm.batch_world == 1:
        return (x - x.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12)
    mean = comm.batch_sum(x.detach().sum(0)) / comm.n_tokens(x.shape[0])
    return comm.batch_sum((x - mean).pow(2).sum()).clamp_min(1e-12)


#: the reconstruction losses ``SAEConfig.recon_loss`` names
RECON_LOSSES = ("mse", "nmse")


def check_recon(kind: str) -> str:
    if kind not in RECON_LOSSES:
        raise ConfigError(f"unknown recon_loss {kind!r}; use {', '.join(RECON_LOSSES)} or auto")
    return kind


def recon_loss(kind: str, x_hat: Tensor, x: Tensor, comm: Comm = LOCAL) -> Tensor:
    """``recon_loss(kind)`` of ``x_hat`` against ``x``."""
    return scaled_like_recon(kind, (x_hat - x).pow(2).sum(), x, comm)


def scaled_like_recon(kind: str, sq_err: Tensor, x: Tensor, comm: Comm = LOCAL) -> Tensor:
    """A summed squared error (this rank's tokens) scaled the way ``recon_loss(kind, ., x)``
    scales its own: per token for ``mse``, by the global batch's variance sum for ``nmse``."""
    if check_recon(kind) == "mse":
        return sq_err / x.shape[0]
    return comm.batch_sum(sq_err) / nmse_denominator(x, comm)
