"""Gemma Scope JumpReLU SAEs: ``params.npz`` (Gemma Scope 1) or ``params.safetensors`` (2).

Both hold ``W_enc [d, F]``, ``W_dec [F, d]``, ``b_enc [F]``, ``b_dec [d]``,
``threshold [F]`` (Gemma Scope 2 spells the weights ``w_enc`` / ``w_dec``). Encoding is
``JumpReLU_theta(x W_enc + b_enc)`` with no ``b_dec`` subtraction; decoding
``z W_dec + b_dec``. ``params.npz`` is read with ``numpy.load(allow_pickle=False)``.

The model and hook come from the repository and folder names when the files sit in a hub
cache (``google/gemma-scope-2b-pt-res`` / ``layer_12/width_16k/average_l0_82``): ``res`` ->
``layers.L.resid_post``, ``mlp`` -> ``layers.L.mlp_out``; attention SAEs (``att``, on
``hook_z``) have no saekit site. Gemma Scope 2 transcoders (folders named ``transcoder``:
``layers.L.mlp_in`` -> ``layers.L.mlp_out``; ``affine_skip_connection [d_in, d_out]`` is the
skip path) read as saekit transcoders; cross-layer transcoders (3-D ``w_dec``) are refused.
Write: JumpReLU-inference SAEs, and ReLU SAEs as JumpReLU with threshold 0.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saekit.errors import FormatError
from saekit.io.atomic import atomic_path, load_tensors, save_tensors
from saekit.io.formats import Format, register_format
from saekit.io.portable import Portable, refuse, with_b_dec_input

NPZ = "params.npz"
SAFETENSORS = "params.safetensors"
_MODELS = {
    "2b-it": "gemma-2-2b-it",
    "9b-it": "gemma-2-9b-it",
    "2b": "gemma-2-2b",
    "9b": "gemma-2-9b",
    "27b": "gemma-2-27b",
}


def _file(p: Path) -> Path | None:
    if p.is_file():
        return p if p.name in (NPZ, SAFETENSORS) else None
    for name in (NPZ, SAFETENSORS):
        if (p / name).is_file():
            return p / name
    return None


def detect(p: Path) -> bool:
    return _file(p) is not None


def _repo_name(path: Path, hints: dict[str, Any]) -> str:
    if hints.get("repo_id"):
        return str(hints["repo_id"])
    for part in path.parts:
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/")
    return ""


def infer_meta(path: Path, hints: dict[str, Any]) -> dict[str, Any]:
    """Model and hook from Gemma Scope's repository and folder naming (may be empty)."""
    repo = _repo_name(path, hints)
    m = re.search(r"layer_(\d+)", str(path))
    meta: dict[str, Any] = {}
    if hints.get("model"):
        meta["model_name"] = hints["model"]
    elif "gemma-scope-2-" in repo:
        meta["model_name"] = repo.replace("gemma-scope-2", "gemma-3")
    else:
        size = next((k for k in _MODELS if f"-{k}-" in repo + "-"), None)
        if size:
            meta["model_name"] = f"google/{_MODELS[size]}"
    if m:
        layer = m.group(1)
        where = repo + "/" + str(path)
        if "transcoder" in where:  # Gemma Scope 2: the MLP's normed input to its output
            meta["hook_name"] = f"layers.{layer}.mlp_in"
            meta["hook_name_out"] = f"layers.{layer}.mlp_out"
        elif "resid_post" in where or re.search(r"-res\b", repo):
            meta["hook_name"] = f"layers.{layer}.resid_post"
        elif "mlp" in where:
            meta["hook_name"] = f"layers.{layer}.mlp_out"
    return meta


def _load(f: Path) -> dict[str, Tensor]:
    if f.suffix == ".safetensors":
        return load_tensors(f)
    try:
        with np.load(f, allow_pickle=False) as data:
            return {k: torch.from_numpy(np.ascontiguousarray(data[k])) for k in data.files}
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise FormatError(f"{f} is not a readable .npz of arrays: {e}") from e


def read(p: Path, hints: dict[str, Any]) -> Portable:
    f = _file(p)
    assert f is not None
    raw = {k.lower(): v for k, v in _load(f).items()}
    if raw.get("w_dec", torch.zeros(1, 1)).dim() == 3:
        raise FormatError(
            f"{f}: a Gemma Scope cross-layer transcoder; saekit reads SAEs and"
            " per-layer transcoders"
        )
    missing = [n for n in ("w_enc", "w_dec", "b_enc", "b_dec", "threshold") if n not in raw]
    if missing:
        raise FormatError(f"{f}: missing {missing} (has {sorted(raw)})")
    scale = raw.get("scaling_factor")
    if scale is not None and not bool(torch.all(scale == 1)):
        raise FormatError(f"{f}: a finetuning scaling_factor other than 1 is not supported")
    meta = infer_meta(f.parent, hints)
    extra = {}
    if "affine_skip_connection" in raw:  # stored [d_in, d_out]; W_skip is [d_out, d_in]
        extra["W_skip"] = raw["affine_skip_connection"].t().contiguous()
    return Portable(
        "jumprelu",
        raw["w_enc"],
        raw["b_enc"],
        raw["w_dec"],
        raw["b_dec"],
        threshold=raw["threshold"],
        apply_b_dec_to_input=False,
        extra=extra,
        meta=meta,
    )


def write(p: Portable, out: Path) -> Path:
    refuse("Gemma Scope", p, ("jumprelu", "standard"), " (Gemma Scope SAEs are JumpReLU)")
    p = with_b_dec_input(p, False)
    th = p.threshold if p.threshold is not None else torch.zeros_like(p.b_enc)
    arrays = {"W_enc": p.W_enc, "W_dec": p.W_dec, "b_enc": p.b_enc, "b_dec": p.b_dec}
    arrays["threshold"] = th
    if out.name == SAFETENSORS:  # the Gemma Scope 2 layout
        save_tensors(out, {k.replace("W_", "w_"): v for k, v in arrays.items()})
        return out
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / NPZ) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **{k: v.detach().float().cpu().numpy() for k, v in arrays.items()})
    return out


FORMAT = register_format(
    Format(
        "gemmascope", "Gemma Scope params.npz / params.safetensors (JumpReLU)", detect, read, write
    )
)
