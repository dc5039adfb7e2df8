"""The selection-rule interface.

A rule turns pre-activations ``pre [B, d_sae]`` into codes. It says *which* latents are
active (``select``) and *what value* each active latent takes (``activate``); the SAE
computes the selected pre-activations with a sparse kernel, so a rule never needs to touch
the dense gradient. Rules whose codes are dense (ReLU, JumpReLU) return ``Selection.dense``
instead. A rule is an ``nn.Module``: learned thresholds and running statistics are its
parameters and buffers and travel with the SAE's ``state_dict``.

To add a rule, write one file in this package with a ``@register``-ed subclass of ``Rule``
(the package imports every module in it), or the same in a module of your own imported
before use (:mod:`saekit.plugins`: ``saekit --plugin MODULE``, ``SAEKIT_PLUGINS``, entry
points). Everything about a rule lives on its class: options, flags, the named inputs it
reads (``requires``), its aux-loss form, its SAELens export and import, and its sparsity
knob for matched-sparsity comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from saekit.distributed.comm import LOCAL, Comm
from saekit.errors import ConfigError, FormatError
from saekit.plugins import load_plugins, registered, registered_names

if TYPE_CHECKING:
    from saekit.config import SAEConfig
    from saekit.sae import SAE, SAEOutput


@dataclass
class NoOptions:
    """This rule takes no options beyond SAEConfig's."""


@dataclass
class Selection:
    """Which latents are active for each token.

    ``indices [B, K]`` with ``mask [B, K]`` (``None``: all valid) for sparse codes, where K
    may differ between batches and padding entries are masked; or ``dense [B, d_sae]``
    codes (with grad) for dense rules. ``extras`` carries rule outputs (k per token, ...).
    """

    indices: Tensor | None = None
    mask: Tensor | None = None
    dense: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """What a rule may look at besides the pre-activations."""

    sae: SAE
    training: bool
    x: Tensor  # input in the SAE's (normalised) space [B, d_in]
    x_in: Tensor  # encoder input: x - b_dec or x
    #: named extra inputs in SAE units, ``[B, ...]`` (see ``Rule.requires``, saekit.inputs)
    inputs: dict[str, Tensor] = field(default_factory=dict)
    step: int = 0
    #: batch-global reductions and cross-shard selections (saekit.distributed.comm)
    comm: Comm = LOCAL


@dataclass(frozen=True)
class SparsityKnob:
    """How a rule's L0 is set, for matched-sparsity comparisons (``saekit bench``).

    ``kind``: ``"k"`` (``SAEConfig.k`` is the mean L0, per token or per batch), ``"option"``
    (a penalty in ``rule_options[option]`` sets it: try ``grid`` with ``fixed`` options, on
    inputs with E||x||^2 = d_in, and keep the value whose L0 is closest), or ``"free"`` (the
    rule chooses its own L0; reported as is).
    """

    kind: str = "k"
    option: str = ""
    grid: tuple[float, ...] = ()
    fixed: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("k", "option", "free"):
            raise ValueError(f"SparsityKnob.kind must be k, option or free, got {self.kind!r}")
        if self.kind == "option" and not (self.option and self.grid):
            raise ValueError("SparsityKnob(kind='option') needs option and grid")


@dataclass
class SAELensExport:
    """What a rule adds to a SAELens export: ``architecture``, extra ``cfg.json`` fields and
    extra ``sae_weights`` tensors (e.g. ``threshold [d_sae]``), in the folded (raw) units."""

    architecture: str
    cfg: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict)


