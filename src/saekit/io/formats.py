"""Foreign SAE formats: detection from the files, reading and writing.

Each format lives in its own module under :mod:`saekit.io` and registers a
:class:`Format` here: ``detect(path)`` (does this file or directory hold that format?),
``read(path, hints) -> Portable`` and ``write(portable, out) -> Path``. Formats are tried
in :data:`FORMAT_MODULES` order, most specific first; saekit's own run directories and
plain SAELens directories are handled by :func:`saekit.io.native.load_sae` before these.
``hints`` carry what a hub registry knows and the files do not (``k``, SAELens's
``conversion_func``, a ``norm_scaling_factor``, the repo id, ...).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saekit.errors import FormatError
from saekit.io.portable import Portable, gated_as_jumprelu, portable_from_sae, sae_from_portable
from saekit.sae import SAE

#: modules that register a format, in detection order
FORMAT_MODULES = (
    "saekit.io.sparsify",
    "saekit.io.dictionary_learning",
    "saekit.io.gemmascope",
    "saekit.io.llamascope",
    "saekit.io.torch_files",  # Goodfire and Qwen-Scope tensor dicts
)


@dataclass(frozen=True)
class Format:
    """One foreign format; see the module docstring."""

    name: str
    doc: str
    detect: Callable[[Path], bool]
    read: Callable[[Path, dict[str, Any]], Portable]
    write: Callable[[Portable, Path], Path] | None = None
    #: the writer holds SAELens ``gated`` SAEs; else they are written as the equal JumpReLU
    gated: bool = False


_FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    if fmt.name in _FORMATS and _FORMATS[fmt.name] is not fmt:
        raise ValueError(f"format {fmt.name!r} registered twice")
    _FORMATS[fmt.name] = fmt
    return fmt


def formats() -> dict[str, Format]:
    """Every registered format by name (imports the format modules)."""
    for mod in FORMAT_MODULES:
        importlib.import_module(mod)
    return dict(_FORMATS)


def get_format(name: str) -> Format:
    fmts = formats()
    if name not in fmts:
        raise FormatError(f"unknown SAE format {name!r}; known: saelens, {', '.join(fmts)}")
    return fmts[name]


def detect_format(path: str | Path) -> str | None:
    """The name of the foreign format ``path`` holds, or None."""
    p = Path(path)
    for name, fmt in formats().items():
        if fmt.detect(p):
            return name
    return None


def describe_dir(path: Path) -> str:
    """A short listing of what ``path`` holds, for error messages."""
    if path.is_file():
        return f"the file {path.name}"
    names = sorted(q.name for q in path.iterdir())[:12]
    return f"files {names}" if names else "no files"


def _write_saelens(p: Portable, out: Path) -> Path:
    """A plain SAELens directory (``cfg.json`` + ``sae_weights.safetensors``)."""
    from saekit.io.atomic import save_tensors, write_json

    save_tensors(out / "sae_weights.safetensors", p.saelens_weights(), metadata={"format": "pt"})
    write_json(out / "cfg.json", p.saelens_cfg())
    return out


def read_portable(path: str | Path, hints: dict[str, Any] | None = None) -> Portable:
    """Read a foreign-format SAE at ``path`` as a :class:`Portable`."""
    p = Path(path)
    hints = dict(hints or {})
    name = hints.get("format") or detect_format(p)
    if name is None:
        known = ", ".join(["saekit", "saelens", *formats()])
        raise FormatError(
            f"{p}: no known SAE format (found {describe_dir(p)}); saekit reads {known} (a saekit"
            " or SAELens directory holds cfg.json + sae_weights.safetensors)"
        )
    port = get_format(name).read(p, hints).check(str(p))
    port.meta.setdefault("format", name)
    return port


def read_foreign(
    path: str | Path, k: int | None = None, hints: dict[str, Any] | None = None
) -> tuple[SAE, dict[str, Any]]:
    """``(SAE, metadata)`` from a foreign-format SAE (``k`` overrides a stored k)."""
    hints = dict(hints or {})
    if k is not None:
        hints["k"] = k
    port = read_portable(path, hints)
    return sae_from_portable(port, k), dict(port.meta)


def write_format(sae: SAE, out: str | Path, fmt: str, meta: dict[str, Any] | None = None) -> Path:
    """Write ``sae`` to ``out`` in format ``fmt`` (``saelens`` or a registered one)."""
    out = Path(out)
    if fmt == "saelens":
        return _write_saelens(portable_from_sae(sae, meta), out)
    f = get_format(fmt)
    if f.write is None:
        raise FormatError(f"saekit reads the {fmt} format but cannot write it")
    p = portable_from_sae(sae, meta)
    if p.architecture == "gated" and not f.gated:
        p = gated_as_jumprelu(p)  # exact: the weight-tied equivalence
    return f.write(p, out)


__all__ = [
    "FORMAT_MODULES",
    "Format",
    "describe_dir",
    "detect_format",
    "formats",
    "get_format",
    "read_foreign",
    "read_portable",
    "register_format",
    "write_format",
]
