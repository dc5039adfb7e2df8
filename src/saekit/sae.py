"""The SAE module: encode pre-activations -> select (a pluggable rule) -> decode.

Weights follow the SAELens layout: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
``W_dec [d_sae, d_out]``, ``b_dec [d_out]`` (``d_out = d_in`` except for transcoders). With
``normalize_input`` the SAE works in a space where inputs are multiplied by ``input_scale``
(so that E||x||^2 = d_in); ``forward`` takes and returns raw activations, and
:meth:`folded_weights` folds the scale into the weights for export. Architecture parts
(``self.arch``, :mod:`saekit.arch`) hook the encoder values, the decoder, the loss and the
export; a plain SAE has none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from saekit import kernels
from saekit.arch import ArchStack, parse_arch
from saekit.config import SAEConfig
from saekit.distributed.comm import LOCAL, Comm
from saekit.errors import ConfigError, DataError
from saekit.inputs import input_kind, to_sae_units
from saekit.losses import DEAD_TOKENS_MAX, build_aux, recon_loss
from saekit.losses.recon import check_recon
from saekit.rules import Context, Selection, build_rule


@dataclass
class Codes:
    """Sparse codes: ``values``/``indices [N, K]`` (padding has value 0) or ``dense [N, F]``."""

    d_sae: int
    values: Tensor | None = None
    indices: Tensor | None = None
    dense: Tensor | None = None

    @property
    def is_sparse(self) -> bool:
        return self.dense is None

    def to_dense(self) -> Tensor:
        if self.dense is not None:
            return self.dense
        assert self.values is not None and self.indices is not None
        out = self.values.new_zeros(self.values.shape[0], self.d_sae)
        return out.scatter_add(1, self.indices, self.values)

    def l0(self) -> Tensor:
        """Active latents per token: nonzeros, so negative codes count."""
        if self.dense is not None:
            return (self.dense != 0).sum(-1)
        assert self.values is not None
        return (self.values != 0).sum(-1)

    def fired(self) -> Tensor:
        """``[d_sae]`` bool: latents nonzero on at least one token."""
        if self.dense is not None:
            return (self.dense != 0).any(0)
        assert self.values is not None and self.indices is not None
        out = torch.zeros(self.d_sae, dtype=torch.bool, device=self.values.device)
        out[self.indices[self.values != 0]] = True
        return out

    def fire_counts(self) -> Tensor:
        """``[d_sae]`` number of tokens on which each latent is nonzero."""
        if self.dense is not None:
            return (self.dense != 0).sum(0)
        assert self.values is not None and self.indices is not None
        out = torch.zeros(self.d_sae, dtype=torch.long, device=self.values.device)
        return out.index_add_(
            0, self.indices[self.values != 0], torch.ones_like(self.indices[self.values != 0])
        )

    def detach(self) -> Codes:
        f = lambda t: None if t is None else t.detach()  # noqa: E731
        return Codes(self.d_sae, f(self.values), self.indices, f(self.dense))


@dataclass
class SAEOutput:
    """Result of a forward pass. ``x_hat`` is in raw units; ``pre`` and codes in SAE units."""

    x_hat: Tensor
    codes: Codes
    pre: Tensor | None  # None with SAEConfig.encoder_chunk (never formed)
    x: Tensor  # input in SAE units
    x_in: Tensor  # encoder input in SAE units
    x_hat_n: Tensor  # reconstruction in SAE units
    extras: dict[str, Any] = field(default_factory=dict)


class SAE(nn.Module):
    """One sparse autoencoder; the selection rule is ``self.rule`` (an ``nn.Module``)."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        cfg = cfg.resolved()
        for part, _ in parse_arch(cfg):
            part.adjust_config(cfg)
        self.cfg = cfg
        d, F = cfg.d_in, cfg.d_sae
        d_out = cfg.d_out or d
        W_dec = torch.randn(F, d_out)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        tied = cfg.tied_init and d_out == d  # [our choice] untied when d_out differs
        W_enc = W_dec.t().clone() if tied else torch.randn(d, F) / d**0.5
        # W_enc has SAELens's [d_in, d_sae] shape but latent-major memory ([d_sae, d_in]
        # row-major): the sparse kernels produce its gradient latent-major, so autograd keeps
        # it without a transposing copy; the encoder matmul reads either layout equally fast
        self.W_enc = nn.Parameter(W_enc.t().contiguous().t())
        self.b_enc = nn.Parameter(torch.zeros(F))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("tokens_since_fired", torch.zeros(F, dtype=torch.long))
        self.register_buffer("fire_freq", torch.zeros(F))  # EMA of per-token firing rate
        self.register_buffer("tokens_seen", torch.tensor(0, dtype=torch.long))
        self.rule = build_rule(cfg)
        #: architecture parts (saekit.arch); empty for a plain SAE (no state_dict entries)
        self.arch = ArchStack(cfg)
        wiring = self.arch.part("wiring")
        other = wiring is not None and wiring.predicts_other  # a transcoder's target
        if self.rule.input_norm == "token" and (d_out != d or other):
            raise ConfigError(
                f"rule {cfg.rule!r} standardises every input token, which a reconstruction of"
                f" another width or site (d_out={d_out}, d_in={d}, arch {list(cfg.arch)})"
                " cannot undo; pick another rule"
            )
        for name in self.requires:
            input_kind(name)  # every required input is a registered name
        self.recon_kind = check_recon(
            cfg.recon_loss if cfg.recon_loss != "auto" else self.rule.default_recon
        )
        #: the aux loss (saekit.losses.aux), None when off
        self.aux_loss = build_aux(cfg, self.rule)
        #: keep the dense pre-activations of the sparse training path in one buffer reused
        #: by the next forward pass (no fresh [N, d_sae] allocation and page faults per step,
        #: ~8% of a CPU TopK step); ``SAEOutput.pre`` is then only valid until the next call.
        #: Off by default; a training loop that drops each step's output can turn it on.
        self.reuse_buffers = False
        self._pre_buf: Tensor | None = None
        #: batch-global reductions and cross-shard selections; a strategy sets it while
        #: training on several ranks (saekit.distributed), else one process
        self.comm: Comm = LOCAL

    @property
    def requires(self) -> tuple[str, ...]:
        """Named inputs this SAE reads besides x (its rule's ``requires``); the trainer and
        ``saekit eval`` ask their source for them (:mod:`saekit.inputs`)."""
        return tuple(self.rule.requires)

    # ------------------------------------------------------------------ shapes and units
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def d_out(self) -> int:
        """Width of the reconstruction (the target's; ``d_in`` for an autoencoder)."""
        return self.cfg.d_out or self.cfg.d_in

    @property
    def output_scale(self) -> Tensor:
        """The target's scale in SAE units (``input_scale`` unless a transcoder's own)."""
        s = self.arch.output_scale(self)
        return self.input_scale if s is None else s

    def decoder_norms(self) -> Tensor:
        """``[d_sae]`` decoder norm per latent for norm-weighted penalties (``||W_dec_i||``;
        a crosscoder's sum over its layers)."""
        n = self.arch.decoder_norms(self)
        return self.W_dec.norm(dim=1) if n is None else n

    def _flat(self, x: Tensor, name: str = "x") -> Tensor:
        if x.shape[-1] != self.d_in:
            raise DataError(
                f"{name} has width {x.shape[-1]} but this SAE expects d_in={self.d_in}"
                f" (shape {tuple(x.shape)})"
            )
        return x.reshape(-1, self.d_in).to(self.W_enc.dtype)

    def _to_sae_units(self, x: Tensor) -> Tensor:
        if self.rule.input_norm == "token":
            x = token_standardise(x)
        return x * self.input_scale if self.cfg.normalize_input else x

    def _to_raw_units(self, x_hat_n: Tensor, like: Tensor | None) -> Tensor:
        """Undo :meth:`_to_sae_units`; per-token normalisation needs the input ``like``."""
        out = x_hat_n / self.output_scale if self.cfg.normalize_input else x_hat_n
        if self.rule.input_norm == "token":
            if like is None:
                raise DataError(
                    f"rule {self.cfg.rule!r} standardises every token, so a raw reconstruction"
                    " needs that token's mean and std: call decode(codes, like=x)"
                )
            flat = self._flat(like)
            mu = flat.mean(-1, keepdim=True)
            out = out * (flat - mu).std(-1, keepdim=True) + mu
        return out

    def _encoder_input(self, xn: Tensor) -> Tensor:
        return xn - self.comm.latent_input(self.b_dec) if self.cfg.apply_b_dec_to_input else xn

    # ------------------------------------------------------------------ encode / decode
    def encode_pre(self, x: Tensor) -> Tensor:
        """Dense pre-activations ``(x - b_dec) W_enc + b_enc`` in SAE units, ``[N, d_sae]``."""
        xn = self._to_sae_units(self._flat(x))
        return self._encoder_input(xn) @ self.W_enc + self.b_enc

    def _select(
        self, xn: Tensor, inputs: dict[str, Tensor], step: int, init: bool = False
    ) -> tuple[Codes, Tensor, Tensor, Selection, Context]:
        x_in = self._encoder_input(xn)
        ctx = Context(
            sae=self,
            training=self.training,
            x=xn,
            x_in=x_in,
            inputs=inputs,
            step=step,
            comm=self.comm,
        )
        chunk = self.cfg.encoder_chunk
        if 0 < chunk < self.d_sae and self.rule.row_topk and self.comm.is_local:
            return self._select_chunked(xn, x_in, ctx, chunk)
        dense_grad = self.rule.needs_dense_grad or not torch.is_grad_enabled()
        if dense_grad:
            pre = x_in @ self.W_enc + self.b_enc
        else:
            with torch.no_grad():
                pre = torch.addmm(self.b_enc, x_in, self.W_enc, out=self._pre_buffer(x_in))
        sel = self.rule.init_selection(pre, ctx) if init else self.rule.select(pre, ctx)
        if sel.dense is not None:
            dense = self.arch.dense_codes(self, sel, pre, ctx)
            return Codes(self.d_sae, dense=dense), pre, x_in, sel, ctx
        assert sel.indices is not None
        if dense_grad:
            pre_sel = pre.gather(1, sel.indices)
        elif self.cfg.apply_b_dec_to_input:  # b_dec's encoder gradient as one matvec
            pre_sel = kernels.sparse_encode_centered(
                xn, self.comm.latent_input(self.b_dec), self.W_enc, self.b_enc, sel.indices, pre
            )
        else:
            pre_sel = kernels.sparse_encode(x_in, self.W_enc, self.b_enc, sel.indices, pre)
        values = self.arch.code_values(self, pre_sel, sel, ctx)
        if sel.mask is not None:
            values = values * sel.mask.to(values.dtype)
        return Codes(self.d_sae, values=values, indices=sel.indices), pre, x_in, sel, ctx

    def _select_chunked(
        self, xn: Tensor, x_in: Tensor, ctx: Context, chunk: int
    ) -> tuple[Codes, None, Tensor, Selection, Context]:
        """:meth:`_select` for ``row_topk`` rules, ``chunk`` latents at a time: the dense
        pre-activations are never formed (``SAEOutput.pre`` is None) [our choice]."""
        with torch.no_grad():
            v, idx = kernels.chunked_row_topk(x_in, self.W_enc, self.b_enc, self.cfg.k, chunk)
        sel = Selection(indices=idx)
        if self.cfg.apply_b_dec_to_input:
            pre_sel = kernels.sparse_encode_centered(
                xn, self.b_dec, self.W_enc, self.b_enc, idx, selected=v
            )
        else:
            pre_sel = kernels.sparse_encode(x_in, self.W_enc, self.b_enc, idx, selected=v)
        values = self.arch.code_values(self, pre_sel, sel, ctx)
        return Codes(self.d_sae, values=values, indices=idx), None, x_in, sel, ctx

    def _pre_buffer(self, x_in: Tensor) -> Tensor | None:
        """The reused ``[N, d_sae]`` pre-activation buffer, or None (see ``reuse_buffers``)."""
        if (
            not self.reuse_buffers
            or torch.is_autocast_enabled(x_in.device.type)
            or x_in.dtype != self.W_enc.dtype
        ):
            self._pre_buf = None
            return None
        shape = (x_in.shape[0], self.d_sae)
        buf = self._pre_buf
        if (
            buf is None
            or buf.shape != shape
            or buf.dtype != x_in.dtype
            or buf.device != x_in.device
        ):
            buf = self._pre_buf = torch.empty(shape, dtype=x_in.dtype, device=x_in.device)
        return buf

    def encode(self, x: Tensor, inputs: Mapping[str, Tensor] | None = None) -> Codes:
        """Codes of ``x [..., d_in]`` (flattened to ``[N, ...]``). ``inputs``: named inputs
        in raw units, shaped like ``x`` (e.g. ``{"grad": dLoss/dx}`` for gtopk)."""
        xn = self._to_sae_units(self._flat(x))
        return self._select(xn, self._inputs_units(inputs), 0)[0]

    def decode_n(self, codes: Codes) -> Tensor:
        """Reconstruction in SAE units."""
        if codes.is_sparse:
            assert codes.indices is not None and codes.values is not None
            out = kernels.sparse_decode(codes.indices, codes.values, self.W_dec)
        else:
            out = kernels.dense_decode(codes.dense, self.W_dec)  # type: ignore[arg-type]
        return self.comm.latent_sum(out) + self.b_dec

    def decode(self, codes: Codes, like: Tensor | None = None) -> Tensor:
        """Reconstruction in raw units, ``[N, d_out]`` (without a skip path's term: that
        needs the input, see :meth:`forward`). ``like``: the encoded inputs, needed when the
        rule standardises every token (``Rule.input_norm == "token"``)."""
        return self._to_raw_units(self.decode_n(codes), like)

    def target_units(self, target: Tensor) -> Tensor:
        """A raw reconstruction target ``[..., d_out]`` flattened, in SAE units."""
        t = target.reshape(-1, self.d_out).to(self.W_enc.dtype)
        return t * self.output_scale if self.cfg.normalize_input else t

    def _inputs_units(self, inputs: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        """Named inputs flattened to ``[N, ...]`` and in SAE units (saekit.inputs)."""
        if not inputs:
            return {}
        flat = {}
        for name, t in inputs.items():
            if t.shape[-1] == self.d_in:
                flat[name] = self._flat(t, name)
            else:
                flat[name] = t.reshape(-1, *t.shape[-1:]).to(self.W_enc.dtype)
        norm = self.cfg.normalize_input
        s_in, s_out = (self.input_scale, self.output_scale) if norm else (None, None)
        # gradients are read where the SAE writes (saekit.arch.input_site): the output's scale
        grads = {n for n in flat if input_kind(n).scaling == "grad"}
        out = to_sae_units({n: t for n, t in flat.items() if n not in grads}, s_in)
        out.update(to_sae_units({n: flat[n] for n in grads}, s_out))
        return out

    def forward(
        self, x: Tensor, inputs: Mapping[str, Tensor] | None = None, step: int = 0
    ) -> SAEOutput:
        """Encode and decode ``x`` (raw units); ``inputs``: named inputs, see :meth:`encode`."""
        shape = (*x.shape[:-1], self.d_out)
        xn = self._to_sae_units(self._flat(x))
        codes, pre, x_in, sel, _ = self._select(xn, self._inputs_units(inputs), step)
        x_hat_n = self.decode_n(codes)
        extra = self.arch.decode_extra(self, xn)
        if extra is not None:
            x_hat_n = x_hat_n + extra
        x_hat = self._to_raw_units(x_hat_n, x)
        return SAEOutput(
            x_hat=x_hat.reshape(shape),
            codes=codes,
            pre=pre,
            x=xn,
            x_in=x_in,
            x_hat_n=x_hat_n,
            extras=dict(sel.extras),
        )

    # ------------------------------------------------------------------ training
    def loss(
        self, x: Tensor, inputs: Mapping[str, Tensor] | None = None, step: int = 0
    ) -> tuple[Tensor, dict[str, Tensor], SAEOutput]:
        """Total loss, its named terms and the forward output, in SAE units.

        ``inputs["target"]``: the reconstruction target in raw units when it is not ``x``
        (a transcoder's activations at its target site, :func:`saekit.arch.views`).
        """
        inputs = dict(inputs or {})
        target = inputs.pop("target", None)
        out = self(x, inputs=inputs, step=step)
        y = out.x if target is None else self.target_units(target)
        ctx = Context(
            sae=self,
            training=self.training,
            x=out.x,
            x_in=out.x_in,
            inputs=self._inputs_units(inputs),
            step=step,
            comm=self.comm,
        )
        recon = recon_loss(self.recon_kind, out.x_hat_n, y, self.comm)
        terms: dict[str, Tensor] = {"recon": recon}
        terms.update(self.rule.loss_terms(self.arch.rule_output(out), ctx))
        terms.update(self.arch.loss_terms(self, out, ctx, y))
        if self.aux_loss is not None:
            terms["aux"] = self.aux_loss(self, out, None if target is None else y)
        total = torch.stack(list(terms.values())).sum()
        return total, terms, out

    @property
    def dead_window(self) -> int:
        """Training tokens without firing after which a latent is dead: ``cfg.dead_tokens``
        (the trainer fills an automatic 0 from the run's length), else Gao et al.'s 10M."""
        return self.cfg.dead_tokens if self.cfg.dead_tokens > 0 else DEAD_TOKENS_MAX

    def dead_latents(self) -> Tensor:
        """``[d_sae]`` bool: latents that fired on none of the last :attr:`dead_window`
        training tokens: the one definition used by the aux loss, the training logs and
        ``saekit eval`` (``dead_frac_train``)."""
        return self.tokens_since_fired >= self.dead_window

    def aux_candidates(self) -> tuple[Tensor, Tensor | None]:
        """Latents the aux loss may use, and optional per-latent weights (none when off)."""
        if self.aux_loss is None:
            return torch.zeros(self.d_sae, dtype=torch.bool, device=self.W_dec.device), None
        return self.aux_loss.candidates(self)

    @torch.no_grad()
    def observe(self, codes: Codes, n_tokens: int, ema: float = 0.99) -> None:
        """Update dead-latent counters and the firing-frequency EMA after a training step.

        ``n_tokens``: tokens of ``codes``; counts and tokens are those of the global batch.
        """
        counts = self.comm.batch_sum(codes.fire_counts())
        n_tokens = self.comm.n_tokens(n_tokens)
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[counts > 0] = 0
        rate = counts.to(self.fire_freq.dtype) / max(n_tokens, 1)
        if int(self.tokens_seen) == 0:
            self.fire_freq.copy_(rate)
        else:
            self.fire_freq.mul_(ema).add_(rate, alpha=1 - ema)
        self.tokens_seen += n_tokens

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out the component of each decoder row's gradient along the row."""
        if not self.cfg.unit_norm_decoder or self.W_dec.grad is None:
            return
        # g -= <g, w> / |w|^2 * w per row, without [d_sae, d_in] temporaries: row dots as a
        # batched matmul (vecdot and (g * w).sum(1) materialise the product; ~3.5x slower)
        g = self.W_dec.grad
        W = self.W_dec.to(g.dtype)
        dots = torch.bmm(g.unsqueeze(1), W.unsqueeze(2)).view(-1)
        s = dots / torch.linalg.vector_norm(W, dim=1).square().clamp_min(1e-24)
        g.addcmul_(W, s.neg().unsqueeze(1))

    def param_groups(self, decoder_lr_scale: float = 1.0) -> list[dict]:
        """The optimizer's parameter groups: ``W_dec`` with its lr scaled by
        ``decoder_lr_scale`` (``lr_scale``), then every other parameter, in
        ``parameters()`` order (``W_dec`` is the first: checkpoints index moments by it)."""
        rest = [p for n, p in self.named_parameters() if n != "W_dec"]
        return [
            {"params": [self.W_dec], "lr_scale": float(decoder_lr_scale)},
            {"params": rest, "lr_scale": 1.0},
        ]

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if self.cfg.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def init_from_data(self, x: Tensor, target: Tensor | None = None) -> None:
        """Set ``input_scale``, ``b_dec`` and the encoder scale from a sample of inputs.

        ``x``: this rank's part of the sample; every rank uses the whole sample. ``target``:
        the sample's reconstruction targets when they are not ``x`` (transcoders), raw.
        """
        x = self.comm.gather_batch(self._flat(x)).float()
        if target is not None:
            target = self.comm.gather_batch(target.reshape(-1, self.d_out)).float()
        if self.cfg.normalize_input:
            base = token_standardise(x) if self.rule.input_norm == "token" else x
            self.input_scale.fill_(float((self.d_in / base.pow(2).sum(-1).mean()).sqrt()))
        xn = self._to_sae_units(x)
        self.arch.init_from_data(self, xn, target)  # e.g. a transcoder's output scale
        yn = xn if target is None else self.target_units(target)
        how = self.cfg.init_b_dec
        if how == "geometric_median":
            self.b_dec.copy_(geometric_median(yn))
        elif how == "mean":
            self.b_dec.copy_(yn.mean(0))
        elif how != "zeros":
            raise ConfigError(f"unknown init_b_dec {how!r}; use geometric_median, mean or zeros")
        # rescale the encoder so that reconstructions start with init_scale times the target's
        # norm (about b_dec), with the codes the rule trains with (Rule.init_selection)
        was = self.training
        self.train(False)
        ref = self._encoder_input(xn) if target is None else yn - self.b_dec
        recon = self.decode_n(self._select(xn, {}, 0, init=True)[0]) - self.b_dec
        ratio = self.cfg.init_scale * ref.norm(dim=-1).mean()
        ratio = ratio / recon.norm(dim=-1).mean().clamp_min(1e-12)
        if torch.isfinite(ratio) and ratio > 0:
            self.W_enc.mul_(ratio)
        self.train(was)

    # ------------------------------------------------------------------ calibration
    def begin_calibration(self) -> None:
        """Start the rule's calibration on held-back batches (see ``Rule.calibrates``)."""
        self.rule.begin_calibration(self.comm)

    @torch.no_grad()
    def calibrate_batch(self, x: Tensor) -> None:
        """Pass one held-back batch's pre-activations to ``rule.calibrate``."""
        xn = self._to_sae_units(self._flat(x))
        x_in = self._encoder_input(xn)
        pre = x_in @ self.W_enc + self.b_enc
        ctx = Context(sae=self, training=False, x=xn, x_in=x_in, comm=self.comm)
        self.rule.calibrate(pre, ctx)

    def end_calibration(self) -> None:
        """Let the rule set its inference state from the batches it was given."""
        self.rule.end_calibration(self.comm)

    # ------------------------------------------------------------------ export
    @torch.no_grad()
    def folded_weights(self) -> dict[str, Tensor]:
        """Weights with the input scale folded in: the SAE then takes raw activations (and
        the architecture parts' tensors, e.g. ``W_skip``, folded alike)."""
        s = float(self.input_scale) if self.cfg.normalize_input else 1.0
        so = float(self.output_scale) if self.cfg.normalize_input else 1.0
        out = {
            "W_enc": (self.W_enc * s).contiguous(),
            "b_enc": self.b_enc.clone(),
            "W_dec": (self.W_dec / so).contiguous(),
            "b_dec": (self.b_dec / so).clone(),
        }
        self.arch.fold(self, out, s, so)
        return out


#: added to each token's std before dividing (the top-AFA code's and SAELens's layer_norm)
TOKEN_NORM_EPS = 1e-5


def token_standardise(x: Tensor) -> Tensor:
    """``(x - mean(x)) / (std(x) + 1e-5)`` per row (unbiased std over ``d_in``): top-AFA's
    ``input_unit_norm`` and SAELens's ``normalize_activations="layer_norm"``; undone with
    ``x_hat * std + mean``, as both do."""
    xc = x - x.mean(-1, keepdim=True)
    return xc / (xc.std(-1, keepdim=True) + TOKEN_NORM_EPS)


@torch.no_grad()
def geometric_median(x: Tensor, iters: int = 50, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm on the rows of ``x``."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-8)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= tol * y.norm().clamp_min(1e-12):
            return y_new
        y = y_new
    return y
