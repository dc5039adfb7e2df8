"""Reconstruction losses, registered by name (``SAEConfig.recon_loss``; "auto": the rule's
``default_recon``)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from saekit.errors import ConfigError


def mse(x_hat: Tensor, x: Tensor) -> Tensor:
    """Squared error summed over dimensions, averaged over tokens."""
    return (x_hat - x).pow(2).sum(-1).mean()


def nmse(x_hat: Tensor, x: Tensor) -> Tensor:
    """Squared error over the batch's variance about its mean (= batch FVU), as in Gao et al."""
    num = (x_hat - x).pow(2).sum()
    den = (x - x.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12)
    return num / den


def mse_denominator(x: Tensor) -> Tensor:
    """What :func:`mse` divides the summed squared error by: the number of tokens."""
    return x.new_tensor(float(x.shape[0]))


def nmse_denominator(x: Tensor) -> Tensor:
    """What :func:`nmse` divides the summed squared error by: the batch's variance sum."""
    return (x - x.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12)


#: name -> (loss(x_hat, x), denominator(x)); loss == sum((x_hat - x)^2) / denominator(x)
RECON_LOSSES: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "mse": (mse, mse_denominator),
    "nmse": (nmse, nmse_denominator),
}


def check_recon(kind: str) -> str:
    if kind not in RECON_LOSSES:
        raise ConfigError(f"unknown recon_loss {kind!r}; use {', '.join(RECON_LOSSES)} or auto")
    return kind


def recon_loss(kind: str, x_hat: Tensor, x: Tensor) -> Tensor:
    return RECON_LOSSES[check_recon(kind)][0](x_hat, x)


def recon_denominator(kind: str, x: Tensor) -> Tensor:
    """The denominator of ``recon_loss(kind, ., x)`` (aux losses scaled like the recon)."""
    return RECON_LOSSES[check_recon(kind)][1](x)
