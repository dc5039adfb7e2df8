"""The interchange form every foreign format is read into and written from.

:class:`Portable` is an SAE in SAELens's terms: an ``architecture`` (``standard``, ``topk``,
``abstopk``, ``jumprelu``, ``gated``, ...), tensors in SAELens's layout (``W_enc [d_in,
d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``, ``threshold
[d_sae]``, plus architecture extras such as ``r_mag``), ``k`` for top-k architectures,
``apply_b_dec_to_input``, metadata (``model_name``, ``hook_name``, ...) and SAELens cfg fields
of architecture parts (``matryoshka_widths``: :mod:`saekit.arch`). A peer format is
a reader ``files -> Portable`` and a writer ``Portable -> files``;
:func:`sae_from_portable` and :func:`portable_from_sae` connect it to saekit through the
SAELens import and export of :mod:`saekit.io.saelens`, so a peer format never touches a
rule's state.

The transforms here are exact identities of the encode/decode maps (up to float rounding):
moving ``b_dec`` in or out of the encoder input (:func:`with_b_dec_input`), folding decoder
row norms into the encoder (:func:`fold_decoder_norm`) and writing a Gated SAE as the
JumpReLU SAE it equals (:func:`gated_as_jumprelu`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from saekit.errors import FormatError
from saekit.sae import SAE

CORE = ("W_enc", "b_enc", "W_dec", "b_dec")


@dataclass
class Portable:
    """An SAE in SAELens terms; see the module docstring."""

    architecture: str
    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    threshold: Tensor | None = None
    k: int | None = None
    apply_b_dec_to_input: bool = True
    extra: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    #: further SAELens cfg fields that describe architecture parts (``matryoshka_widths``)
    cfg_extra: dict[str, Any] = field(default_factory=dict)

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def check(self, where: str) -> Portable:
        """Raise FormatError unless every tensor has the shape ``W_enc`` implies."""
        if self.W_enc.dim() != 2:
            raise FormatError(f"{where}: W_enc must be 2-D, got shape {tuple(self.W_enc.shape)}")
        d, F = self.W_enc.shape
        d_out = int(self.W_dec.shape[-1]) if self.W_dec.dim() == 2 else d  # a transcoder's
        want = {"b_enc": (F,), "W_dec": (F, d_out), "b_dec": (d_out,)}
        if self.threshold is not None:
            want["threshold"] = (F,)
        for name, shape in want.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise FormatError(
                    f"{where}: {name} has shape {got}, expected {shape} (W_enc is [d_in={d},"
                    f" d_sae={F}])"
                )
        return self

    def replace(self, **kw: Any) -> Portable:
        return dataclasses.replace(self, **kw)

    def saelens_cfg(self) -> dict[str, Any]:
        """A plain SAELens ``cfg.json`` dict for these weights."""
        cfg: dict[str, Any] = {
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": str(self.W_enc.dtype).removeprefix("torch."),
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": "none",
        }
        if self.k is not None:
            cfg["k"] = int(self.k)
        if int(self.W_dec.shape[1]) != self.d_in:
            cfg["d_out"] = int(self.W_dec.shape[1])
        cfg.update(self.cfg_extra)
        cfg["metadata"] = dict(self.meta)
        return cfg

    def saelens_weights(self) -> dict[str, Tensor]:
        """The ``sae_weights.safetensors`` tensors (SAELens names)."""
        out = {n: getattr(self, n) for n in CORE}
        if self.architecture == "gated":
            del out["b_enc"]  # SAELens's gated SAEs have b_gate and b_mag instead
        if self.threshold is not None:
            out["threshold"] = self.threshold
        out.update(self.extra)
        return out


def with_b_dec_input(p: Portable, apply: bool) -> Portable:
    """The same SAE with ``apply_b_dec_to_input == apply``.

    ``(x - b_dec) W_enc + b_enc == x W_enc + (b_enc - b_dec W_enc)``: only ``b_enc`` changes
    (Gated SAEs: their gate and magnitude biases).
    """
    if p.apply_b_dec_to_input == apply:
        return p
    sign = -1.0 if not apply else 1.0  # dropping the subtraction moves -b_dec W into b_enc
    shift = (p.b_dec.double() @ p.W_enc.double()) * sign
    extra = dict(p.extra)
    if p.architecture == "gated":
        scale = p.extra["r_mag"].double().exp()
        extra["b_gate"] = (p.extra["b_gate"].double() + shift).to(p.b_enc.dtype)
        extra["b_mag"] = (p.extra["b_mag"].double() + shift * scale).to(p.b_enc.dtype)
        b_enc = p.b_enc
    else:
        b_enc = (p.b_enc.double() + shift).to(p.b_enc.dtype)
    return p.replace(b_enc=b_enc, extra=extra, apply_b_dec_to_input=apply)


def fold_decoder_norm(p: Portable) -> Portable:
    """SAELens's ``rescale_acts_by_decoder_norm`` made explicit: unit-norm decoder rows.

    ``pre_i * ||d_i||`` selects and ``z_i / ||d_i||`` decodes; scaling encoder column i
    and ``b_enc_i`` by ``||d_i||`` and dividing decoder row i by it gives the same codes and
    reconstructions with a plain (not rescaling) SAE; a threshold, compared with the
    rescaled ``pre``, stays as it is. After SAELens's own fold on save the norms are 1 and
    this changes nothing.
    """
    norm = p.W_dec.double().norm(dim=1)
    if bool((norm == 0).any()):
        raise FormatError("rescale_acts_by_decoder_norm with an all-zero decoder row")
    dt = p.W_enc.dtype
    return p.replace(
        W_enc=(p.W_enc.double() * norm).to(dt),
        b_enc=(p.b_enc.double() * norm).to(dt),
        W_dec=(p.W_dec.double() / norm[:, None]).to(dt),
    )


def gated_as_jumprelu(p: Portable) -> Portable:
    """A Gated SAE as the JumpReLU SAE with identical codes.

    Gated: ``f = 1[x W + b_gate > 0] * ReLU(e^r (x W) + b_mag)`` (x after b_dec
    subtraction). With ``W' = W e^r``, ``b' = b_mag`` and ``theta = b_mag - e^r b_gate``,
    ``pre' = x W' + b'`` passes the gate iff ``pre' > theta``, so
    ``f = ReLU(pre') 1[pre' > theta] = pre' 1[pre' > max(theta, 0)]``: JumpReLU with
    threshold ``max(theta, 0)`` (Rajamanoharan et al. 2024, the weight-tied equivalence).
    """
    r = p.extra["r_mag"].double().exp()
    W = (p.W_enc.double() * r).to(p.W_enc.dtype)
    b_mag, b_gate = p.extra["b_mag"].double(), p.extra["b_gate"].double()
    theta = (b_mag - r * b_gate).clamp_min(0.0)
    return p.replace(
        architecture="jumprelu",
        W_enc=W,
        b_enc=b_mag.to(p.b_enc.dtype),
        threshold=theta.to(p.b_enc.dtype),
        extra={},
    )


#: SAELens cfg fields of architecture parts that the peer formats carry (Portable.cfg_extra)
ARCH_CFG_FIELDS = ("matryoshka_widths",)

#: SAELens architectures read by an exact conversion to one saekit reads directly
CONVERTED = ("gated", "matryoshka_batchtopk")


def portable_from_saelens(cfg: dict[str, Any], weights: dict[str, Tensor]) -> Portable:
    """A plain SAELens cfg and weights as a :class:`Portable` in a form saekit's rules hold.

    ``rescale_acts_by_decoder_norm`` (SAELens's TopK default, a no-op once SAELens folds
    the norms on save) is folded (:func:`fold_decoder_norm`); what no rule imports (the
    architecture parts, :mod:`saekit.arch`, have taken theirs first): ``gated`` becomes the
    equivalent ``jumprelu`` (:func:`gated_as_jumprelu`), ``matryoshka_batchtopk`` (SAELens's
    training architecture; its inference saves are ``jumprelu``) ``batchtopk``.
    """
    arch = cfg.get("architecture", "standard")
    missing = [n for n in CORE if n not in weights and not (n == "b_enc" and arch == "gated")]
    if missing:
        raise FormatError(f"SAELens weights lack {missing}")
    extra = {n: t for n, t in weights.items() if n not in (*CORE, "threshold")}
    b_enc = weights.get("b_enc")
    if b_enc is None:  # gated SAEs have b_gate / b_mag instead
        b_enc = weights["b_mag"] if "b_mag" in weights else weights["W_enc"].new_zeros(1)
    p = Portable(
        architecture=(
            "batchtopk" if arch == "matryoshka_batchtopk" and _import_rule(arch) is None else arch
        ),
        W_enc=weights["W_enc"],
        b_enc=b_enc,
        W_dec=weights["W_dec"],
        b_dec=weights["b_dec"],
        threshold=weights.get("threshold"),
        k=cfg.get("k"),
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        extra=extra,
        meta=dict(cfg.get("metadata") or {}),
        cfg_extra={k: cfg[k] for k in ARCH_CFG_FIELDS if k in cfg},
    )
    if cfg.get("rescale_acts_by_decoder_norm"):
        p = fold_decoder_norm(p)
    if p.architecture == "gated" and _import_rule("gated") is None:
        for n in ("r_mag", "b_gate", "b_mag"):
            if n not in weights:
                raise FormatError(f"SAELens gated weights lack {n!r}")
        p = gated_as_jumprelu(p)
    return p


def _import_rule(arch: str) -> Any:
    from saekit.rules.base import saelens_import_rule

    return saelens_import_rule(arch)


def canonical_saelens(
    cfg: dict[str, Any], weights: dict[str, Tensor]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``cfg`` and ``weights`` after :func:`portable_from_saelens` (rescale folded, exact
    conversions made), ready for the rule that imports the architecture."""
    p = portable_from_saelens(cfg, weights)
    cfg = {**cfg, "architecture": p.architecture, "rescale_acts_by_decoder_norm": False}
    return cfg, p.saelens_weights()


