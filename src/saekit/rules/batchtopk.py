"""BatchTopK (Bussmann et al. 2024): top k*B entries of ReLU(pre) over the whole batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saekit import kernels
from saekit.distributed.comm import LOCAL, Comm
from saekit.rules.base import Context, Rule, Selection, register


@dataclass
class BatchTopKOptions:
    threshold_decay: float = 0.999  # EMA decay of the inference threshold (dictionary_learning)
    threshold_start_step: int = 0  # start tracking the threshold at this training step


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
    latent_shardable = True

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.tensor(-1.0))

    def select(self, pre: Tensor, ctx: Context) -> Selection:
        if ctx.training:
            budget = self.cfg.k * ctx.comm.n_tokens(pre.shape[0])
            sel = batch_topk_selection(pre, budget, ctx.comm)
            if ctx.step >= self.opts.threshold_start_step:
                self._update_threshold(pre, sel, ctx.comm)
            return sel
        return threshold_selection(pre, self.threshold.clamp_min(0.0))

    @torch.no_grad()
    def _update_threshold(self, pre: Tensor, sel: Selection, comm: Comm = LOCAL) -> None:
        assert sel.indices is not None and sel.mask is not None
        vals = pre.gather(1, sel.indices)[sel.mask]
        # the smallest kept activation of the global batch (inf where a rank kept none)
        local = vals.min() if vals.numel() else pre.new_tensor(float("inf"))
        m = comm.all_min(local.detach())
        if not bool(torch.isfinite(m)):
            return
        d = self.opts.threshold_decay
        self.threshold.copy_(torch.where(self.threshold < 0, m, d * self.threshold + (1 - d) * m))

    def export_threshold(self) -> Tensor:
        return self.threshold.clamp_min(0.0).expand(self.cfg.d_sae).clone()


def threshold_selection(pre: Tensor, threshold: Tensor) -> Selection:
    """Entries with ``pre > threshold`` (scalar or per-latent), as padded per-row indices.

    Columns ascending within a row; padding indices distinct and masked
    (:func:`saekit.kernels.keep_to_padded`).
    """
    idx, mask, counts = kernels.keep_to_padded(pre > threshold)
    return Selection(indices=idx, mask=mask, extras={"counts": counts})
