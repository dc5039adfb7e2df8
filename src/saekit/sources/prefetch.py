"""Background prefetching of batches from any activation source.

:class:`PrefetchSource` runs ``source.next_batch(batch_size)`` in a daemon thread and keeps
up to ``depth`` finished batches in a queue, so the model forward (which releases the GIL
in torch ops) overlaps SAE training. With each batch it stores a deep copy of the wrapped
source's ``state_dict()`` taken right after producing it; ``state_dict()`` returns the one
belonging to the last batch *handed out*, so a resumed run continues exactly after that
batch, however far ahead the thread had read.
"""

from __future__ import annotations

import contextlib
import copy
import queue
import threading
from collections.abc import Collection
from typing import Any

from saekit.sources.base import ActivationSource, Batch

_STOP = object()


class PrefetchSource(ActivationSource):
    """Wraps ``source``; only ``batch_size`` batches can be requested."""

    def __init__(self, source: ActivationSource, batch_size: int, depth: int = 2) -> None:
        if batch_size < 1 or depth < 1:
            raise ValueError("batch_size and depth must be positive")
        self.source = source
        self.sites = list(source.sites)
        self.batch_size, self.depth = batch_size, depth
        self._state = copy.deepcopy(source.state_dict())
        self._thread: threading.Thread | None = None
        self._done = False

    def d_in(self, site: str) -> int:
        return self.source.d_in(site)

    def request_inputs(self, names: Collection[str]) -> set[str]:
        if self._thread is not None:
            raise RuntimeError("PrefetchSource.request_inputs after the first batch")
        return self.source.request_inputs(names)

    @property
    def shard_of(self) -> tuple[int, int] | None:
        """``(rank, world)`` when the wrapped source is one rank's shard."""
        return getattr(self.source, "shard_of", None)

    def plan_tokens(self, n: int) -> None:
        if self._thread is not None:
            raise RuntimeError("PrefetchSource.plan_tokens after the first batch")
        self.source.plan_tokens(n)

    def shard(self, rank: int, world: int) -> ActivationSource:
        """Prefetch from the wrapped source's shard from now on (before the first batch);
        returns this source, so closing it still closes everything."""
        if world == 1:
            return self
        if self._thread is not None:
            raise RuntimeError("PrefetchSource.shard must be called before the first batch")
        self.source = self.source.shard(rank, world)
        self._state = copy.deepcopy(self.source.state_dict())
        return self

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._work, name="saekit-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self.source.next_batch(self.batch_size)
                state = copy.deepcopy(self.source.state_dict())
            except BaseException as e:  # handed to the consumer, StopIteration included
                self._put(e)
                return
            if not self._put((batch, state)):
                return

    def _halt(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)
        self._thread.join()
        self._thread = None

    def next_batch(self, batch_size: int) -> Batch:
        if batch_size != self.batch_size:
            raise ValueError(
                f"PrefetchSource was built for batch_size={self.batch_size}, got {batch_size}"
            )
        if self._done:
            raise StopIteration
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._thread = None
            if isinstance(item, StopIteration):
                self._done = True
            raise item
        batch, self._state = item
        return batch

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._halt()
        self.source.load_state_dict(state)
        self._state = copy.deepcopy(state)
        self._done = False

    def close(self) -> None:
        self._halt()
        self.source.close()
