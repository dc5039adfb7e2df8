"""The torch.distributed communicator: a (batch x latent) mesh of ranks.

:class:`Axis` is one process group (``None``: the default group) with this rank's place in
it. :class:`MeshComm` implements :class:`~saekit.distributed.comm.Comm` on a batch axis, a
latent axis and the "all" axis (every rank of the mesh). Selections are exact across shards
(up to ties, as their one-process kernels): each rank takes its local candidates with the
one-process kernel, the candidates' values are all-gathered (OpenAI's sharded top-k), and
every rank computes the same winners from the same gathered values.

Every collective goes through :func:`collective`, which turns a communication failure (a
peer that died, a timeout) into :class:`~saekit.errors.DistributedError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from saekit import kernels
from saekit.distributed.comm import Comm
from saekit.errors import DistributedError


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Run a collective; a failure of the group becomes a one-line DistributedError."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as e:  # DistBackendError, gloo's "Connection closed by peer", timeouts
        rank = dist.get_rank() if dist.is_initialized() else "?"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(
            f"rank {rank}: {what} failed: another rank died, failed or timed out ({first})"
        ) from e


@dataclass(frozen=True)
class Axis:
    """One process group: ``group`` (None: the default group), its size and this rank's place."""

    group: Any
    size: int
    rank: int

    def all_reduce(self, t: Tensor, op: Any = dist.ReduceOp.SUM) -> Tensor:
        """Reduced copy of ``t`` (``t`` itself when the axis has one rank)."""
        if self.size == 1:
            return t
        out = t.detach().clone().contiguous()
        with collective("all_reduce"):
            dist.all_reduce(out, op=op, group=self.group)
        return out

    def all_gather(self, t: Tensor) -> Tensor:
        """``[size, *t.shape]``: every rank's ``t`` (equal shapes) in rank order."""
        t = t.detach().contiguous()
        if self.size == 1:
            return t.unsqueeze(0)
        parts = [torch.empty_like(t) for _ in range(self.size)]
        with collective("all_gather"):
            dist.all_gather(parts, t, group=self.group)
        return torch.stack(parts)

    def gather_padded(self, t: Tensor, fill: float) -> tuple[Tensor, int]:
        """All-gather a 1-D ``t`` of any length: ``([size, n_max], n_max)``, ``fill`` padded."""
        n = torch.tensor([t.numel()], device=t.device)
        n_max = max(int(self.all_reduce(n, dist.ReduceOp.MAX)), 1)
        padded = t.new_full((n_max,), fill)
        padded[: t.numel()] = t
        return self.all_gather(padded), n_max


LOCAL_AXIS = Axis(None, 1, 0)


class _BatchSum(torch.autograd.Function):
    """Sum over the batch axis; backward scaled by its size (gradients are then averaged)."""

    @staticmethod
    def forward(ctx, t: Tensor, axis: Axis) -> Tensor:
        ctx.size = axis.size
        return axis.all_reduce(t)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g * ctx.size, None


class _LatentSum(torch.autograd.Function):
    """Sum of partial results over the latent axis; backward: identity."""

    @staticmethod
    def forward(ctx, t: Tensor, axis: Axis) -> Tensor:
        return axis.all_reduce(t)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, None


class _LatentInput(torch.autograd.Function):
    """Identity; backward: sum of the per-shard gradients over the latent axis."""

    @staticmethod
    def forward(ctx, t: Tensor, axis: Axis) -> Tensor:
        ctx.axis = axis
        return t.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        return ctx.axis.all_reduce(g), None


def _differentiable(fn: Any, t: Tensor, axis: Axis) -> Tensor:
    if axis.size == 1:
        return t
    if torch.is_grad_enabled() and t.requires_grad:
        return fn.apply(t, axis)
    return axis.all_reduce(t)


