"""BatchTopK (Bussmann et al. 2024): top k*B entries of ReLU(pre) over the whole batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saekit.rules.base import Context, Rule, Selection, register


@dataclass
class BatchTopKOptions:
    threshold_decay: float = 0.999  # EMA decay of the inference threshold (dictionary_learning)
    threshold_start_step: int = 0  # start tracking the threshold at this training step


def batch_topk_selection(pre: Tensor, budget: int) -> Selection:
    """The ``budget`` largest positive entries of ``pre [B, F]``, as padded per-row indices.

    Finds the budget-th largest value with one ``topk`` over the flattened matrix, then takes
    each row's entries at or above it (ties broken so that exactly ``budget`` survive, unless
    fewer than ``budget`` entries are positive).
    """
    B, F = pre.shape
    flat = pre.reshape(-1)
    budget = min(budget, flat.numel())
    top = flat.topk(budget, sorted=False)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[top.indices] = True
    keep &= flat > 0
    keep = keep.view(B, F)
    counts = keep.sum(1)
    kmax = max(int(counts.max()), 1)
    # rows: selected entries first (score = pre where kept, -inf elsewhere)
    score = torch.where(keep, pre, torch.full_like(pre, float("-inf")))
    idx = score.topk(kmax, dim=1, sorted=False).indices
    mask = keep.gather(1, idx)
    return Selection(indices=idx, mask=mask, extras={"counts": counts})


@register
class BatchTopK(Rule):
    """Training: top ``k*B`` entries of ``ReLU(pre)`` over the batch.

    Inference: a global threshold ``theta``: ``z = pre * 1[pre > theta]``. ``theta`` is an
    EMA (decay ``threshold_decay``) of the smallest kept activation per training batch
    (dictionary_learning's variant; the original paper averages).
    """

    name = "batchtopk"
    Options = BatchTopKOptions
    saelens_architecture = "jumprelu"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.tensor(-1.0))

    def select(self, pre: Tensor, ctx: Context) -> Selection:
        if ctx.training:
            sel = batch_topk_selection(pre, self.cfg.k * pre.shape[0])
            if ctx.step >= self.opts.threshold_start_step:
                self._update_threshold(pre, sel)
            return sel
        return threshold_selection(pre, self.threshold.clamp_min(0.0))

    @torch.no_grad()
    def _update_threshold(self, pre: Tensor, sel: Selection) -> None:
        assert sel.indices is not None and sel.mask is not None
        vals = pre.gather(1, sel.indices)[sel.mask]
        if vals.numel() == 0:
            return
        m = vals.min().detach()
        d = self.opts.threshold_decay
        self.threshold.copy_(torch.where(self.threshold < 0, m, d * self.threshold + (1 - d) * m))

    def export_threshold(self) -> Tensor:
        return self.threshold.clamp_min(0.0).expand(self.cfg.d_sae).clone()


def threshold_selection(pre: Tensor, threshold: Tensor) -> Selection:
    """Entries with ``pre > threshold`` (scalar or per-latent), as padded per-row indices."""
    keep = pre > threshold
    counts = keep.sum(1)
    kmax = max(int(counts.max()), 1)
    score = torch.where(keep, pre, torch.full_like(pre, float("-inf")))
    idx = score.topk(kmax, dim=1, sorted=False).indices
    return Selection(indices=idx, mask=keep.gather(1, idx), extras={"counts": counts})
