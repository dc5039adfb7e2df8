"""Architecture parts: what an SAE is besides its selection rule.

The rule (:mod:`saekit.rules`) says which latents fire and with what value; an
*architecture part* changes one other stage of the SAE:

* ``wiring``: what the SAE reads and predicts. ``transcoder``: input at one site, target at
  another (optional learned skip path); ``crosscoder``: the concatenation of several sites
  in, a decoder into each of them out.
* ``encoder``: how the rule's pre-activations and the code values are formed: ``gated``.
* ``objective``: what the reconstruction loss sums: ``matryoshka`` (nested prefixes).

``SAEConfig.arch`` lists the parts (empty: a plain SAE); ``SAEConfig.arch_options`` holds
their options, flat: each key is a field of exactly one listed part's ``Options``. Parts of
different stages combine (a Matryoshka transcoder, a gated crosscoder); two parts of one
stage are a :class:`~saekit.errors.ConfigError`. Every part combines with every rule: a part
never looks at a rule's name, only at what rules declare (``Rule.activate``, ``signed``,
the rule's SAELens export), so a Matryoshka Feature Choice SAE or an AbsTopK transcoder is
the same code as a Matryoshka BatchTopK SAE.

A part is an ``nn.Module`` (its parameters and buffers travel in the SAE's ``state_dict``
under ``arch.<name>.``) with hooks the SAE, the trainer, the exporter and ``saekit eval``
call; every hook defaults to "no change". To add a part, write one module in this package
with a ``@register_arch`` subclass of :class:`ArchPart` (or a plugin module,
:mod:`saekit.plugins`).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from saekit.errors import ConfigError, DataError
from saekit.options import Options
from saekit.plugins import registered, registered_names

if TYPE_CHECKING:
    from saekit.config import SAEConfig
    from saekit.rules.base import Context, SAELensExport, Selection
    from saekit.sae import SAE, SAEOutput

STAGES = ("objective", "encoder", "wiring")


@dataclass
class NoArchOptions(Options):
    """This part takes no options."""


class ArchPart(nn.Module):
    """Base class of an architecture part; every hook defaults to "no change"."""

    name: ClassVar[str] = ""
    stage: ClassVar[str] = ""
    Options: ClassVar[type] = NoArchOptions
    #: the target is not the input (a transcoder): per-token input statistics cannot be
    #: undone on the reconstruction
    predicts_other: ClassVar[bool] = False

    def __init__(self, cfg: SAEConfig, opts: Any) -> None:
        super().__init__()
        self.cfg, self.opts = cfg, opts

    @classmethod
    def adjust_config(cls, cfg: SAEConfig) -> None:
        """Settle fields this part decides, on the SAE's resolved config copy (in place)."""

    # ---------------------------------------------------------------- wiring (static)
    @classmethod
    def sites(cls, opts: Any, site: str) -> tuple[list[str], list[str]]:
        """``(input sites, target sites)`` of an SAE planned at ``site`` (concatenated in
        this order); default ``([site], [site])``: an autoencoder."""
        return [site], [site]

    @classmethod
    def plan_sites(cls, opts: Any, sites: list[str]) -> list[str]:
        """The sites at which one SAE each is planned, given the run's sites (default: all)."""
        return list(sites)

    @classmethod
    def check_widths(cls, opts: Any, ins: list[int], outs: list[int]) -> None:
        """Check the data's widths of the input and target sites (raise ConfigError)."""

    # ---------------------------------------------------------------- forward
    def code_values(self, sae: SAE, pre_sel: Tensor, sel: Selection, ctx: Context) -> Tensor:
        """Values of the selected latents (sparse path): default the rule's ``activate``;
        ``sel.extras`` may carry what :meth:`rule_output` needs (it reaches ``out.extras``)."""
        return sae.rule.activate(pre_sel, sel, ctx)

    def dense_codes(self, sae: SAE, sel: Selection, pre: Tensor, ctx: Context) -> Tensor:
        """Codes of dense rules from the rule's selection (default: ``sel.dense`` as is);
        ``sel.extras`` may carry what :meth:`rule_output` needs (it reaches ``out.extras``)."""
        assert sel.dense is not None
        return sel.dense

    def decode_extra(self, sae: SAE, xn: Tensor) -> Tensor | None:
        """A term added to the reconstruction in SAE units (a skip path), or None."""
        return None

    def rule_output(self, out: SAEOutput) -> SAEOutput:
        """What the rule's ``loss_terms`` see (gated: the gate's codes); default ``out``."""
        return out

    # ---------------------------------------------------------------- training
    def loss_terms(
        self, sae: SAE, out: SAEOutput, ctx: Context, target: Tensor
    ) -> dict[str, Tensor]:
        """Terms added to (or replacing, by name) the SAE's loss; ``target`` in SAE units."""
        return {}

    def decoder_norms(self, sae: SAE) -> Tensor | None:
        """Per-latent decoder norm that norm-weighted penalties use (None: ``||W_dec_i||``)."""
        return None

    def output_scale(self, sae: SAE) -> Tensor | None:
        """The target's scale when it differs from the input's (None: ``input_scale``)."""
        return None

    def init_from_data(self, sae: SAE, xn: Tensor, target: Tensor | None) -> None:
        """After ``SAE.init_from_data`` set the scales: adjust the initialisation."""

    # ---------------------------------------------------------------- export
    def fold(self, sae: SAE, weights: dict[str, Tensor], s_in: float, s_out: float) -> None:
        """Add this part's tensors to the folded (raw-unit) weights, in place."""

    def saelens_export(self, sae: SAE, exp: SAELensExport, weights: dict[str, Tensor]) -> None:
        """Turn the rule's SAELens export into this architecture's, in place (raise
        :class:`~saekit.errors.FormatError` when SAELens has no equivalent)."""

    @classmethod
    def from_saelens(cls, cfg: dict[str, Any], weights: dict[str, Tensor]) -> SAELensImport | None:
        """What this part takes from a plain SAELens ``cfg.json`` and its weights when they
        describe it (read by :mod:`saekit.io.saelens`, so by every peer format), else None."""
        return None

    # ---------------------------------------------------------------- evaluation
    def eval_accumulators(self, sae: SAE) -> dict[str, Any]:
        """``saekit eval`` sections: name -> accumulator with ``update(sae, x, target, out)``
        (``x``, ``target`` raw; ``out`` the SAE's forward of ``x``) and ``result()``."""
        return {}