class Rule(nn.Module):
    """Base class: TopK-style defaults that subclasses override."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    #: codes may be negative (AbsTopK, vSAE): L0 counts nonzeros, never ``> 0``
    signed: ClassVar[bool] = False
    #: the loss needs gradients through every pre-activation (dense path)
    needs_dense_grad: ClassVar[bool] = False
    #: reconstruction loss used when SAEConfig.recon_loss is "auto"
    default_recon: ClassVar[str] = "nmse"
    #: the aux loss (``SAEConfig.aux``) applies to this rule
    uses_aux: ClassVar[bool] = True
    #: aux-loss form of this rule's paper code when ``aux_options.form`` is "auto"
    #: (see :mod:`saekit.losses.aux`): "openai", "bussmann" or "saelens"
    aux_form: ClassVar[str] = "openai"
    #: named inputs besides x that the rule reads from ``ctx.inputs`` (e.g. ``("grad",)``);
    #: the trainer asks the source for them. Inference must cope with their absence.
    requires: ClassVar[tuple[str, ...]] = ()
    #: SAELens architecture of the default :meth:`saelens_export` ("topk", "jumprelu" with
    #: ``export_threshold()``, "standard"); None: the rule cannot be exported
    saelens_architecture: ClassVar[str | None] = None
    #: SAELens architectures that :meth:`from_saelens` loads as this rule (not inherited)
    saelens_imports: ClassVar[tuple[str, ...]] = ()
    #: how the rule's L0 is set, for matched-sparsity comparisons
    sparsity: ClassVar[SparsityKnob] = SparsityKnob("k")
    #: selection, activation and loss terms are exact when latents are sharded across ranks
    #: (they reach other latents only through ``ctx.comm``)
    latent_shardable: ClassVar[bool] = False
    #: ``select`` is the per-token top-``cfg.k`` of ``pre`` (mask None), so that the SAE may
    #: compute it chunk by chunk without the dense pre-activations (``encoder_chunk``)
    row_topk: ClassVar[bool] = False

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        from saekit.options import from_dict

        where = f"SAEConfig.rule_options of rule {self.name!r}"
        self.opts = from_dict(self.Options, dict(cfg.rule_options), where=where)

    def select(self, pre: Tensor, ctx: Context) -> Selection:  # pragma: no cover - abstract
        raise NotImplementedError

    def activate(self, pre_sel: Tensor, sel: Selection, ctx: Context) -> Tensor:
        """Values of the selected latents from their pre-activations (default: ReLU)."""
        return torch.relu(pre_sel)

    def loss_terms(self, out: SAEOutput, ctx: Context) -> dict[str, Tensor]:
        """Rule-specific loss terms, already weighted; summed into the total loss."""
        return {}

    def export_threshold(self) -> Tensor | None:
        """Per-latent threshold for JumpReLU-style inference export, if any."""
        return None

    def aux_latents(self, out: SAEOutput) -> Tensor | None:
        """Dense latent values ``[B, d_sae]`` (with grad) the aux loss ranks and uses instead
        of the pre-activations (None, the default: the pre-activations)."""
        return None

    @property
    def input_norm(self) -> str:
        """Per-token input normalisation the SAE applies before encoding: "none", or
        "token" (each token standardised to mean 0, std 1 over ``d_in``, undone on the
        reconstruction; see ``saekit.sae.token_standardise``)."""
        return "none"

    # -------------------------------------------------------------- run hooks (trainer)
    #: the rule calibrates its inference state on held-back batches after training: the
    #: trainer then calls begin_calibration, calibrate (per batch) and end_calibration
    calibrates: ClassVar[bool] = False

    def setup_training(self, total_steps: int) -> None:
        """Told the run's length before training (and again on resume); default: nothing."""

    def init_selection(self, pre: Tensor, ctx: Context) -> Selection:
        """The selection ``SAE.init_from_data`` scales the encoder with (no state change).

        Default: :meth:`select` as given (inference for an untrained SAE). Rules whose
        inference differs from training before calibration (batch rules) return codes like
        their training ones here, so that the initial scale matches what they train with.
        ``init_from_data`` sees the whole sample on every rank: no batch-axis collective.
        """
        return self.select(pre, ctx)

    def begin_calibration(self, comm: Comm = LOCAL) -> None:
        """Start a calibration pass (reset its accumulators)."""

    def calibrate(self, pre: Tensor, ctx: Context) -> None:
        """Accumulate one held-back batch's pre-activations ``[B, d_sae]`` (no grad)."""

    def end_calibration(self, comm: Comm = LOCAL) -> None:
        """Set the inference state from the accumulated batches (none: keep it as is)."""

    def batch_stat(self, t: Tensor, op: str, comm: Comm = LOCAL) -> Tensor:
        """This rule's one reduction point for batch-global statistics (no grad).

        Every statistic a rule takes over "the batch" (budgets, thresholds, frequencies)
        passes through here, so that it is taken over the global batch under
        :mod:`saekit.distributed`: ``op`` "sum" over the batch axis (per-latent statistics,
        token counts), "total" over every rank (a scalar partial over tokens and latent
        shards), "min" / "max" over every rank. With one process, ``t`` itself.
        """
        if op == "sum":
            return comm.batch_sum(t)
        if op == "total":
            return comm.latent_sum(comm.batch_sum(t))
        if op == "min":
            return comm.all_min(t)
        if op == "max":
            return comm.all_max(t)
        raise ValueError(f"unknown reduction {op!r}; use sum, total, min or max")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        # buffers added after a file was written (optional_state) load as their defaults
        for name in self.optional_state:
            key = prefix + name
            if key not in state_dict and name in self._buffers:
                state_dict[key] = self._buffers[name].detach().clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    #: buffer names that files written by older versions may lack (loaded as defaults)
    optional_state: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ SAELens
    def saelens_export(self) -> SAELensExport:
        """The SAELens architecture, cfg fields and tensors that reproduce this rule's
        inference; raise :class:`~saekit.errors.FormatError` (one line: why, and what to do)
        when SAELens has no equivalent. Default: from ``saelens_architecture``."""
        arch = self.saelens_architecture
        if arch == "topk":
            return SAELensExport("topk", {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False})
        if arch == "jumprelu":
            th = self.export_threshold()
            if th is None:
                raise FormatError(f"rule {self.name!r} exports as jumprelu but has no threshold")
            return SAELensExport("jumprelu", tensors={"threshold": th.detach().clone()})
        if arch == "standard":
            return SAELensExport("standard")
        raise FormatError(
            f"rule {self.name!r} has no SAELens equivalent (its class sets no"
            " saelens_architecture and does not override saelens_export); use the saekit run"
            " directory with saekit.io.load_sae"
        )

    @classmethod
    def from_saelens(
        cls, cfg: dict[str, Any], weights: dict[str, Tensor]
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """For a SAELens ``cfg.json`` of an architecture in ``saelens_imports``: SAEConfig
        fields to set (``k``, ``rule_options``, ...) and the rule's own state tensors (names
        as in the rule's ``state_dict``). Default: nothing beyond the shared weights."""
        return {}, {}


def saelens_int_k(cfg: dict[str, Any]) -> int:
    """``cfg["k"]`` as an int; fractional or missing k is a :class:`FormatError`."""
    kk = cfg.get("k")
    if kk is None:
        raise FormatError(f"SAELens {cfg.get('architecture')} cfg has no 'k'; pass k=")
    if float(kk) != int(kk):
        raise FormatError(f"fractional k={kk} in the SAELens cfg is not supported")
    return int(kk)


_REGISTRY: dict[str, type[Rule]] = {}


def register(cls: type[Rule]) -> type[Rule]:
    """Class decorator: make a rule available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        old = _REGISTRY[cls.name]
        if (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(
                f"rule {cls.name!r} registered twice ({old.__module__}.{old.__qualname__} and"
                f" {cls.__module__}.{cls.__qualname__})"
            )
    for arch in own_saelens_imports(cls):
        other = saelens_import_rule(arch, load=False)
        if other is not None and other.name != cls.name:
            raise ValueError(
                f"rule {cls.name!r} claims SAELens architecture {arch!r}, already loaded as"
                f" rule {other.name!r}"
            )
    _REGISTRY[cls.name] = cls
    return cls


def rule_names() -> list[str]:
    """Names of the registered rules (plugins included)."""
    return registered_names(_REGISTRY)


def get_rule_class(name: str) -> type[Rule]:
    cls = registered(_REGISTRY, name)
    if cls is None:
        raise ConfigError(
            f"unknown rule {name!r}; known rules: {', '.join(rule_names())} (a rule of your own"
            " must be imported first: saekit --plugin MODULE, or SAEKIT_PLUGINS=MODULE)"
        )
    return cls


def saelens_import_rule(arch: str, load: bool = True) -> type[Rule] | None:
    """The rule that loads SAELens architecture ``arch``, or None."""
    if load:
        load_plugins()
    for cls in _REGISTRY.values():
        if arch in own_saelens_imports(cls):
            return cls
    return None


def own_saelens_imports(cls: type[Rule]) -> tuple[str, ...]:
    """``saelens_imports`` declared on ``cls`` itself (a subclass does not inherit claims)."""
    return tuple(cls.__dict__.get("saelens_imports", ()))


def saelens_import_architectures() -> list[str]:
    """Every SAELens architecture some registered rule loads."""
    load_plugins()
    return sorted({a for c in _REGISTRY.values() for a in own_saelens_imports(c)})


def build_rule(cfg: SAEConfig) -> Rule:
    return get_rule_class(cfg.rule)(cfg)


def topk_indices(score: Tensor, k: int) -> Tensor:
    """Indices of the k largest entries of each row (k clipped to the row length)."""
    return score.topk(min(k, score.shape[-1]), dim=-1, sorted=False).indices
