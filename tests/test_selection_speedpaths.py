"""Fast global selections vs a naive full sort of the B x F matrix."""

from __future__ import annotations

import pytest
import torch

from saekit import kernels
from saekit.rules.batchtopk import batch_topk_selection, threshold_selection


def _naive_global(pre: torch.Tensor, budget: int) -> set[tuple[int, int]]:
    """Top ``budget`` positive entries by a full descending sort."""
    B, F = pre.shape
    order = torch.argsort(pre.reshape(-1), descending=True)[:budget]
    return {(int(i) // F, int(i) % F) for i in order if pre.reshape(-1)[i] > 0}


def _as_set(idx: torch.Tensor, mask: torch.Tensor) -> set[tuple[int, int]]:
    rows, slots = mask.nonzero(as_tuple=True)
    return {(int(r), int(idx[r, s])) for r, s in zip(rows, slots)}


def _check_padding(idx: torch.Tensor, mask: torch.Tensor, counts: torch.Tensor, F: int) -> None:
    assert idx.min() >= 0 and idx.max() < F
    assert torch.equal(mask.sum(1), counts)
    for row in idx:  # distinct within a row, padding included
        assert row.unique().numel() == row.numel()


def _cases() -> list[tuple[str, torch.Tensor, int]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for B, F, k in [(32, 64, 3), (50, 200, 7), (9, 17, 5), (1, 40, 6)]:
        out.append((f"randn{B}x{F}", torch.randn(B, F, generator=g), k * B))
    skew = torch.randn(40, 100, generator=g)
    skew[3] += 50.0  # one token beats everything: forces candidate widening up to a full row
    skew[7, :30] += 20.0
    out.append(("skewed", skew, 5 * 40))
    mostly_neg = torch.randn(30, 80, generator=g) - 2.5  # fewer positives than the budget
    out.append(("mostly_negative", mostly_neg, 10 * 30))
    out.append(("all_negative", -torch.rand(6, 10, generator=g) - 0.1, 12))
    out.append(("budget_over_size", torch.randn(4, 5, generator=g), 100))
    return out


@pytest.mark.parametrize("name,pre,budget", _cases(), ids=[c[0] for c in _cases()])
@pytest.mark.parametrize("candidates", [1.0, 2.0, 8.0])
def test_global_topk_equals_full_sort(name: str, pre: torch.Tensor, budget: int, candidates: float):
    want = _naive_global(pre, budget)
    idx, mask, counts = kernels.global_topk(pre, budget, candidates=candidates)
    assert _as_set(idx, mask) == want
    _check_padding(idx, mask, counts, pre.shape[1])
    e_idx, e_mask, _ = kernels.global_topk_exact(pre, budget)
    assert _as_set(e_idx, e_mask) == want


def test_global_topk_rejects_bad_candidates() -> None:
    with pytest.raises(ValueError, match="candidates"):
        kernels.global_topk(torch.randn(4, 8), 8, candidates=0.5)


def test_batch_topk_selection_uses_fast_path_and_matches() -> None:
    pre = torch.randn(64, 256)
    pre[5] += 10
    sel = batch_topk_selection(pre, 4 * 64)
    assert sel.indices is not None and sel.mask is not None
    assert _as_set(sel.indices, sel.mask) == _naive_global(pre, 4 * 64)
    assert int(sel.extras["counts"].sum()) == 4 * 64
    _check_padding(sel.indices, sel.mask, sel.extras["counts"], 256)


@pytest.mark.parametrize("per_latent", [False, True])
def test_threshold_selection_matches_mask(per_latent: bool) -> None:
    pre = torch.randn(40, 90)
    th = torch.rand(90) + 0.5 if per_latent else torch.tensor(1.2)
    pre[0] = -5.0  # a row with nothing kept
    sel = threshold_selection(pre, th)
    keep = pre > th
    want = {(int(r), int(c)) for r, c in zip(*keep.nonzero(as_tuple=True))}
    assert sel.indices is not None and sel.mask is not None
    assert _as_set(sel.indices, sel.mask) == want
    _check_padding(sel.indices, sel.mask, sel.extras["counts"], 90)


def test_keep_to_padded_empty_and_full_rows() -> None:
    keep = torch.zeros(3, 6, dtype=torch.bool)
    keep[1] = True
    keep[2, [0, 4]] = True
    idx, mask, counts = kernels.keep_to_padded(keep)
    assert counts.tolist() == [0, 6, 2]
    assert idx[1].tolist() == list(range(6)) and mask[1].all()
    assert idx[2, :2].tolist() == [0, 4] and idx[2, 2:].tolist() == [1, 2, 3, 5]
    assert idx[0].tolist() == list(range(6)) and not mask[0].any()


def _naive_capacity(z: torch.Tensor, m: torch.Tensor) -> tuple[set, torch.Tensor]:
    B, F = z.shape
    keep, low = set(), torch.full((F,), float("inf"))
    for i in range(F):
        col = z[:, i]
        order = torch.argsort(col, descending=True)[: int(m[i])]
        kept = [int(r) for r in order if col[r] > 0]
        keep |= {(r, i) for r in kept}
        if kept:
            low[i] = col[kept].min()
    return keep, low


@pytest.mark.parametrize("B,F", [(16, 40), (33, 70), (64, 9)])
def test_capacity_topk_equals_per_column_sort(B: int, F: int) -> None:
    g = torch.Generator().manual_seed(B * F)
    z = torch.relu(torch.randn(B, F, generator=g))
    m = torch.randint(0, B + 1, (F,), generator=g)
    m[0], m[-1] = B, 0  # a full column and an empty one
    want_keep, want_low = _naive_capacity(z, m)
    for fn in (kernels.capacity_topk, kernels.capacity_topk_reference):
        keep, low = fn(z, m)
        got = {(int(r), int(c)) for r, c in zip(*keep.nonzero(as_tuple=True))}
        assert got == want_keep, fn.__name__
        torch.testing.assert_close(low, want_low)


def test_capacity_topk_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match="capacities"):
        kernels.capacity_topk(torch.rand(4, 5), torch.ones(4, dtype=torch.long))


def test_capacity_selection_matches_capacity_topk() -> None:
    g = torch.Generator().manual_seed(7)
    z = torch.relu(torch.randn(24, 50, generator=g))
    m = torch.randint(0, 25, (50,), generator=g)
    keep, low = kernels.capacity_topk(z, m)
    idx, mask, counts, low2 = kernels.capacity_selection(z, m)
    assert _as_set(idx, mask) == {(int(r), int(c)) for r, c in zip(*keep.nonzero(as_tuple=True))}
    _check_padding(idx, mask, counts, 50)
    assert torch.equal(counts, keep.sum(1))
    torch.testing.assert_close(low, low2)