_REGISTRY: dict[str, type[ArchPart]] = {}


def register_arch(cls: type[ArchPart]) -> type[ArchPart]:
    """Class decorator: make an architecture part available by its ``name``."""
    if not cls.name or cls.stage not in STAGES:
        raise ValueError(f"{cls.__name__}: needs a name and a stage in {STAGES}")
    old = _REGISTRY.get(cls.name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"architecture part {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def arch_names() -> list[str]:
    """Names of the registered architecture parts (plugins included)."""
    return registered_names(_REGISTRY)


def get_arch_class(name: str) -> type[ArchPart]:
    cls = registered(_REGISTRY, name)
    if cls is None:
        raise ConfigError(
            f"unknown architecture part {name!r} in SAEConfig.arch (--arch); known:"
            f" {', '.join(arch_names())}"
        )
    return cls


def parse_arch(cfg: SAEConfig) -> list[tuple[type[ArchPart], Any]]:
    """``[(part class, its options)]`` of ``cfg.arch`` in stage order, options checked.

    Each key of ``cfg.arch_options`` must be a field of exactly one listed part; two parts
    of one stage, a repeated part or an unknown key are a ConfigError naming the fix.
    """
    from saekit.options import from_dict

    classes = [get_arch_class(n) for n in cfg.arch]
    seen: dict[str, str] = {}
    for c in classes:
        if c.stage in seen:
            raise ConfigError(
                f"SAEConfig.arch {list(cfg.arch)}: {seen[c.stage]!r} and {c.name!r} both change"
                f" the {c.stage} stage; keep one of them"
            )
        seen[c.stage] = c.name
    owner: dict[str, str] = {}
    for c in classes:
        for f in dataclasses.fields(c.Options):
            owner[f.name] = c.name
    unknown = sorted(set(cfg.arch_options) - set(owner))
    if unknown:
        near = difflib.get_close_matches(unknown[0], list(owner), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        known = ", ".join(sorted(owner)) or "none"
        raise ConfigError(
            f"SAEConfig.arch_options: unknown option(s) {unknown}{hint} for arch"
            f" {list(cfg.arch)}; their options: {known}"
        )
    out = []
    for c in sorted(classes, key=lambda c: STAGES.index(c.stage)):
        mine = {k: v for k, v in cfg.arch_options.items() if owner[k] == c.name}
        out.append((c, from_dict(c.Options, mine, where=f"SAEConfig.arch_options ({c.name})")))
    return out


class ArchStack(nn.ModuleDict):
    """The parts of one SAE (``SAE.arch``), in stage order; empty for a plain SAE.

    Each hook asks the part of the stage that owns it (or every part, for loss terms,
    initialisation, folding, export and evaluation).
    """

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__({c.name: c(cfg, opts) for c, opts in parse_arch(cfg)})

    def part(self, stage: str) -> ArchPart | None:
        for p in self.children():
            if isinstance(p, ArchPart) and p.stage == stage:
                return p
        return None

    @property
    def all(self) -> list[ArchPart]:
        return [p for p in self.children() if isinstance(p, ArchPart)]

    def code_values(self, sae: SAE, pre_sel: Tensor, sel: Selection, ctx: Context) -> Tensor:
        p = self.part("encoder")
        return p.code_values(sae, pre_sel, sel, ctx) if p else sae.rule.activate(pre_sel, sel, ctx)

    def dense_codes(self, sae: SAE, sel: Selection, pre: Tensor, ctx: Context) -> Tensor:
        p = self.part("encoder")
        if p is None:
            assert sel.dense is not None
            return sel.dense
        return p.dense_codes(sae, sel, pre, ctx)

    def rule_output(self, out: SAEOutput) -> SAEOutput:
        p = self.part("encoder")
        return p.rule_output(out) if p else out

    def decode_extra(self, sae: SAE, xn: Tensor) -> Tensor | None:
        p = self.part("wiring")
        return p.decode_extra(sae, xn) if p else None

    def decoder_norms(self, sae: SAE) -> Tensor | None:
        p = self.part("wiring")
        return p.decoder_norms(sae) if p else None

    def output_scale(self, sae: SAE) -> Tensor | None:
        p = self.part("wiring")
        return p.output_scale(sae) if p else None

    def loss_terms(
        self, sae: SAE, out: SAEOutput, ctx: Context, target: Tensor
    ) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        for p in self.all:
            terms.update(p.loss_terms(sae, out, ctx, target))
        return terms

    def init_from_data(self, sae: SAE, xn: Tensor, target: Tensor | None) -> None:
        for p in self.all:
            p.init_from_data(sae, xn, target)

    def fold(self, sae: SAE, weights: dict[str, Tensor], s_in: float, s_out: float) -> None:
        for p in self.all:
            p.fold(sae, weights, s_in, s_out)

    def saelens_export(self, sae: SAE, exp: SAELensExport, weights: dict[str, Tensor]) -> None:
        for p in self.all:
            p.saelens_export(sae, exp, weights)

    def eval_accumulators(self, sae: SAE) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in self.all:
            out.update(p.eval_accumulators(sae))
        return out


@dataclass
class SAELensImport:
    """A part's reading of a plain SAELens SAE: its ``options``; the ``cfg`` and ``weights``
    left for the rule's import (e.g. ``gated`` -> ``standard`` with ``b_enc = b_gate``); its
    own tensors ``state`` (local names, e.g. ``r_mag``)."""

    options: dict[str, Any]
    cfg: dict[str, Any]
    weights: dict[str, Tensor]
    state: dict[str, Tensor] = dataclasses.field(default_factory=dict)


@dataclass
class ArchImport:
    """:func:`arch_from_saelens`'s result: ``SAEConfig.arch`` / ``arch_options``, the cfg
    and weights for the rule's import, and the parts' tensors (``arch.<name>.<tensor>``)."""

    arch: list[str]
    options: dict[str, Any]
    cfg: dict[str, Any]
    weights: dict[str, Tensor]
    state: dict[str, Tensor]


def arch_from_saelens(cfg: dict[str, Any], weights: dict[str, Tensor]) -> ArchImport:
    """The architecture parts a plain SAELens SAE describes (each part's
    :meth:`ArchPart.from_saelens`, in stage order, each seeing the previous one's cfg and
    weights); no parts for a plain SAE."""
    out = ArchImport([], {}, dict(cfg), dict(weights), {})
    for name in sorted(arch_names(), key=lambda n: STAGES.index(_REGISTRY[n].stage)):
        got = _REGISTRY[name].from_saelens(out.cfg, out.weights)
        if got is None:
            continue
        out.arch.append(name)
        out.options.update(got.options)
        out.cfg, out.weights = got.cfg, got.weights
        out.state.update({f"arch.{name}.{k}": v for k, v in got.state.items()})
    return out


# ---------------------------------------------------------------------- data side
def arch_sites(cfg: SAEConfig, site: str) -> tuple[list[str], list[str]]:
    """``(input sites, target sites)`` of an SAE with config ``cfg`` planned at ``site``."""
    for c, opts in parse_arch(cfg):
        if c.stage == "wiring":
            return c.sites(opts, site)
    return [site], [site]


def plan_sites(cfg: SAEConfig, sites: list[str]) -> list[str]:
    """Where one SAE each is planned for a run whose source has ``sites``."""
    for c, opts in parse_arch(cfg):
        if c.stage == "wiring":
            return c.plan_sites(opts, sites)
    return list(sites)


def needed_sites(cfg: SAEConfig, sites: list[str]) -> list[str]:
    """Every site the SAEs planned on ``sites`` read (inputs and targets), in order."""
    out: list[str] = []
    for s in plan_sites(cfg, sites):
        ins, outs = arch_sites(cfg, s)
        out += [t for t in (*ins, *outs) if t not in out]
    return out


def input_site(cfg: SAEConfig, site: str, name: str) -> str:
    """Where an SAE planned at ``site`` reads its named input ``name``: a gradient
    (``InputKind.scaling == "grad"``, e.g. gtopk's dLoss/dx, used in the decoder's space) at
    its target site when it writes one other site (a transcoder), everything else at ``site``."""
    from saekit.inputs import input_kind

    ins, outs = arch_sites(cfg, site)
    if input_kind(name).scaling == "grad" and len(outs) == 1 and outs != ins:
        return outs[0]
    return site


def site_inputs_of(
    cfg: SAEConfig, site: str, batch_inputs: Mapping[str, Mapping[str, Tensor]], names: Any
) -> dict[str, Tensor]:
    """``{name: batch_inputs[name][input_site(...)]}`` for the ``names`` the batch has."""
    out = {}
    for n in names:
        at = input_site(cfg, site, n)
        if at in batch_inputs.get(n, {}):
            out[n] = batch_inputs[n][at]
    return out


def widths(cfg: SAEConfig, site: str, d_of: Callable[[str], int]) -> tuple[int, int]:
    """``(d_in, d_out)`` of an SAE at ``site``: summed widths of its input and target sites
    (``d_of``: a site's width, e.g. ``source.d_in``)."""
    ins, outs = arch_sites(cfg, site)
    w_in, w_out = [d_of(s) for s in ins], [d_of(s) for s in outs]
    for c, opts in parse_arch(cfg):
        if c.stage == "wiring":
            c.check_widths(opts, w_in, w_out)
    return sum(w_in), sum(w_out)


def gather(acts: Mapping[str, Tensor], sites: list[str], where: str = "batch") -> Tensor:
    """The activations of ``sites`` concatenated along the last axis."""
    missing = [s for s in sites if s not in acts]
    if missing:
        raise DataError(
            f"the {where} has no activations for {missing} (it has {sorted(acts)}); add them"
            " to the data's sites (--sites)"
        )
    ts = [acts[s] for s in sites]
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim=-1)


def views(cfg: SAEConfig, site: str, acts: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
    """``(x, target)`` of an SAE at ``site`` from per-site activations: its input sites
    concatenated, and its target sites concatenated (None when the target is ``x``)."""
    ins, outs = arch_sites(cfg, site)
    x = gather(acts, ins)
    return x, None if outs == ins else gather(acts, outs)


__all__ = [
    "STAGES",
    "ArchPart",
    "ArchImport",
    "ArchStack",
    "NoArchOptions",
    "SAELensImport",
    "arch_from_saelens",
    "arch_names",
    "arch_sites",
    "gather",
    "get_arch_class",
    "input_site",
    "site_inputs_of",
    "needed_sites",
    "parse_arch",
    "plan_sites",
    "register_arch",
    "views",
    "widths",
]
