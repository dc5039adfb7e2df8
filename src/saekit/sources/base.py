"""The activation-source protocol: what the trainer consumes.

A source yields :class:`Batch` es of exactly ``batch_size`` tokens for each of its sites.
It knows nothing of SAEs. ``state_dict`` / ``load_state_dict`` capture the data position
so that a resumed run continues with exactly the batches it would have seen.

Besides activations a batch may carry *named inputs* per site (``Batch.inputs[name][site]``,
e.g. ``"grad"``, dLoss/dx; see :mod:`saekit.inputs`): the trainer asks for the names its
SAEs' rules require with :meth:`ActivationSource.request_inputs` before the first batch.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from saekit.errors import DataError


@dataclass
class Batch:
    """Activations per site ``[B, d]`` and named inputs ``inputs[name][site]`` (``[B, ...]``)."""

    acts: dict[str, Tensor]
    inputs: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    #: optional metadata (token ids, ground-truth codes, ...) per site or global
    meta: dict[str, Any] = field(default_factory=dict)


class ActivationSource:
    """Base class. Subclasses implement ``sites``, ``d_in`` and ``next_batch``."""

    sites: list[str]

    def d_in(self, site: str) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def next_batch(self, batch_size: int) -> Batch:  # pragma: no cover - abstract
        """The next ``batch_size`` tokens; raises StopIteration when exhausted."""
        raise NotImplementedError

    def request_inputs(self, names: Collection[str]) -> set[str]:
        """Ask for named inputs with every batch (call before the first batch); returns the
        names this source will supply. Default: none."""
        return set()

    def plan_tokens(self, n: int) -> None:
        """A hint: about ``n`` more tokens will be drawn (a run's training and held-back
        batches; a cache's tokens). Sources may size buffers by it; the batches are whatever
        the stream gives either way. Default: ignored."""

    def next_batch_part(self, batch_size: int, lo: int, hi: int) -> Batch:
        """Rows ``[lo, hi)`` of ``next_batch(batch_size)``, advancing the stream as it does.

        Default: the whole batch, cut. Sources that can read part of a batch cheaply
        override it (used by data-parallel shards, :mod:`saekit.sources.shard`).
        """
        from saekit.sources.shard import slice_batch

        return slice_batch(self.next_batch(batch_size), lo, hi, batch_size)

    def shard(self, rank: int, world: int) -> ActivationSource:
        """This source as rank ``rank`` of ``world`` data-parallel ranks sees it.

        Default: :class:`~saekit.sources.shard.RowShard` (rows of the global batch).
        """
        if world == 1:
            return self
        from saekit.sources.shard import RowShard

        return RowShard(self, rank, world)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        while True:
            try:
                yield self.next_batch(batch_size)
            except StopIteration:
                return

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class MemorySource(ActivationSource):
    """Tensors in memory ``{site: [N, d]}``, read in a seeded random order, epoch after epoch.

    ``epochs=0`` cycles forever. ``inputs``: named inputs ``{name: {site: [N, ...]}}``
    carried with the same rows.
    """

    def __init__(
        self,
        acts: dict[str, Tensor] | Tensor,
        seed: int = 0,
        shuffle: bool = True,
        epochs: int = 0,
        inputs: dict[str, dict[str, Tensor]] | None = None,
    ) -> None:
        if isinstance(acts, Tensor):
            acts = {"x": acts}
        n = {t.shape[0] for t in acts.values()}
        if len(n) != 1:
            raise DataError(f"all sites need the same number of tokens, got {sorted(n)}")
        if min(n) < 1:
            raise DataError("MemorySource got no tokens (0 rows): give at least one row")
        self.acts = {k: v.reshape(v.shape[0], -1) for k, v in acts.items()}
        self.inputs = {name: dict(per_site) for name, per_site in (inputs or {}).items()}
        for name, per_site in self.inputs.items():
            for site, t in per_site.items():
                if site not in self.acts or t.shape[0] != self.acts[site].shape[0]:
                    raise ValueError(
                        f"MemorySource input {name!r} at site {site!r}: needs a site of acts"
                        f" and the same number of rows"
                    )
        self.sites = list(self.acts)
        self.n = n.pop()
        self.seed, self.shuffle, self.epochs = seed, shuffle, epochs
        self.pos = 0  # tokens consumed
        self._perm: tuple[int, Tensor] | None = None  # (epoch, its order), built once per epoch

    def d_in(self, site: str) -> int:
        return self.acts[site].shape[1]

    def request_inputs(self, names: Collection[str]) -> set[str]:
        return set(names) & set(self.inputs)

    def _order(self, epoch: int) -> Tensor:
        """The row order of ``epoch`` (a function of seed and epoch only), kept for the epoch."""
        if self._perm is not None and self._perm[0] == epoch:
            return self._perm[1]
        if not self.shuffle:
            order = torch.arange(self.n)
        else:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(self.n, generator=g)
        self._perm = (epoch, order)
        return order

    def next_batch(self, batch_size: int) -> Batch:
        return self.next_batch_part(batch_size, 0, batch_size)

    def next_batch_part(self, batch_size: int, lo: int, hi: int) -> Batch:
        idx = []
        need = batch_size
        while need > 0:
            epoch, off = divmod(self.pos, self.n)
            if self.epochs and epoch >= self.epochs:
                raise StopIteration
            take = min(need, self.n - off)
            idx.append(self._order(epoch)[off : off + take])
            self.pos += take
            need -= take
        i = torch.cat(idx)[lo:hi]
        return Batch(
            acts={k: v[i] for k, v in self.acts.items()},
            inputs={n: {s: t[i] for s, t in d.items()} for n, d in self.inputs.items()},
        )

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pos = int(state["pos"])
