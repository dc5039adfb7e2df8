"""Latent-sharded state: slicing a whole SAE / optimizer state into shards and back.

A latent dimension is found by shape: the one dimension where a shard's tensor is smaller
than the whole SAE's (``W_enc`` dim 1, ``W_dec``, ``b_enc``, per-latent buffers and rule
tensors dim 0). Everything else is replicated.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def shard_sizes(n: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous shards of ``n`` latents (the first ``n % parts`` get one
    more)."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def shard_range(n: int, parts: int, i: int) -> tuple[int, int]:
    """``[lo, hi)`` of shard ``i``."""
    sizes = shard_sizes(n, parts)
    lo = sum(sizes[:i])
    return lo, lo + sizes[i]


def latent_dims(whole: dict[str, Tensor], shard: dict[str, Tensor]) -> dict[str, int]:
    """``name -> dim`` for the tensors of ``shard`` that are slices of ``whole``'s."""
    dims: dict[str, int] = {}
    for name, t in shard.items():
        w = whole[name]
        diff = [d for d in range(t.dim()) if t.shape[d] != w.shape[d]]
        if len(diff) > 1:
            raise ValueError(f"{name}: shard shape {tuple(t.shape)} vs {tuple(w.shape)}")
        if diff:
            dims[name] = diff[0]
    return dims


def slice_state(state: dict[str, Tensor], dims: dict[str, int], lo: int, hi: int) -> dict:
    """The shard ``[lo, hi)`` of a whole state dict (replicated tensors as they are)."""
    return {
        k: (v.narrow(dims[k], lo, hi - lo).contiguous() if k in dims else v)
        for k, v in state.items()
    }


def cat_state(parts: list[dict[str, Tensor]], dims: dict[str, int]) -> dict[str, Tensor]:
    """The whole state dict from its shards in latent order."""
    return {
        k: (torch.cat([p[k] for p in parts], dims[k]) if k in dims else v)
        for k, v in parts[0].items()
    }


def param_dims(names: list[str], dims: dict[str, int]) -> list[int | None]:
    """Latent dim of each optimizer parameter id (``names``: the parameters in order)."""
    return [dims.get(n) for n in names]


def _sliced(v: Any, d: int | None) -> bool:
    return d is not None and isinstance(v, Tensor) and v.dim() > 0


def slice_optim(osd: dict, pdims: list[int | None], lo: int, hi: int) -> dict:
    """The shard ``[lo, hi)`` of a whole ``optimizer.state_dict()``."""
    state = {}
    for pid, st in osd["state"].items():
        d = pdims[int(pid)]
        state[pid] = {
            k: (v.narrow(d, lo, hi - lo).contiguous() if _sliced(v, d) else v)  # type: ignore[arg-type]
            for k, v in st.items()
        }
    return {"state": state, "param_groups": osd["param_groups"]}


def cat_optim(parts: list[dict], pdims: list[int | None]) -> dict:
    """The whole ``optimizer.state_dict()`` from its shards in latent order."""
    state = {}
    for pid, st in parts[0]["state"].items():
        d = pdims[int(pid)]
        state[pid] = {
            k: (torch.cat([p["state"][pid][k] for p in parts], d) if _sliced(v, d) else v)  # type: ignore[arg-type]
            for k, v in st.items()
        }
    return {"state": state, "param_groups": parts[0]["param_groups"]}
