"""The activation-source protocol: what the trainer consumes.

A source yields :class:`Batch` es of exactly ``batch_size`` tokens for each of its sites.
It knows nothing of SAEs. ``state_dict`` / ``load_state_dict`` capture the data position
so that a resumed run continues with exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from saekit.errors import DataError


@dataclass
class Batch:
    """Activations per site ``[B, d]``; optional gradients dLoss/dx per site (for gtopk)."""

    acts: dict[str, Tensor]
    grads: dict[str, Tensor] = field(default_factory=dict)
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

    ``epochs=0`` cycles forever.
    """

    def __init__(
        self,
        acts: dict[str, Tensor] | Tensor,
        seed: int = 0,
        shuffle: bool = True,
        epochs: int = 0,
        grads: dict[str, Tensor] | None = None,
    ) -> None:
        if isinstance(acts, Tensor):
            acts = {"x": acts}
        n = {t.shape[0] for t in acts.values()}
        if len(n) != 1:
            raise DataError(f"all sites need the same number of tokens, got {sorted(n)}")
        self.acts = {k: v.reshape(v.shape[0], -1) for k, v in acts.items()}
        self.grads = grads or {}
        self.sites = list(self.acts)
        self.n = n.pop()
        self.seed, self.shuffle, self.epochs = seed, shuffle, epochs
        self.pos = 0  # tokens consumed

    def d_in(self, site: str) -> int:
        return self.acts[site].shape[1]

    def _order(self, epoch: int) -> Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def next_batch(self, batch_size: int) -> Batch:
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
        i = torch.cat(idx)
        return Batch(
            acts={k: v[i] for k, v in self.acts.items()},
            grads={k: v[i] for k, v in self.grads.items()},
        )

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pos = int(state["pos"])
