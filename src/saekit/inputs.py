"""Named inputs: per-site tensors a batch carries besides the activations.

A rule that needs more than ``x`` names it in ``Rule.requires`` (g-SAE: ``("grad",)``).
Sources put such tensors in ``Batch.inputs[name][site]`` (``[B, ...]``, the same tokens as
``Batch.acts[site]``); the trainer asks its source for the names its SAEs' rules require
(``ActivationSource.request_inputs``) and hands each SAE ``{name: Batch.inputs[name][site]}``
for its site; the SAE converts them to its own units (:class:`InputKind`) and passes them to
the rule as ``Context.inputs``. Every name is registered here with how it scales, so the SAE
never needs to know what an input means.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import Tensor

from saekit.errors import ConfigError

#: how an input relates to the SAE's input scaling ``x_n = s * x`` (``normalize_input``)
SCALINGS = ("act", "grad", "none")


@dataclass(frozen=True)
class InputKind:
    """A named input. ``scaling``: ``"act"`` scales like the activations (``* s``; e.g. a
    target activation at another site), ``"grad"`` like dLoss/dx (``/ s``), ``"none"`` not."""

    name: str
    scaling: str
    help: str

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise ValueError(f"InputKind.scaling must be one of {SCALINGS}, got {self.scaling!r}")


_KINDS: dict[str, InputKind] = {}


def register_input(kind: InputKind) -> InputKind:
    """Make ``kind.name`` usable in ``Rule.requires`` and ``Batch.inputs``."""
    old = _KINDS.get(kind.name)
    if old is not None and old != kind:
        raise ValueError(f"input {kind.name!r} registered twice with different meanings")
    _KINDS[kind.name] = kind
    return kind


def input_kind(name: str) -> InputKind:
    try:
        return _KINDS[name]
    except KeyError:
        raise ConfigError(
            f"unknown named input {name!r}; known: {', '.join(sorted(_KINDS))} (register it"
            " with saekit.inputs.register_input)"
        ) from None


def input_names() -> list[str]:
    return sorted(_KINDS)


def to_sae_units(inputs: Mapping[str, Tensor], scale: Tensor | None) -> dict[str, Tensor]:
    """Each input in the SAE's units, given its input scale ``s`` (None: no scaling)."""
    out = {}
    for name, t in inputs.items():
        how = input_kind(name).scaling
        if scale is None or how == "none":
            out[name] = t
        else:
            out[name] = t * scale if how == "act" else t / scale
    return out


def site_inputs(
    batch_inputs: Mapping[str, Mapping[str, Tensor]], site: str, names: Iterable[str]
) -> dict[str, Tensor]:
    """``{name: batch_inputs[name][site]}`` for the ``names`` the batch has at ``site``."""
    return {n: batch_inputs[n][site] for n in names if site in batch_inputs.get(n, {})}


GRAD = register_input(
    InputKind(
        "grad",
        "grad",
        "dLoss/dx at the site: the LM's next-token loss gradient (HF source on decoder LMs,"
        " or a cache written from one)",
    )
)

TARGET = register_input(
    InputKind(
        "target",
        "none",
        "the reconstruction target when it is not x, raw (a transcoder's activations at its"
        " target site; saekit.arch.views); the SAE scales it by its own output scale",
    )
)

__all__ = [
    "GRAD",
    "TARGET",
    "SCALINGS",
    "InputKind",
    "input_kind",
    "input_names",
    "register_input",
    "site_inputs",
    "to_sae_units",
]
