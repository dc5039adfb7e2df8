"""Qwen-Scope checkpoints: one ``layer{L}.sae.pt`` tensor dict per layer.

Keys ``W_enc [F, d]``, ``b_enc [F]``, ``W_dec [d, F]``, ``b_dec [d]``; encoding is
``TopK(x W_enc^T + b_enc)`` without subtracting ``b_dec``. Loaded with
``torch.load(weights_only=True)`` (never unpickled) and transposed to saekit's layout.
``k`` is not stored in the file: pass it, or it is read from an ``L0_<k>`` part of the
path (the Qwen-Scope repo naming, e.g. ``SAE-Res-Qwen3-1.7B-Base-W32K-L0_50``); the writer
writes ``layer{L}.sae.pt`` into a directory whose path holds ``L0_<k>``, else
``L0_<k>.layer{L}.sae.pt`` (both names SAELens's Qwen-Scope loader accepts).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import Tensor

from saekit.errors import ConfigError, FormatError
from saekit.io.portable import Portable, refuse, sae_from_portable, with_b_dec_input
from saekit.sae import SAE
from saekit.sources.sites import parse_site

KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")


def k_from_path(path: str | Path) -> int | None:
    m = re.findall(r"L0_(\d+)", str(path))
    return int(m[-1]) if m else None


def is_qwenscope(obj: Any) -> bool:
    return isinstance(obj, dict) and all(isinstance(obj.get(n), Tensor) for n in KEYS)


def portable(obj: dict[str, Tensor], path: Path, k: int | None) -> Portable:
    """A Qwen-Scope tensor dict (already loaded) as a :class:`Portable`."""
    if not is_qwenscope(obj):
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
    meta: dict[str, Any] = {"format": "qwenscope"}
    m = re.search(r"layer(\d+)", path.name)
    if m:
        kind = "mlp_out" if "-MLP-" in str(path) else "resid_post"
        meta["hook_name"] = f"layers.{m.group(1)}.{kind}"
    return Portable(
        "topk",
        W_enc.t().contiguous(),
        b_enc,
        W_dec.t().contiguous(),
        b_dec,
        k=int(k),
        apply_b_dec_to_input=False,
        meta=meta,
    )


def load_qwenscope(path: str | Path, k: int | None = None) -> SAE:
    """A TopK SAE from a Qwen-Scope ``.pt`` file."""
    from saekit.io.atomic import torch_load_tensors

    path = Path(path)
    return sae_from_portable(portable(torch_load_tensors(path), path, k))


def write(p: Portable, out: Path) -> Path:
    refuse("Qwen-Scope", p, ("topk",), " (Qwen-Scope SAEs are TopK)")
    assert p.k is not None
    p = with_b_dec_input(p, False)
    if out.suffix != ".pt":
        try:
            layer = parse_site(str(p.meta.get("hook_name", "")))[0]
        except ValueError:
            layer = 0
        # SAELens's loader wants ``layer{L}.sae.pt`` (found by search) and k in the repo name
        name = f"layer{layer}.sae.pt"
        out = out / (name if k_from_path(out) == p.k else f"L0_{p.k}.{name}")
    if k_from_path(out) != p.k:
        raise FormatError(f"{out}: Qwen-Scope files do not store k; put L0_{p.k} in the path")
    obj = {"W_enc": p.W_enc.t(), "b_enc": p.b_enc, "W_dec": p.W_dec.t(), "b_dec": p.b_dec}
    from saekit.io.torch_files import save_tensor_dict

    save_tensor_dict(out, obj)
    return out
