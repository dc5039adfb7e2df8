"""One rank's part of an activation stream (data-parallel training).

A source is sharded with ``source.shard(rank, world)``; the shard's ``next_batch(B)`` takes
the *global* batch size and returns this rank's ``B / world`` tokens.

* :class:`RowShard` (the default): rows ``[rank * B/world, (rank+1) * B/world)`` of the batch
  the source would give one process. The ranks' parts concatenate to exactly that batch and
  the state is the global stream position, so a run means the same at any world size.
  Sources that can produce part of a batch cheaply implement ``next_batch_part`` (memory,
  cache: only this rank's rows are read; synthetic: only the blocks its rows fall in are
  generated); otherwise each rank reads the whole batch and keeps its rows.
* :class:`LocalPart`: the source itself was dealt a disjoint part of the data (HF: every
  ``world``-th document) and is asked for ``B / world`` tokens; its state is per rank.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from torch import Tensor

from saekit.sources.base import ActivationSource, Batch


def part_range(batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of rank ``rank`` in a global batch of ``batch_size`` (equal parts)."""
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} is not divisible by {world} data ranks")
    n = batch_size // world
    return rank * n, (rank + 1) * n


def slice_batch(batch: Batch, lo: int, hi: int, n: int) -> Batch:
    """Rows ``[lo, hi)`` of every per-token tensor (first dim ``n``) of ``batch``."""

    def cut(v: Any) -> Any:
        return v[lo:hi] if isinstance(v, Tensor) and v.dim() and v.shape[0] == n else v

    return Batch(
        acts={k: cut(v) for k, v in batch.acts.items()},
        inputs={n: {k: cut(v) for k, v in d.items()} for n, d in batch.inputs.items()},
        meta={k: cut(v) for k, v in batch.meta.items()},
    )


class _Part(ActivationSource):
    """Rank ``rank`` of ``world``'s part of ``source``: everything but the batch size and the
    planned tokens delegates to the wrapped source."""

    def __init__(self, source: ActivationSource, rank: int, world: int) -> None:
        self.source, self.rank, self.world = source, rank, world
        self.sites = list(source.sites)
        self.shard_of = (rank, world)

    def d_in(self, site: str) -> int:
        return self.source.d_in(site)

    def request_inputs(self, names: Collection[str]) -> set[str]:
        return self.source.request_inputs(names)

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)

    def close(self) -> None:
        self.source.close()


class RowShard(_Part):
    """Rank ``rank`` of ``world``'s rows of every global batch of ``source``."""

    global_stream = True

    def plan_tokens(self, n: int) -> None:
        self.source.plan_tokens(n)  # every rank reads the global stream

    def next_batch(self, batch_size: int) -> Batch:
        lo, hi = part_range(batch_size, self.rank, self.world)
        return self.source.next_batch_part(batch_size, lo, hi)


class LocalPart(_Part):
    """A source already dealt its own part of the data: asked for ``B / world`` tokens."""

    global_stream = False

    def plan_tokens(self, n: int) -> None:
        self.source.plan_tokens(-(-n // self.world))  # this rank's part of each batch

    def next_batch(self, batch_size: int) -> Batch:
        lo, hi = part_range(batch_size, self.rank, self.world)
        return self.source.next_batch(hi - lo)
