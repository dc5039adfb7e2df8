"""Gated SAEs (Rajamanoharan, Conmy, Smith, Lieberum, Varma, Kramár, Shah, Nanda 2024).

Two paths share the encoder directions ``W_enc``:

* the **gate**: ``π_gate = (x - b_dec) W_enc + b_gate`` says which latents fire; here the
  SAE's own pre-activations (``b_enc`` is ``b_gate``) go through the SAE's **rule**, so the
  paper's gate (``π_gate > 0``) is the ``relu`` rule and any other rule gates its own way
  (top-k of ``π_gate``, a JumpReLU threshold, BatchTopK...);
* the **magnitude**: ``π_mag = (x - b_dec) (W_enc ⊙ exp(r_mag)) + b_mag`` gives the values,
  ``f_i = ReLU(π_mag,i)`` for the latents the gate selects (no ReLU for signed rules
  [our choice]). The gate's Heaviside passes no gradient: the reconstruction trains
  ``W_enc`` only through the magnitude path.

Losses: the SAE's reconstruction of ``f``; the rule's own terms on the **gate's** codes
(the rule's activation of ``π_gate``: with ``relu``, the paper's ``λ Σ ReLU(π_gate) ||d_i||``,
SAELens's form); and the auxiliary reconstruction from the gate's codes through a frozen
copy of the decoder, ``aux_coeff · recon(ReLU(π_gate) W_decᵀ + b_dec, x)`` (``frozen``:
the paper and dictionary_learning detach the decoder, SAELens does not), named
``gate_recon`` and scaled like the SAE's reconstruction loss.

Parameters ``r_mag``, ``b_mag`` ``[d_sae]`` start at 0 (as SAELens and dictionary_learning).
SAELens export: architecture ``gated`` (``b_gate``, ``b_mag``, ``r_mag``; no ``b_enc``) for
rules exporting as ``standard`` (gate ``π_gate > 0``) or ``jumprelu`` (gate ``π_gate > θ``,
folded as ``b_gate - θ``); other rules (TopK's per-token top-k gate, signed codes) have no
SAELens equivalent and are saved saekit-only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from saekit import kernels
from saekit.arch.base import ArchPart, SAELensImport, register_arch
from saekit.errors import FormatError
from saekit.losses import recon_loss
from saekit.options import Options, option

if TYPE_CHECKING:
    from saekit.rules.base import Context, SAELensExport, Selection
    from saekit.sae import SAE, SAEOutput

GATE = "gate_codes"  # out.extras key: the gate's codes (what the rule's loss terms see)


@dataclass
class GatedOptions(Options):
    """Options of Gated SAEs (``--arch-options``)."""

    aux_coeff: float = option(1.0, "weight of the gate's auxiliary reconstruction", ge=0)
    frozen: bool = option(True, "the auxiliary reconstruction uses a frozen decoder (paper)")


@register_arch
class Gated(ArchPart):
    """Gate and magnitude paths sharing ``W_enc``; see the module docstring."""

    name = "gated"
    stage = "encoder"
    Options = GatedOptions

    def __init__(self, cfg, opts: GatedOptions) -> None:
        super().__init__(cfg, opts)
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae))

    def _values(self, sae: SAE, mag: Tensor) -> Tensor:
        return mag if sae.rule.signed else torch.relu(mag)

    def magnitude(self, sae: SAE, pre: Tensor, idx: Tensor | None = None) -> Tensor:
        """``π_mag`` from the gate's pre-activations ``pre`` (of latents ``idx``, or all):
        ``(π_gate - b_gate) exp(r_mag) + b_mag``, the same ``x W_enc`` product."""
        b, r, m = sae.b_enc, self.r_mag, self.b_mag
        if idx is not None:
            b, r, m = b[idx], r[idx], m[idx]
        return (pre - b) * r.exp() + m

    def code_values(self, sae: SAE, pre_sel: Tensor, sel: Selection, ctx: Context) -> Tensor:
        from saekit.sae import Codes

        gate = sae.rule.activate(pre_sel, sel, ctx)
        if sel.mask is not None:
            gate = gate * sel.mask.to(gate.dtype)
        sel.extras[GATE] = Codes(sae.d_sae, values=gate, indices=sel.indices)
        return self._values(sae, self.magnitude(sae, pre_sel, sel.indices))

    def dense_codes(self, sae: SAE, sel: Selection, pre: Tensor, ctx: Context) -> Tensor:
        from saekit.sae import Codes

        assert sel.dense is not None
        sel.extras[GATE] = Codes(sae.d_sae, dense=sel.dense)
        fires = (sel.dense != 0).to(pre.dtype)  # the gate's Heaviside: no gradient
        return fires * self._values(sae, self.magnitude(sae, pre))

    def rule_output(self, out: SAEOutput) -> SAEOutput:
        return dataclasses.replace(out, codes=out.extras[GATE])

    def loss_terms(
        self, sae: SAE, out: SAEOutput, ctx: Context, target: Tensor
    ) -> dict[str, Tensor]:
        if self.opts.aux_coeff == 0:
            return {}
        gate = out.extras[GATE]
        W, b = sae.W_dec, sae.b_dec
        if self.opts.frozen:
            W, b = W.detach(), b.detach()
        if gate.is_sparse:
            dec = kernels.sparse_decode(gate.indices, gate.values, W)
        else:
            dec = gate.dense @ W
        pred = dec + b
        extra = sae.arch.decode_extra(sae, out.x)  # a gated transcoder's skip path
        if extra is not None:
            pred = pred + extra
        # over the global batch under ddp (sae.comm: the NMSE variance)
        loss = recon_loss(sae.recon_kind, pred, target, sae.comm)
        return {"gate_recon": self.opts.aux_coeff * loss}

    def fold(self, sae: SAE, weights: dict[str, Tensor], s_in: float, s_out: float) -> None:
        # π_mag's x W_enc product folds with W_enc; r_mag and b_mag are unit-free
        weights["r_mag"] = self.r_mag.detach().clone()
        weights["b_mag"] = self.b_mag.detach().clone()

    @classmethod
    def from_saelens(cls, cfg: dict[str, Any], weights: dict[str, Tensor]) -> SAELensImport | None:
        """SAELens ``gated`` (``b_gate``, ``b_mag``, ``r_mag``): the ``relu`` rule (SAELens's
        gate ``π_gate > 0``, so ``b_enc = b_gate``) with this part; exactly SAELens's encode."""
        if cfg.get("architecture") != "gated":
            return None
        missing = [n for n in ("W_enc", "b_gate", "b_mag", "r_mag") if n not in weights]
        if missing:
            raise FormatError(f"SAELens gated weights lack {missing}")
        rest = {k: v for k, v in weights.items() if k not in ("b_gate", "b_mag", "r_mag")}
        rest["b_enc"] = weights["b_gate"]
        state = {"r_mag": weights["r_mag"], "b_mag": weights["b_mag"]}
        return SAELensImport({}, {**cfg, "architecture": "standard"}, rest, state)

    def saelens_export(self, sae: SAE, exp: SAELensExport, weights: dict[str, Tensor]) -> None:
        if sae.rule.signed or exp.architecture not in ("standard", "jumprelu"):
            raise FormatError(
                f"a gated SAE with rule {sae.cfg.rule!r} has no SAELens equivalent (SAELens's"
                " gate is pi_gate > 0: rules exporting as standard or jumprelu); use the saekit"
                " run directory with saekit.io.load_sae"
            )
        b_gate = weights.pop("b_enc")
        if exp.architecture == "jumprelu":  # fires where pi_gate > θ: fold θ into b_gate
            b_gate = b_gate - weights.pop("threshold").to(b_gate)
        weights["b_gate"] = b_gate.contiguous()
        exp.architecture = "gated"
