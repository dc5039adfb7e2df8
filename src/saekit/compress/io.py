"""Saving and loading low-rank compressed transformers models (safetensors + JSON, no pickle).

Directory layout written by :func:`save_compressed`::

    config.json          the original model config (``model.config.save_pretrained``)
    model.safetensors    all weights; a low-rank layer ``X`` is stored as ``X.A``, ``X.B``
                         (and ``X.bias``); tied tensors are stored once
    compression.json     {"format": "saekit-lowrank", "model_class": ..., "dtype": ...,
                          "layers": {name: {"in_features", "out_features", "rank", "bias"}},
                          "report": {...}}
    tokenizer files      when a tokenizer is given

:func:`load_compressed` rebuilds the architecture from ``config.json`` (``from_config``,
random init), swaps the listed layers for :class:`LowRankLinear` of the recorded ranks and
loads the weights strictly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from saekit.compress.lowrank import LowRankLinear, set_module
from saekit.errors import ConfigError, FormatError, MissingFileError
from saekit.io.atomic import read_json

FORMAT = "saekit-lowrank"
WEIGHTS = "model.safetensors"
META = "compression.json"


def save_compressed(
    model: nn.Module,
    out_dir: str | os.PathLike,
    report: dict | None = None,
    tokenizer: object = None,
) -> int:
    """Write the compressed model to ``out_dir``; returns the weight file size in bytes."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise ConfigError("save_compressed needs a transformers model (with .config)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    layers = {
        name: {
            "in_features": m.in_features,
            "out_features": m.out_features,
            "rank": m.rank,
            "bias": m.bias is not None,
        }
        for name, m in model.named_modules()
        if isinstance(m, LowRankLinear)
    }
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    meta = {
        "format": FORMAT,
        "version": 1,
        "model_class": type(model).__name__,
        "dtype": dtype,
        "layers": layers,
        "report": report or {},
    }
    save_model(model, str(out / WEIGHTS))
    (out / META).write_text(json.dumps(meta, indent=2))
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
    return (out / WEIGHTS).stat().st_size


def read_meta(path: str | os.PathLike) -> dict:
    """The ``compression.json`` of a saved compressed model."""
    p = Path(path) / META
    if not p.is_file():
        raise MissingFileError(f"{p} not found: not a directory written by save_compressed")
    meta = read_json(p)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise FormatError(f"{p}: format is {got!r}, expected {FORMAT!r}")
    return meta


def load_compressed(path: str | os.PathLike, device: str = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_compressed` (architecture from its config.json)."""
    import transformers

    path = Path(path)
    meta = read_meta(path)
    if not (path / WEIGHTS).is_file():
        raise MissingFileError(f"{path / WEIGHTS} not found")
    config = transformers.AutoConfig.from_pretrained(path)
    cls = getattr(transformers, meta.get("model_class", ""), None)
    dtype = getattr(torch, meta.get("dtype", "float32"))
    if cls is not None and hasattr(cls, "_from_config"):
        model = cls._from_config(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    model = model.to(dtype)
    for name, spec in meta["layers"].items():
        set_module(
            model,
            name,
            LowRankLinear(
                spec["in_features"], spec["out_features"], spec["rank"], spec["bias"], dtype=dtype
            ),
        )
    missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False)
    if missing or unexpected:
        raise FormatError(
            f"{path / WEIGHTS} does not match the rebuilt model: missing {missing}, "
            f"unexpected {unexpected}"
        )
    return model.to(device).eval()


def dir_size(path: str | os.PathLike) -> int:
    """Total bytes of the files in a directory (non-recursive)."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())
