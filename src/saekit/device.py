"""Devices and precision: a clear error for a device this torch cannot use, and the
autocast default (bf16 for the SAE forward on CUDA, fp32 elsewhere)."""

from __future__ import annotations

import contextlib

import torch

from saekit.config import AUTOCASTS as AUTOCAST_CHOICES  # the values of TrainConfig.autocast
from saekit.errors import ConfigError, EnvironmentProblem


def resolve_device(name: str | torch.device, flag: str = "--device") -> torch.device:
    """``torch.device(name)``, or :class:`EnvironmentProblem` (one line naming ``flag``) when
    this torch cannot run on it: a CPU-only build, no visible GPU, an index out of range."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(
            f"{flag} {name!r} is not a torch device ({e}); e.g. cpu or cuda"
        ) from None
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise EnvironmentProblem(
                f"{flag} {name}: this torch {torch.__version__} is a CPU-only build; install a"
                " CUDA build of torch first, then saekit (README: 'Installing on a GPU"
                f" machine'), or pass {flag} cpu"
            )
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise EnvironmentProblem(
                f"{flag} {name}: torch {torch.__version__} has CUDA but sees no GPU (driver,"
                f" CUDA_VISIBLE_DEVICES); pass {flag} cpu"
            )
        if dev.index is not None and dev.index >= n:
            raise EnvironmentProblem(f"{flag} {name}: only {n} GPU(s) visible (cuda:0..{n - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise EnvironmentProblem(f"{flag} {name}: MPS is not available in this torch/machine")
    return dev


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the SAE forward: ``auto`` is bf16 on CUDA and none (fp32)
    elsewhere, since bf16 matmuls are far slower than fp32 on CPUs [our choice]."""
    if setting not in AUTOCAST_CHOICES:
        raise ConfigError(f"autocast must be one of {', '.join(AUTOCAST_CHOICES)}, got {setting!r}")
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if setting == "bfloat16" else None


def autocast(dtype: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype`` on ``device``, or a null context for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
