"""Rules, an aux loss and a named input defined outside saekit, as a user would (imported by
tests/test_plugins.py through saekit's plugin mechanism; nothing in saekit names them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saekit.errors import FormatError
from saekit.inputs import InputKind, register_input
from saekit.losses import AuxLoss, AuxOptions, register_aux
from saekit.rules import Rule, SAELensExport, Selection, register
from saekit.rules.base import topk_indices


@dataclass
class FloorOptions:
    decay: float = 0.5  # EMA decay of the inference floor


@register
class FloorTopK(Rule):
    """Training: TopK; inference: ``pre > floor`` with ``floor`` the EMA of the smallest kept
    value (a tiny BatchTopK). Exports to SAELens as jumprelu; loads SAELens "floor_topk"."""

    name = "plugin_floor"
    Options = FloorOptions
    saelens_imports = ("plugin_floor_arch",)

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.register_buffer("floor", torch.tensor(0.0))

    def select(self, pre: Tensor, ctx) -> Selection:
        if not ctx.training:
            keep = pre > self.floor
            return Selection(dense=torch.where(keep, pre, torch.zeros_like(pre)))
        idx = topk_indices(pre, self.cfg.k)
        low = pre.detach().gather(1, idx).min()
        d = self.opts.decay
        self.floor.copy_(d * self.floor + (1 - d) * low.clamp_min(0))
        return Selection(indices=idx)

    def saelens_export(self) -> SAELensExport:
        return SAELensExport("jumprelu", tensors={"threshold": self.floor.expand(self.cfg.d_sae)})

    @classmethod
    def from_saelens(cls, cfg, weights):
        return {"k": int(cfg["k"]), "rule_options": {"decay": cfg["decay"]}}, {
            "floor": weights["floor"].reshape(())
        }


@register
class NoExport(Rule):
    """TopK that SAELens cannot reproduce (pretend): refuses the export."""

    name = "plugin_noexport"

    def select(self, pre: Tensor, ctx) -> Selection:
        return Selection(indices=topk_indices(pre, self.cfg.k))

    def saelens_export(self) -> SAELensExport:
        raise FormatError("plugin_noexport: SAELens has no equivalent; load it with saekit")


SCALE = register_input(InputKind("plugin_scale", "act", "a per-token scale, like x"))


@register
class InputEcho(Rule):
    """TopK that records the named inputs it was given (for tests of the input plumbing)."""

    name = "plugin_echo"
    requires = ("grad", "plugin_scale")
    seen: list

    def select(self, pre: Tensor, ctx) -> Selection:
        type(self).seen.append({k: v.clone() for k, v in ctx.inputs.items()})
        return Selection(indices=topk_indices(pre, self.cfg.k))


InputEcho.seen = []


@dataclass
class EveryOptions(AuxOptions):
    share: float = 1.0  # fraction of latents (lowest index first) that are candidates


@register_aux
class AuxEvery(AuxLoss):
    """An aux loss over a fixed share of the latents."""

    name = "plugin_every"
    Options = EveryOptions

    def candidates(self, sae):
        n = int(round(self.opts.share * sae.d_sae))
        mask = torch.zeros(sae.d_sae, dtype=torch.bool, device=sae.W_dec.device)
        mask[:n] = True
        return mask, None
