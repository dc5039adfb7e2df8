"""Mutual Choice (Ayonrinde 2024): the top k*B token-feature affinities of the whole batch."""

from __future__ import annotations

from saekit.rules.base import register
from saekit.rules.batchtopk import BatchTopK, BatchTopKOptions


@register
class MutualChoice(BatchTopK):
    """Training: the ``S = k*B`` largest entries of ``Z' = ReLU(pre)`` over the B x d_sae batch.

    This is the same operation as BatchTopK (developed concurrently), so the selection is
    ``batch_topk_selection``: exactly ``k*B`` nonzeros per batch when at least that many
    entries are positive. Options are BatchTopK's.

    Inference [our choice; the paper gives none, so this is a flagged deviation]: a global
    threshold ``theta``, the EMA (``threshold_decay``) of the smallest kept activation per
    training batch, applied as ``z = pre * 1[pre > theta]`` (per token, batch-independent).
    Before any threshold has been tracked (an untrained SAE) the threshold is 0 (ReLU), as in
    BatchTopK, so the two rules train identically (and ``SAE.init_from_data`` scales the
    encoder the same way).

    Aux loss: Gao et al.'s aux-k (``aux_form = "openai"``), as the paper states; unlike
    BatchTopK, whose code scales it differently.
    """

    name = "mutual_choice"
    Options = BatchTopKOptions
    aux_form = "openai"
