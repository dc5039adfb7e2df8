"""Transcoders and skip-transcoders (Dunefsky, Chlenski, Nanda 2024; Paulo, Shabalin, Belrose
2025, as sparsify trains them): the SAE reads one site and predicts another from the same
forward, ``ŷ = W_dec f(x) + b_dec (+ W_skip x)``.

A ``wiring`` part: it combines with every rule (TopK, BatchTopK, JumpReLU, AbsTopK...) and with
the other stages (a Matryoshka transcoder, a Gated one).

* ``target``: the predicted site: a site kind (``mlp_out``, the default: the same layer's MLP
  output, read with ``layers.<i>.mlp_in``, the MLP's input after its norm) or a full site
  name (any source's, e.g. ``y`` of a :class:`~saekit.sources.base.MemorySource`).
* ``skip``: a learned linear skip path ``W_skip [d_out, d_in]``, zero at initialisation
  (sparsify's and SAELens's ``W_skip``); trained with the SAE's optimizer, never
  penalised [our choice: neither peer penalises it].

Planning: for a run whose sites are ``layers.1.mlp_in, layers.1.mlp_out``, one transcoder is
planned at ``layers.1.mlp_in`` and none at its target (:meth:`Transcoder.plan_sites`).

Units: the input is scaled by ``input_scale`` (``E||x||² = d_in``) and the target by its own
``output_scale`` (``E||y||² = d_out``, buffer ``arch.transcoder.scale_out``); the decoder
and ``W_skip`` work in those units and are folded on export (``W_skip`` by
``input_scale / output_scale``). ``apply_b_dec_to_input`` is off (``b_dec`` is the target's
width), as in both peers. The encoder is initialised as the SAE's (no tied init when the widths
differ) [our choice: sparsify zeroes ``W_dec``; here the reconstruction starts at the target's
norm, as for an SAE].

SAELens loads the export as ``transcoder`` / ``skip_transcoder`` (ReLU codes: rule ``relu``)
or ``jumprelu_transcoder`` / ``jumprelu_skip_transcoder`` (rules exporting as ``jumprelu``:
``jumprelu``, ``batchtopk``, ``feature_choice``...), with ``d_out`` and ``hook_name_out``;
SAELens has no TopK transcoder, so those rules' transcoders stay saekit-only (the export
refuses, naming the rules that export). Those four SAELens architectures, and peer files
naming another output site (sparsify transcoders, Gemma Scope 2 transcoders), are read back as
transcoders (:meth:`Transcoder.from_saelens`). Evaluation splices the transcoder in place of the
target (``saekit eval``: CE/KL recovered with the MLP replaced).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from saekit.arch.base import ArchPart, SAELensImport, register_arch
from saekit.errors import ConfigError, FormatError
from saekit.options import Options, option

if TYPE_CHECKING:
    from saekit.config import SAEConfig
    from saekit.rules.base import SAELensExport
    from saekit.sae import SAE

#: SAELens transcoder architecture for the rule's own SAELens architecture, by skip path
SAELENS_TRANSCODERS = {
    ("standard", False): "transcoder",
    ("standard", True): "skip_transcoder",
    ("jumprelu", False): "jumprelu_transcoder",
    ("jumprelu", True): "jumprelu_skip_transcoder",
}

#: (the rule's SAELens architecture, skip path) of each SAELens transcoder architecture
SAELENS_IMPORTS = {v: k for k, v in SAELENS_TRANSCODERS.items()}


@dataclass
class TranscoderOptions(Options):
    """Options of transcoders (``--arch-options``)."""

    target: str = option(
        "mlp_out",
        "predicted site: a site kind of the input's layer (mlp_out) or a full site name",
        nonempty=True,
    )
    skip: bool = option(False, "learned linear skip path W_skip [d_out, d_in] (skip-transcoder)")


def target_site(site: str, target: str) -> str:
    """The site a transcoder reading ``site`` predicts: ``target`` as a site kind of the same
    layer (``layers.3.mlp_in`` + ``mlp_out`` -> ``layers.3.mlp_out``), else ``target``."""
    from saekit.sources.sites import KINDS, parse_site

    if target in KINDS:
        try:
            layer, _ = parse_site(site)
        except ConfigError:
            return target
        return f"layers.{layer}.{target}"
    return target


@register_arch
class Transcoder(ArchPart):
    """Input at one site, target at another, optional skip path; see the module docstring."""

    name = "transcoder"
    stage = "wiring"
    Options = TranscoderOptions
    predicts_other = True

    def __init__(self, cfg: SAEConfig, opts: TranscoderOptions) -> None:
        super().__init__(cfg, opts)
        d_out = cfg.d_out or cfg.d_in
        self.register_buffer("scale_out", torch.tensor(1.0))
        self.W_skip = nn.Parameter(torch.zeros(d_out, cfg.d_in)) if opts.skip else None

    @classmethod
    def adjust_config(cls, cfg: SAEConfig) -> None:
        cfg.apply_b_dec_to_input = False  # b_dec has the target's width

    # ------------------------------------------------------------------ wiring
    @classmethod
    def sites(cls, opts: TranscoderOptions, site: str) -> tuple[list[str], list[str]]:
        return [site], [target_site(site, opts.target)]

    @classmethod
    def plan_sites(cls, opts: TranscoderOptions, sites: list[str]) -> list[str]:
        """Every site whose target is another site of the run (not a target itself)."""
        targets = {target_site(s, opts.target) for s in sites}
        return [s for s in sites if s not in targets and target_site(s, opts.target) in sites]

    # ------------------------------------------------------------------ forward
    def decode_extra(self, sae: SAE, xn: Tensor) -> Tensor | None:
        return None if self.W_skip is None else xn @ self.W_skip.t()

    def output_scale(self, sae: SAE) -> Tensor | None:
        return self.scale_out

    def init_from_data(self, sae: SAE, xn: Tensor, target: Tensor | None) -> None:
        if target is None or not sae.cfg.normalize_input:
            return
        d_out = target.shape[-1]
        ms = target.double().pow(2).sum(-1).mean()
        self.scale_out.fill_(float((d_out / ms).sqrt()) if ms > 0 else 1.0)

    # ------------------------------------------------------------------ export
    def fold(self, sae: SAE, weights: dict[str, Tensor], s_in: float, s_out: float) -> None:
        if self.W_skip is not None:
            weights["W_skip"] = (self.W_skip.detach() * (s_in / s_out)).contiguous()

    @classmethod
    def from_saelens(cls, cfg: dict[str, Any], weights: dict[str, Tensor]) -> SAELensImport | None:
        """SAELens's four transcoder architectures, and any SAE whose metadata names a
        ``hook_name_out`` other than its ``hook_name`` (peer transcoders: sparsify, Gemma
        Scope 2); ``W_skip`` makes it a skip-transcoder. The target is ``hook_name_out``
        (default ``mlp_out`` of the input's layer [our choice: SAELens does not record it])."""
        from saekit.sources.sites import canonical_site

        arch = cfg.get("architecture", "standard")
        meta = cfg.get("metadata") or {}
        hook_out = cfg.get("hook_name_out") or meta.get("hook_name_out")
        hook_in = cfg.get("hook_name") or meta.get("hook_name")
        if arch in SAELENS_IMPORTS:
            rule_arch, skip = SAELENS_IMPORTS[arch]
        elif hook_out and hook_out != hook_in:
            rule_arch, skip = arch, "W_skip" in weights
        else:
            return None
        if skip and "W_skip" not in weights:
            raise FormatError(f"SAELens {arch} weights lack 'W_skip'")
        opts: dict[str, Any] = {"skip": skip}
        if hook_out:
            opts["target"] = canonical_site(str(hook_out))
        rest = {k: v for k, v in weights.items() if k != "W_skip"}
        state = {"W_skip": weights["W_skip"]} if skip else {}
        if "d_out" not in cfg and "W_dec" in weights:
            cfg = {**cfg, "d_out": int(weights["W_dec"].shape[1])}
        cfg = {**cfg, "architecture": rule_arch, "apply_b_dec_to_input": False}
        return SAELensImport(opts, cfg, rest, state)

    def saelens_export(self, sae: SAE, exp: SAELensExport, weights: dict[str, Tensor]) -> None:
        skip = self.W_skip is not None
        arch = SAELENS_TRANSCODERS.get((exp.architecture, skip))
        if arch is None:
            raise FormatError(
                f"SAELens has no transcoder for rule {sae.cfg.rule!r} (it exports as"
                f" {exp.architecture!r}); its transcoder classes take ReLU (rule relu) or"
                " JumpReLU codes (rules exporting as jumprelu: jumprelu, batchtopk,"
                " feature_choice); the saekit format keeps this one"
            )
        exp.architecture = arch
        exp.cfg["d_out"] = sae.d_out