class MeshComm(Comm):
    """Communicator of one SAE over ``batch`` x ``latent`` ranks (``every``: the mesh).

    ``latent_sizes``: latents held by each rank of the latent axis, in its rank order.
    """

    def __init__(self, batch: Axis, latent: Axis, every: Axis, latent_sizes: list[int]) -> None:
        self.batch, self.latent, self.every = batch, latent, every
        self.batch_world, self.latent_world = batch.size, latent.size
        self.latent_rank = latent.rank
        self.latent_sizes = list(latent_sizes)

    def __deepcopy__(self, memo: dict) -> MeshComm:  # process groups are not copyable
        return self

    # ------------------------------------------------------------------ batch axis
    def batch_sum(self, t: Tensor) -> Tensor:
        return _differentiable(_BatchSum, t, self.batch)

    def gather_batch(self, t: Tensor) -> Tensor:
        if self.batch.size == 1:
            return t
        n = torch.tensor([t.shape[0]], device=t.device)
        sizes = self.batch.all_gather(n).view(-1).tolist()
        flat = t.detach().reshape(t.shape[0], -1)
        n_max = max(sizes)
        padded = flat.new_zeros((n_max, flat.shape[1]))
        padded[: flat.shape[0]] = flat
        parts = self.batch.all_gather(padded)
        rows = [parts[i, : sizes[i]] for i in range(len(sizes))]
        return torch.cat(rows).view(-1, *t.shape[1:])

    # ------------------------------------------------------------------ every rank
    def all_min(self, t: Tensor) -> Tensor:
        return self.every.all_reduce(t, dist.ReduceOp.MIN)

    def all_max(self, t: Tensor) -> Tensor:
        return self.every.all_reduce(t, dist.ReduceOp.MAX)

    # ------------------------------------------------------------------ latent axis
    def latent_sum(self, t: Tensor) -> Tensor:
        return _differentiable(_LatentSum, t, self.latent)

    def latent_input(self, t: Tensor) -> Tensor:
        if self.latent.size == 1 or not (torch.is_grad_enabled() and t.requires_grad):
            return t
        return _LatentInput.apply(t, self.latent)

    def latent_total(self, n: int) -> int:
        return sum(self.latent_sizes) if self.latent.size > 1 else n

    # ------------------------------------------------------------------ selections
    def topk(self, score: Tensor, k: int, absolute: bool = False) -> tuple[Tensor, Tensor | None]:
        if self.latent.size == 1:
            return super().topk(score, k, absolute)
        B, F = score.shape
        kk = min(k, F)
        v, idx = kernels.row_topk(score.detach(), kk, absolute)
        padded = v.new_full((B, k), float("-inf"))
        padded[:, :kk] = v
        g = self.latent.all_gather(padded)  # [L, B, k]
        g = g.permute(1, 0, 2).reshape(B, -1)
        win = g.topk(min(k, sum(self.latent_sizes)), dim=1, sorted=False).indices
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(1, win, True)
        r = self.latent.rank
        return idx, keep[:, r * k : r * k + kk]

    def global_topk(self, pre: Tensor, budget: int) -> tuple[Tensor, Tensor, Tensor]:
        idx, mask, counts = kernels.global_topk(pre, budget)
        if self.every.size == 1:
            return idx, mask, counts
        vals = pre.detach().gather(1, idx)[mask]  # positive candidates, row-major
        g, n_max = self.every.gather_padded(vals, float("-inf"))
        flat = g.reshape(-1)
        n_real = int(torch.isfinite(flat).sum())
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.topk(min(budget, n_real), sorted=False).indices] = True
        r = self.every.rank
        mask = mask.clone()
        mask[mask.clone()] = keep[r * n_max : r * n_max + vals.numel()]
        return idx, mask, mask.sum(1)

    def capacity_selection(self, z: Tensor, m: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        idx, mask, counts, low = kernels.capacity_selection(z, m)
        if self.batch.size == 1:
            return idx, mask, counts, low
        F = z.shape[1]
        rows, slots = mask.nonzero(as_tuple=True)
        cols = idx[rows, slots]
        vals = z.detach()[rows, cols]
        gv, n_max = self.batch.gather_padded(vals, float("-inf"))
        gc, _ = self.batch.gather_padded(cols, F)  # F: padding, sorts last
        gv, gc = gv.reshape(-1), gc.reshape(-1)
        # order by column, then value descending (stable: ties in rank order)
        by_val = torch.sort(gv, descending=True, stable=True).indices
        order = by_val[torch.sort(gc[by_val], stable=True).indices]
        sc = gc[order]
        rank_in_col = torch.arange(sc.numel(), device=z.device) - torch.searchsorted(sc, sc)
        cap = torch.cat([m.to(device=z.device, dtype=torch.long), m.new_zeros(1).long()])
        win = torch.empty_like(sc, dtype=torch.bool)
        win[order] = (sc < F) & (rank_in_col < cap[sc])
        low = torch.full((F,), float("inf"), dtype=z.dtype, device=z.device)
        low.scatter_reduce_(0, gc[win], gv[win].to(z.dtype), "amin")
        r = self.batch.rank
        mask = mask.clone()
        mask[rows, slots] = win[r * n_max : r * n_max + vals.numel()]
        return idx, mask, mask.sum(1), low
