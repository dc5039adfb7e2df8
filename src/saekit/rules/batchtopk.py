"""BatchTopK (Bussmann et al. 2024): top k*B entries of ReLU(pre) over the whole batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saekit import kernels
from saekit.rules.base import Context, Rule, Selection, register

#: start of the tracked threshold when the run length is unknown (dictionary_learning's)
DEFAULT_START_STEP = 1000


@dataclass
class BatchTopKOptions:
    threshold_decay: float = 0.999  # EMA decay of the tracked threshold (dictionary_learning)
    threshold_start_step: int = -1  # start the EMA at this step (-1: half the run)
    calibrate: bool = True  # set the inference threshold on held-back batches after training


def batch_topk_selection(pre: Tensor, budget: int) -> Selection:
    """The ``budget`` largest positive entries of ``pre [B, F]``, as padded per-row indices.

    Exactly ``budget`` entries survive (ties broken arbitrarily) unless fewer than ``budget``
    are positive. Computed by :func:`saekit.kernels.global_topk` (per-row candidates, then
    a top-k over the candidates, with a correctness fallback: no sort of all B*F values).
    Padding indices are distinct within a row and masked.
    """
    idx, mask, counts = kernels.global_topk(pre, budget)
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
      batches; ``theta`` is the mean over them of each batch's smallest kept activation
      (the ``k*B``-th largest entry), the original paper's average, so that the inference
      L0 on data like the training data is ``k``.
    * **Tracked** (before calibration, or without it): from ``threshold_start_step`` on
      (default half the run [our choice], scaled to it so that the threshold reflects the
      trained encoder, not the untrained one) an EMA (decay ``threshold_decay``,
      dictionary_learning's variant) of the smallest kept activation, bias-corrected as in
      Adam (``ema / (1 - d^n)`` after ``n`` updates); before the start, the latest batch's
      value. An untrained SAE has ``theta = 0`` (ReLU).

    Every batch-global statistic goes through :meth:`Rule.batch_stat`.
    """

    name = "batchtopk"
    Options = BatchTopKOptions
    saelens_architecture = "jumprelu"
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

    def training_selection(self, pre: Tensor) -> Selection:
        """The top ``k*B`` of the batch (no state change)."""
        return batch_topk_selection(pre, self.cfg.k * pre.shape[0])

    def select(self, pre: Tensor, ctx: Context) -> Selection:
        if ctx.training:
            sel = self.training_selection(pre)
            self._track(self._batch_threshold(pre, sel), ctx.step)
            return sel
        return threshold_selection(pre, self.threshold.clamp_min(0.0))

    def init_selection(self, pre: Tensor, ctx: Context) -> Selection:
        return self.training_selection(pre)

    @torch.no_grad()
    def _batch_threshold(self, pre: Tensor, sel: Selection) -> Tensor:
        """The smallest kept activation of the (global) batch; ``inf`` if nothing was kept."""
        assert sel.indices is not None and sel.mask is not None
        vals = pre.detach().gather(1, sel.indices)[sel.mask]
        m = vals.min() if vals.numel() else pre.new_tensor(float("inf"))
        return self.batch_stat(m, "min")

    @torch.no_grad()
    def _track(self, m: Tensor, step: int) -> None:
        if not torch.isfinite(m):
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
    def begin_calibration(self) -> None:
        self._cal = []

    @torch.no_grad()
    def calibrate(self, pre: Tensor, ctx: Context) -> None:
        if self.opts.calibrate:
            self._cal.append(batch_cut(pre, self.cfg.k * pre.shape[0]))

    @torch.no_grad()
    def end_calibration(self) -> None:
        """``theta`` = the mean cut over the held-back batches (of every process)."""
        if not self.opts.calibrate:
            return
        cuts = torch.stack(self._cal).double() if self._cal else torch.zeros(0).double()
        total = self.batch_stat(cuts.sum(), "sum")
        n = self.batch_stat(torch.tensor(float(cuts.numel()), dtype=torch.float64), "sum")
        self._cal = []
        if float(n) > 0:
            self.threshold.copy_(total / n)

    def export_threshold(self) -> Tensor:
        return self.threshold.clamp_min(0.0).expand(self.cfg.d_sae).clone()


@torch.no_grad()
def batch_cut(pre: Tensor, budget: int) -> Tensor:
    """Midpoint of the ``budget``-th and ``(budget+1)``-th largest entries of ``pre``.

    The empirical cut that keeps ``budget`` entries: 0 when no more than ``budget`` entries
    are positive (then all of them are kept, as in training). The midpoint rather than the
    smallest kept value: averaged over batches, the latter sits above the cut for the
    rate it stands for (see ``feature_choice.column_cut``).
    """
    sel = batch_topk_selection(pre, budget + 1)  # positive entries only
    assert sel.indices is not None and sel.mask is not None
    vals = pre.gather(1, sel.indices)[sel.mask]
    if vals.numel() <= budget:
        return pre.new_zeros(())
    two = vals.topk(2, largest=False).values
    return 0.5 * (two[0] + two[1])


def threshold_selection(pre: Tensor, threshold: Tensor) -> Selection:
    """Entries with ``pre > threshold`` (scalar or per-latent), as padded per-row indices.

    Columns ascending within a row; padding indices distinct and masked
    (:func:`saekit.kernels.keep_to_padded`).
    """
    idx, mask, counts = kernels.keep_to_padded(pre > threshold)
    return Selection(indices=idx, mask=mask, extras={"counts": counts})
