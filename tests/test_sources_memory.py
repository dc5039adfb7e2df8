"""MemorySource: one permutation per epoch (not per batch), same order, exact resume."""

from __future__ import annotations

import torch

from saekit.sources.base import MemorySource


def _reference_order(n: int, seed: int, epochs: int) -> torch.Tensor:
    return torch.cat(
        [torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + e))
         for e in range(epochs)]
    )  # fmt: skip


def test_one_permutation_per_epoch(monkeypatch) -> None:
    calls = []
    real = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: calls.append(a) or real(*a, **k))
    n = 100
    src = MemorySource(torch.arange(n, dtype=torch.float32)[:, None], seed=4)
    rows = torch.cat([src.next_batch(7).acts["x"][:, 0] for _ in range(40)])  # 2.8 epochs
    assert len(calls) == 3  # epochs 0, 1, 2 -- not one per batch (was 40+)
    torch.testing.assert_close(rows.long(), _reference_order(n, 4, 3)[:280])


def test_resume_mid_epoch_gives_the_same_rows() -> None:
    x = torch.randn(50, 3)
    a = MemorySource(x, seed=1)
    for _ in range(9):
        a.next_batch(8)
    state = a.state_dict()
    b = MemorySource(x, seed=1)
    b.load_state_dict(state)
    for _ in range(10):
        assert torch.equal(a.next_batch(8).acts["x"], b.next_batch(8).acts["x"])