def sae_from_portable(p: Portable, k: int | None = None) -> SAE:
    """A saekit SAE equal to ``p`` at inference (via the SAELens import)."""
    from saekit.io.saelens import sae_from_saelens

    cfg = p.saelens_cfg()
    return sae_from_saelens(cfg, p.saelens_weights(), k)


@torch.no_grad()
def portable_from_sae(sae: SAE, meta: dict[str, Any] | None = None) -> Portable:
    """``sae`` as SAELens would load it (folded weights; the rule's SAELens export)."""
    import warnings

    from saekit.io.saelens import saelens_export

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the signed-codes warning is the writer's to give
        cfg, w = saelens_export(sae, site=str((meta or {}).get("hook_name") or ""))
    extra = {n: t for n, t in w.items() if n not in (*CORE, "threshold")}
    return Portable(
        architecture=cfg["architecture"],
        W_enc=w["W_enc"],
        b_enc=w["b_enc"] if "b_enc" in w else w["b_mag"],  # gated: b_gate / b_mag in extra
        W_dec=w["W_dec"],
        b_dec=w["b_dec"],
        threshold=w.get("threshold"),
        k=cfg.get("k"),
        apply_b_dec_to_input=bool(cfg["apply_b_dec_to_input"]),
        extra=extra,
        meta={**cfg.get("metadata", {}), **(meta or {})},
        cfg_extra={k: cfg[k] for k in ARCH_CFG_FIELDS if k in cfg},
    )


def refuse(fmt: str, p: Portable, allowed: tuple[str, ...], why: str = "") -> None:
    """FormatError unless ``p.architecture`` is one ``fmt`` can hold."""
    if p.architecture not in allowed:
        raise FormatError(
            f"the {fmt} format holds {', '.join(allowed)} SAEs; this SAE exports as"
            f" {p.architecture!r}{why}"
        )


__all__ = [
    "CORE",
    "Portable",
    "CONVERTED",
    "canonical_saelens",
    "fold_decoder_norm",
    "gated_as_jumprelu",
    "portable_from_sae",
    "portable_from_saelens",
    "refuse",
    "sae_from_portable",
    "with_b_dec_input",
]
