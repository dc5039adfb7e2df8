"""Saving and loading low-rank compressed transformers models (safetensors + JSON, no pickle).

Directory layout written by :func:`save_compressed`::

    config.json                        the original config with model_type
                                       ``saekit_lowrank_<base>``, ``auto_map`` and the layer
                                       list under ``saekit_lowrank`` (see
                                       :mod:`saekit.compress.remote`)
    modeling_saekit_lowrank.py         modeling code for ``trust_remote_code=True``
    model.saekit-lowrank.safetensors   weights (transformers' ``save_pretrained`` with that
                                       variant; sharded with an index for large models); a
                                       low-rank layer ``X`` is ``X.A``, ``X.B`` (``X.bias``)
    compression.json                   {"format": "saekit-lowrank", "version": 2, ...,
                                        "report": {...}}
    tokenizer files                    when a tokenizer is given

``compression.json`` records the size and SHA-256 of every other file it was saved with and
is sealed (:mod:`saekit.io.integrity`); :func:`load_compressed` checks them (``verify=False``:
sizes only), so a flipped bit is refused with the file's name instead of loading.

``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` and
:func:`load_compressed` give the same model; ``from_pretrained`` without remote code, or
with the base class, refuses the directory instead of building a randomly initialised one.
Every file is written atomically (to a temporary name, then moved).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from saekit.compress import remote
from saekit.compress.lowrank import LowRankLinear, set_module
from saekit.errors import FormatError, MissingFileError
from saekit.io.atomic import load_tensors, read_json, write_bytes, write_json
from saekit.io.integrity import check_seal, file_records, seal, verify_files

FORMAT = "saekit-lowrank"
VERSION = 2
META = "compression.json"
WEIGHTS_V1 = "model.safetensors"
WEIGHTS = f"model.{remote.VARIANT}.safetensors"
INDEX = f"model.{remote.VARIANT}.safetensors.index.json"


def _layers(model: nn.Module) -> dict[str, dict]:
    return {
        name: {
            "in_features": m.in_features,
            "out_features": m.out_features,
            "rank": m.rank,
            "bias": m.bias is not None,
        }
        for name, m in model.named_modules()
        if isinstance(m, LowRankLinear)
    }


def _move_in(src: Path, out: Path) -> list[str]:
    """Move every file of ``src`` into ``out`` (each by an atomic rename); their names."""
    names = []
    for p in src.iterdir():
        if p.is_file():
            os.replace(p, out / p.name)
            names.append(p.name)
    return names


def save_compressed(
    model: nn.Module,
    out_dir: str | os.PathLike,
    report: dict | None = None,
    tokenizer: object = None,
) -> int:
    """Write the compressed model to ``out_dir``; returns the bytes of its weight files."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "save_pretrained"):
        raise FormatError("save_compressed needs a transformers model (with .config)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = _layers(model)
    base_model, base_config = type(model).__name__, type(config).__name__
    base_type = config.model_type
    if base_type.startswith("saekit_lowrank_"):
        raise FormatError(f"{out}: the model is already a saekit-lowrank remote-code model")
    with tempfile.TemporaryDirectory(dir=out, prefix=".saving-") as tmp:
        model.save_pretrained(tmp, variant=remote.VARIANT)
        cfg = json.loads((Path(tmp) / "config.json").read_text())
        cfg.update(
            model_type=remote.model_type(base_type),
            architectures=[remote.model_class(base_model)],
            auto_map={
                "AutoConfig": f"{remote.MODULE}.{remote.CONFIG_CLASS}",
                "AutoModelForCausalLM": f"{remote.MODULE}.{remote.model_class(base_model)}",
            },
            saekit_lowrank={
                "format": FORMAT,
                "version": VERSION,
                "base_model_type": base_type,
                "base_model_class": base_model,
                "base_config_class": base_config,
                "layers": layers,
            },
        )
        write_json(Path(tmp) / "config.json", cfg)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        names = _move_in(Path(tmp), out)
    (out / WEIGHTS_V1).unlink(missing_ok=True)  # an older save's weights must not linger
    src = remote.modeling_source(base_config, base_model, base_type)
    write_bytes(out / f"{remote.MODULE}.py", src.encode())
    names.append(f"{remote.MODULE}.py")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model_class": base_model,
        "config_class": base_config,
        "dtype": dtype,
        "layers": layers,
        "report": report or {},
        "files": file_records(out, sorted(names)),
    }
    write_json(out / META, seal(meta))
    return weights_bytes(out)


