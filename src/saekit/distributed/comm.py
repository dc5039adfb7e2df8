"""The communicator: everything a rule, a loss or the SAE computes across ranks.

An SAE holds one communicator, ``sae.comm``, and hands it to its rule as ``Context.comm``.
In one process it is :data:`LOCAL`, whose every method is the plain local operation (no
``torch.distributed``, no cost), so code written against it runs unchanged everywhere.
Under a strategy (:mod:`saekit.distributed.strategy`) it is a
:class:`~saekit.distributed.mesh.MeshComm` over two axes:

* the **batch axis**: ranks holding the same latents and other tokens of the global batch
  (data parallel). ``batch_sum`` makes a batch statistic global;
* the **latent axis**: ranks holding the same tokens and other latents (latent sharding).
  Per-latent tensors (pre-activations, codes, ``W_enc`` columns, dead counters) are then the
  local shard and their indices local. ``latent_sum`` reduces the decoder's partial outputs;
  ``latent_input`` marks a replicated tensor (``b_dec``) entering per-shard computation, so
  that replicated parameters get their whole gradient on every rank.

Conventions a caller must keep:

* Parameter gradients are **averaged** over the batch axis after backward (as DDP does) and
  every rank holds ``B / batch_world`` tokens. A per-token mean therefore needs nothing; a
  sum over the batch that enters the loss goes through :meth:`Comm.batch_sum`, whose
  backward multiplies by ``batch_world`` so that the average is the global gradient.
* Every rank of an axis calls the same collectives in the same order: call these methods
  unconditionally (never after a data-dependent early return).
"""

from __future__ import annotations

from torch import Tensor

from saekit import kernels


class Comm:
    """Single-process communicator (:data:`LOCAL`); also the interface of every other one."""

    #: ranks on the batch axis (1: this rank has the whole batch)
    batch_world: int = 1
    #: ranks on the latent axis (1: this rank has every latent) and this rank's place on it
    latent_world: int = 1
    latent_rank: int = 0

    @property
    def is_local(self) -> bool:
        """True when nothing is shared with another rank."""
        return self.batch_world == 1 and self.latent_world == 1

    # ------------------------------------------------------------------ batch axis
    def n_tokens(self, n: int) -> int:
        """Tokens of the global batch when this rank holds ``n``."""
        return n * self.batch_world

    def batch_sum(self, t: Tensor) -> Tensor:
        """Sum of ``t`` over the batch axis (differentiable; see the module conventions)."""
        return t

    def gather_batch(self, t: Tensor) -> Tensor:
        """Every rank's rows of ``t [n, ...]`` concatenated in rank order (no grad)."""
        return t

    # ------------------------------------------------------------------ every rank
    def all_min(self, t: Tensor) -> Tensor:
        """Elementwise minimum over every rank sharing this SAE (both axes; no grad)."""
        return t

    def all_max(self, t: Tensor) -> Tensor:
        """Elementwise maximum over every rank sharing this SAE (both axes; no grad)."""
        return t

    # ------------------------------------------------------------------ latent axis
    def latent_sum(self, t: Tensor) -> Tensor:
        """Sum over the latent axis of per-shard partial results (decoder outputs, counts).

        Backward is the identity: every latent rank computes the same loss from the sum.
        """
        return t

    def latent_input(self, t: Tensor) -> Tensor:
        """A replicated tensor entering per-shard computation: forward identity, backward
        sum over the latent axis."""
        return t

    def latent_total(self, n: int) -> int:
        """Latents of the whole SAE when this rank holds ``n``."""
        return n

    # ------------------------------------------------------------------ selections
    def topk(self, score: Tensor, k: int, absolute: bool = False) -> tuple[Tensor, Tensor | None]:
        """Per-row top-``k`` of ``score [B, F]`` (of ``|score|`` when ``absolute``, without
        a ``|score|`` copy: :func:`saekit.kernels.abs_row_topk`) over every latent:
        ``(indices, mask)``.

        ``indices`` are local columns; ``mask`` (None: all kept) is False where a local
        candidate lost to another shard. Ties are broken arbitrarily.
        """
        return kernels.row_topk(score, k, absolute)[1], None

    def global_topk(self, pre: Tensor, budget: int) -> tuple[Tensor, Tensor, Tensor]:
        """The ``budget`` largest positive entries of the global ``[B, d_sae]`` matrix.

        Same contract as :func:`saekit.kernels.global_topk` (``idx, mask, counts`` of this
        rank's tile); exact across shards up to ties.
        """
        return kernels.global_topk(pre, budget)

    def capacity_selection(self, z: Tensor, m: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Column ``i`` keeps its ``m[i]`` largest positive entries over the global batch.

        Same contract as :func:`saekit.kernels.capacity_selection` (``idx, mask, counts,
        low``; ``low`` is global).
        """
        return kernels.capacity_selection(z, m)


#: the single-process communicator
LOCAL = Comm()
