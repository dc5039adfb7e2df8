"""The selection-rule interface.

A rule turns pre-activations ``pre [B, d_sae]`` into codes. It says *which* latents are
active (``select``) and *what value* each active latent takes (``activate``); the SAE
computes the selected pre-activations with a sparse kernel, so a rule never needs to touch
the dense gradient. Rules whose codes are dense (ReLU, JumpReLU) return ``Selection.dense``
instead. A rule is an ``nn.Module``: learned thresholds and running statistics are its
parameters and buffers and travel with the SAE's ``state_dict``.

To add a rule, write one file in this package with a ``@register``-ed subclass of ``Rule``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from saekit.distributed.comm import LOCAL, Comm
from saekit.errors import ConfigError

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
    grad: Tensor | None = None  # dLoss/dx in the same space [B, d_in] (gtopk)
    step: int = 0
    #: batch-global reductions and cross-shard selections (saekit.distributed.comm)
    comm: Comm = LOCAL


#: rule_options keys read by shared components rather than by the rule (e.g. the aux-zipf
#: loss's options under ``"aux_zipf"``); rules ignore them.
SHARED_OPTION_KEYS: frozenset[str] = frozenset({"aux_zipf"})


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
    #: the aux-k / aux-zipf loss applies to this rule
    uses_aux: ClassVar[bool] = True
    #: SAELens architecture name for export, and whether a threshold tensor goes with it
    saelens_architecture: ClassVar[str] = "topk"
    #: selection, activation and loss terms are exact when latents are sharded across ranks
    #: (they reach other latents only through ``ctx.comm``)
    latent_shardable: ClassVar[bool] = False

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        try:
            own = {k: v for k, v in cfg.rule_options.items() if k not in SHARED_OPTION_KEYS}
            self.opts = self.Options(**own)
        except TypeError as e:
            known = [f.name for f in dataclasses.fields(self.Options)]
            raise ConfigError(
                f"bad rule_options for rule {self.name!r}: {e}; known options: {known}"
            ) from e

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


_REGISTRY: dict[str, type[Rule]] = {}


def register(cls: type[Rule]) -> type[Rule]:
    """Class decorator: make a rule available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"rule {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def rule_names() -> list[str]:
    return sorted(_REGISTRY)


def get_rule_class(name: str) -> type[Rule]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown rule {name!r}; known rules: {', '.join(rule_names())}"
        ) from None


def build_rule(cfg: SAEConfig) -> Rule:
    return get_rule_class(cfg.rule)(cfg)


def topk_indices(score: Tensor, k: int) -> Tensor:
    """Indices of the k largest entries of each row (k clipped to the row length)."""
    return score.topk(min(k, score.shape[-1]), dim=-1, sorted=False).indices