def weights_bytes(path: str | os.PathLike) -> int:
    """Bytes of the weight files (``*.safetensors``, ``*.bin``) in a model directory."""
    return sum(p.stat().st_size for pat in ("*.safetensors", "*.bin") for p in Path(path).glob(pat))


def read_meta(path: str | os.PathLike, verify: bool = True) -> dict:
    """The ``compression.json`` of a saved compressed model (its seal checked unless
    ``verify`` is False; directories saved before digests have none)."""
    p = Path(path) / META
    if not p.is_file():
        raise MissingFileError(f"{p} not found: not a directory written by save_compressed")
    meta = read_json(p)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise FormatError(f"{p}: format is {got!r}, expected {FORMAT!r}")
    if verify:
        check_seal(meta, p)
    return meta


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    if (path / INDEX).is_file():
        files = sorted(set(read_json(path / INDEX)["weight_map"].values()))
    elif (path / WEIGHTS).is_file():
        files = [WEIGHTS]
    elif (path / WEIGHTS_V1).is_file():  # version 1 directories
        files = [WEIGHTS_V1]
    else:
        raise MissingFileError(f"no {WEIGHTS} (or {INDEX}) in {path}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_tensors(path / f))
    return sd


def _base_config(path: Path, meta: dict):
    import transformers

    raw = read_json(path / "config.json")
    extra = raw.pop("saekit_lowrank", None)
    raw.pop("auto_map", None)
    cls_name = meta.get("config_class") or (extra or {}).get("base_config_class")
    if cls_name:
        raw["model_type"] = getattr(transformers, cls_name).model_type
        raw.pop("architectures", None)
        return getattr(transformers, cls_name).from_dict(raw)
    return transformers.AutoConfig.from_pretrained(path)  # version 1: the base config


def load_compressed(path: str | os.PathLike, device: str = "cpu", verify: bool = True) -> nn.Module:
    """Rebuild a model saved by :func:`save_compressed` (architecture from its config.json).

    Every file ``compression.json`` records is checked against its SHA-256 first
    (``verify=False``: sizes only); an :class:`~saekit.errors.IntegrityError` names the file.
    """
    import transformers

    path = Path(path)
    meta = read_meta(path, verify)
    if "files" in meta:
        verify_files(path, meta["files"], verify)
    config = _base_config(path, meta)
    cls = getattr(transformers, meta.get("model_class", ""), None)
    dtype = getattr(torch, meta.get("dtype", "float32"))
    kw = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": dtype}
    if cls is not None and hasattr(cls, "_from_config"):
        model = cls._from_config(config, **kw)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config, **kw)
    model = model.to(dtype)
    for name, spec in meta["layers"].items():
        set_module(
            model,
            name,
            LowRankLinear(
                spec["in_features"], spec["out_features"], spec["rank"], spec["bias"], dtype=dtype
            ),
        )
    sd = _state_dict(path)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not _tied_to_loaded(model, k, sd)]
    if missing or unexpected:
        raise FormatError(
            f"the weights in {path} do not match the rebuilt model: missing {missing}, "
            f"unexpected {unexpected}"
        )
    return model.to(device).eval()


def _tied_to_loaded(model: nn.Module, key: str, sd: dict) -> bool:
    """Whether parameter ``key`` is the same tensor as one that was loaded (tied weights)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    p = params.get(key)
    return p is not None and any(q is p for k, q in params.items() if k in sd and k != key)


def dir_size(path: str | os.PathLike) -> int:
    """Total bytes of the files in a directory (non-recursive)."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


__all__ = ["load_compressed", "read_meta", "save_compressed", "weights_bytes"]
