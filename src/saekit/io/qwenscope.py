"""Qwen-Scope checkpoints: one ``layer{L}.sae.pt`` tensor dict per layer.

Keys ``W_enc [F, d]``, ``b_enc [F]``, ``W_dec [d, F]``, ``b_dec [d]``; encoding is
``TopK(x W_enc^T + b_enc)`` without subtracting ``b_dec``. Loaded with
``torch.load(weights_only=True)`` (never unpickled) and transposed to saekit's layout.
``k`` is not stored in the file: pass it, or it is read from an ``L0_<k>`` part of the
path (the Qwen-Scope repo naming, e.g. ``SAE-Res-Qwen3-1.7B-Base-W32K-L0_50``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from saekit.config import SAEConfig
from saekit.errors import ConfigError, FormatError
from saekit.io.atomic import torch_load_tensors
from saekit.io.saelens import load_state
from saekit.sae import SAE

KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")


def k_from_path(path: str | Path) -> int | None:
    m = re.findall(r"L0_(\d+)", str(path))
    return int(m[-1]) if m else None


def load_qwenscope(path: str | Path, k: int | None = None) -> SAE:
    """A TopK SAE from a Qwen-Scope ``.pt`` file."""
    path = Path(path)
    obj = torch_load_tensors(path)
    if not isinstance(obj, dict) or not all(isinstance(obj.get(n), Tensor) for n in KEYS):
        have = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise FormatError(f"{path}: expected a dict with tensors {list(KEYS)}, got {have}")
    W_enc, b_enc, W_dec, b_dec = (obj[n] for n in KEYS)
    if W_enc.dim() != 2 or W_dec.dim() != 2:
        raise FormatError(f"{path}: W_enc and W_dec must be 2-D")
    F, d = W_enc.shape
    if tuple(W_dec.shape) != (d, F):
        raise FormatError(
            f"{path}: W_enc is {tuple(W_enc.shape)} [F, d] so W_dec should be {(d, F)} [d, F],"
            f" got {tuple(W_dec.shape)}"
        )
    k = k if k is not None else k_from_path(path)
    if k is None:
        raise ConfigError(f"{path}: k is not stored in Qwen-Scope files; pass k (e.g. 50 or 100)")
    cfg = SAEConfig(
        d_in=d, d_sae=F, rule="topk", k=k, apply_b_dec_to_input=False, unit_norm_decoder=False
    )
    with torch.random.fork_rng(devices=[]):
        sae = SAE(cfg)
    sae.to(W_enc.dtype)
    state = {"W_enc": W_enc.t().contiguous(), "b_enc": b_enc, "W_dec": W_dec.t().contiguous()}
    state["b_dec"] = b_dec
    load_state(sae, state, strict=False, where=str(path))
    return sae
