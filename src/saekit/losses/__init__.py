"""Losses: reconstruction losses (:mod:`.recon`) and auxiliary losses (:mod:`.aux`), each
registered by name. Importing this package imports every module in it, so a new aux loss
is one file here (or a plugin module, :mod:`saekit.plugins`)."""

import importlib
import pkgutil

from saekit.losses.aux import (
    DEAD_TOKENS_MAX,
    AuxLoss,
    AuxOptions,
    auto_dead_tokens,
    aux_k_loss,
    aux_names,
    build_aux,
    get_aux_class,
    register_aux,
)
from saekit.losses.recon import RECON_LOSSES, mse, nmse, recon_loss, scaled_like_recon

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = [
    "DEAD_TOKENS_MAX",
    "RECON_LOSSES",
    "AuxLoss",
    "AuxOptions",
    "auto_dead_tokens",
    "aux_k_loss",
    "aux_names",
    "build_aux",
    "get_aux_class",
    "mse",
    "nmse",
    "recon_loss",
    "register_aux",
    "scaled_like_recon",
]
