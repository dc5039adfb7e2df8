"""BatchTopK (Bussmann et al. 2024): top k*B entries of ReLU(pre) over the whole batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saekit import kernels
from saekit.distributed.comm import LOCAL, Comm
from saekit.options import Options, option
from saekit.rules.base import Context, Rule, Selection, register, saelens_int_k

#: start of the tracked threshold when the run length is unknown (dictionary_learning's)
DEFAULT_START_STEP = 1000


#: ``init_codes`` choices [our choice]: ``topk`` matches the training codes (issue 10, item
#: 10); ``relu`` (the old default) trained better at equal lr on the small bench, 3 seeds,
#: 500k tokens, under the round-1 recipe (``init_scale`` 1, ``decoder_lr_scale`` 1): MCC
#: 0.718 vs 0.647 with ``aux_options.form="openai"``, 0.661 vs 0.642 with ``bussmann``
#: (benchmarks/results/batchtopk_regress-500k-20261201.json). ``init_scale`` (default 0.3)
#: now starts the encoder near where the ``relu`` codes did (0.35 of the top-k codes' scale).
INIT_CODES = ("topk", "relu")


@dataclass
class BatchTopKOptions(Options):
    """Options of BatchTopK (``--rule-options``)."""

    threshold_decay: float = option(
        0.999, "EMA decay of the tracked threshold (dictionary_learning)", ge=0, lt=1
    )
    threshold_start_step: int = option(-1, "start the EMA at this step (-1: half the run)", ge=-1)
    calibrate: bool = option(
        True, "set the inference threshold on held-back batches after training"
    )
    init_codes: str = option(
        "topk",
        "codes the encoder is scaled with at init: topk (each token's top k, like training)"
        " or relu (the untrained SAE's inference codes, the old behaviour)",
        choices=INIT_CODES,
    )


def batch_topk_selection(pre: Tensor, budget: int, comm: Comm = LOCAL) -> Selection:
    """The ``budget`` largest positive entries of ``pre [B, F]``, as padded per-row indices.

    Exactly ``budget`` entries survive (ties broken arbitrarily) unless fewer than ``budget``
    are positive. Computed by :func:`saekit.kernels.global_topk` (per-row candidates, then
    a top-k over the candidates, with a correctness fallback: no sort of all B*F values);
    across ranks by ``comm.global_topk`` (the global batch and every latent shard).
    Padding indices are distinct within a row and masked.
    """
    idx, mask, counts = comm.global_topk(pre, budget)
    return Selection(indices=idx, mask=mask, extras={"counts": counts})


def start_step(option: int, total_steps: int | None) -> int:
    """The step the threshold EMA starts at: ``option``, or half the run when it is -1."""
    if option >= 0:
        return option
    return DEFAULT_START_STEP if total_steps is None else total_steps // 2


@register
class BatchTopK(Rule):
    """Training: top ``k*B`` entries of ``ReLU(pre)`` over the batch.

    Inference: a global threshold ``theta``: ``z = pre * 1[pre > theta]``.

    * **Calibrated** (default, ``calibrate``): after training the trainer draws held-back
      batches; ``theta`` is the mean over them of each batch's cut, the midpoint of its
      ``k*B``-th and ``(k*B+1)``-th largest entries (the original paper averages the
      threshold over batches), so that the inference L0 on data like the training data
      is ``k``.
    * **Tracked** (before calibration, or without it): from ``threshold_start_step`` on
      (default half the run [our choice], scaled to it so that the threshold follows the
      trained encoder, not the untrained one) an EMA (decay ``threshold_decay``,
      dictionary_learning's variant) of the smallest kept activation, bias-corrected as in
      Adam (``ema / (1 - d^n)`` after ``n`` updates); before the start, the latest batch's
      value. An untrained SAE has ``theta = 0`` (ReLU).

    Aux loss [our choice]: Gao et al.'s (``aux_form = "openai"``, NMSE of the detached
    residual), not the paper code's (``aux_options={"form": "bussmann"}``,
    bartbussmann/BatchTopK: ``aux_penalty * MSE`` of the live residual, scaled like the
    reconstruction loss; see :mod:`saekit.losses.aux`), whose term is ~8x weaker once the
    residual is small and leaves more latents dead: ``saekit bench`` (small, 500k tokens,
    seeds 0-2) MCC 0.797 +- 0.011 / dead 0.109 vs 0.736 +- 0.005 / 0.288
    (benchmarks/results/bench_batchtopk_aux-500k-20261201.json).

    Every batch-global statistic goes through :meth:`Rule.batch_stat` (``ctx.comm``).
    """

    name = "batchtopk"
    Options = BatchTopKOptions
    saelens_architecture = "jumprelu"
    saelens_imports = ("batchtopk",)
    aux_form = "openai"
    latent_shardable = True
    calibrates = True
    optional_state = ("threshold_ema", "threshold_updates")

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.tensor(-1.0))  # inference value (-1: none)
        self.register_buffer("threshold_ema", torch.tensor(0.0))
        self.register_buffer("threshold_updates", torch.tensor(0, dtype=torch.long))
        self._total_steps: int | None = None
        self._cal: list[Tensor] = []

    def setup_training(self, total_steps: int) -> None:
        self._total_steps = total_steps

    def training_selection(self, pre: Tensor, comm: Comm = LOCAL) -> Selection:
        """The top ``k*B`` of the global batch (no state change)."""
        return batch_topk_selection(pre, self.cfg.k * comm.n_tokens(pre.shape[0]), comm)

    def select(self, pre: Tensor, ctx: Context) -> Selection:
        if ctx.training:
            sel = self.training_selection(pre, ctx.comm)
            self._track(self._smallest_kept(pre, sel, ctx.comm), ctx.step)
            return sel
        return threshold_selection(pre, self.threshold.clamp_min(0.0))

    def init_selection(self, pre: Tensor, ctx: Context) -> Selection:
        """Each token's top ``k`` (exact across latent shards): the ``k`` latents per token
        the batch selection keeps on average, without the batch axis (``init_from_data``
        sees the whole sample on every rank). ``init_codes="relu"``: every positive entry."""
        if self.opts.init_codes == "relu":
            return threshold_selection(pre, torch.zeros((), dtype=pre.dtype, device=pre.device))
        idx, mask = ctx.comm.topk(torch.relu(pre), self.cfg.k)
        keep = pre.gather(1, idx) > 0
        return Selection(indices=idx, mask=keep if mask is None else mask & keep)

    @torch.no_grad()
    def _smallest_kept(self, pre: Tensor, sel: Selection, comm: Comm) -> Tensor:
        """The smallest kept activation of the global batch; ``inf`` if nothing was kept."""
        assert sel.indices is not None and sel.mask is not None
        vals = pre.detach().gather(1, sel.indices)[sel.mask]
        m = vals.min() if vals.numel() else pre.new_tensor(float("inf"))
        return self.batch_stat(m, "min", comm)

    @torch.no_grad()
    def _track(self, m: Tensor, step: int) -> None:
        if not bool(torch.isfinite(m)):
            return
        if step < start_step(self.opts.threshold_start_step, self._total_steps):
            self.threshold.copy_(m)
            return
        d = self.opts.threshold_decay
        self.threshold_ema.mul_(d).add_((1 - d) * m)
        self.threshold_updates += 1
        debias = 1 - d ** int(self.threshold_updates)
        self.threshold.copy_(self.threshold_ema / debias if debias > 0 else m)

    # ---------------------------------------------------------------- calibration
    def begin_calibration(self, comm: Comm = LOCAL) -> None:
        self._cal = []

    @torch.no_grad()
    def calibrate(self, pre: Tensor, ctx: Context) -> None:
        if self.opts.calibrate:
            self._cal.append(self._batch_cut(pre, ctx.comm))

    @torch.no_grad()
    def _batch_cut(self, pre: Tensor, comm: Comm) -> Tensor:
        """Midpoint of the global batch's ``k*B``-th and ``(k*B+1)``-th largest entries.

        The empirical cut that keeps ``k*B`` entries: 0 when no more than ``k*B`` entries
        are positive (all of them are kept, as in training). The midpoint rather than the
        smallest kept value: averaged over batches, the latter keeps a rate below the one
        it stands for (see ``feature_choice.FeatureChoice.calibrate``).
        """
        budget = self.cfg.k * comm.n_tokens(pre.shape[0])
        sel = batch_topk_selection(pre, budget + 1, comm)  # positive entries only
        assert sel.indices is not None and sel.mask is not None
        vals = pre.gather(1, sel.indices)[sel.mask]
        kept = self.batch_stat(vals.new_tensor(float(vals.numel())), "total", comm)
        inf = pre.new_full((2,), float("inf"))
        two = torch.cat([vals.topk(min(2, vals.numel()), largest=False).values, inf])
        lo = self.batch_stat(two[0], "min", comm)  # the (k*B+1)-th largest
        # the k*B-th: the smallest entry left once one copy of ``lo`` is taken out
        hi = self.batch_stat(torch.where(two[0] == lo, two[1], two[0]), "min", comm)
        if int(kept) <= budget:
            return pre.new_zeros(())
        return 0.5 * (lo + hi)

    @torch.no_grad()
    def end_calibration(self, comm: Comm = LOCAL) -> None:
        """``theta`` = the mean cut over the held-back batches (the same on every rank)."""
        if self.opts.calibrate and self._cal:
            self.threshold.copy_(torch.stack(self._cal).double().mean())
        self._cal = []

    def export_threshold(self) -> Tensor:
        return self.threshold.clamp_min(0.0).expand(self.cfg.d_sae).clone()

    @classmethod
    def from_saelens(cls, cfg, weights):
        """SAELens ``batchtopk``: ``k``, and the global threshold from ``topk_threshold`` or
        ``threshold`` (first entry) when present."""
        state = {}
        for key in ("topk_threshold", "threshold"):
            if key in weights:
                state["threshold"] = weights[key].reshape(-1)[0].reshape(())
                break
        return {"k": saelens_int_k(cfg)}, state


def threshold_selection(pre: Tensor, threshold: Tensor) -> Selection:
    """Entries with ``pre > threshold`` (scalar or per-latent), as padded per-row indices.

    Columns ascending within a row; padding indices distinct and masked
    (:func:`saekit.kernels.keep_to_padded`).
    """
    idx, mask, counts = kernels.keep_to_padded(pre > threshold)
    return Selection(indices=idx, mask=mask, extras={"counts": counts})
