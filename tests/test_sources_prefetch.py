"""PrefetchSource: same batches as the wrapped source, exact state of handed-out batches."""

from __future__ import annotations

import time

import pytest
import torch

from saekit.sources import MemorySource
from saekit.sources.prefetch import PrefetchSource
from saekit.sources.synthetic import SyntheticConfig, SyntheticSource

SMALL = SyntheticConfig(n_features=64, d=16, n_roots=2, branching=2, depth=2, block_size=256)


def test_same_batches_and_exact_state() -> None:
    direct = SyntheticSource(SMALL)
    want = [direct.next_batch(100).acts["synthetic"] for _ in range(8)]
    pre = PrefetchSource(SyntheticSource(SMALL), batch_size=100, depth=3)
    got = [pre.next_batch(100).acts["synthetic"] for _ in range(3)]
    time.sleep(0.2)  # let the thread run ahead
    state = pre.state_dict()
    assert state["pos"] == 300  # the handed-out position, not the produced one
    assert pre.source.state_dict()["pos"] > 300
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    fresh = SyntheticSource(SMALL)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.next_batch(100).acts["synthetic"], want[3])
    # rewinding the prefetcher itself
    pre.load_state_dict(state)
    for w in want[3:6]:
        assert torch.equal(pre.next_batch(100).acts["synthetic"], w)
    pre.close()


def test_stop_iteration_and_errors() -> None:
    mem = MemorySource(torch.arange(50.0).view(25, 2), shuffle=False, epochs=1)
    pre = PrefetchSource(mem, batch_size=10)
    n = sum(b.acts["x"].shape[0] for b in pre.batches(10))
    assert n == 20
    with pytest.raises(StopIteration):
        pre.next_batch(10)
    with pytest.raises(ValueError, match="batch_size=10"):
        pre.next_batch(7)
    pre.close()


def test_worker_errors_reach_the_consumer() -> None:
    class Broken(SyntheticSource):
        def next_batch(self, batch_size: int):  # type: ignore[override]
            raise RuntimeError("disk on fire")

    pre = PrefetchSource(Broken(SMALL), batch_size=4)
    with pytest.raises(RuntimeError, match="disk on fire"):
        pre.next_batch(4)
    pre.close()
