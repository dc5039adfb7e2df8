"""Sparse kernels for codes with k << d_sae active latents per token.

A TopK-style training step has one unavoidable dense product, the encoder ``x_in @ W_enc``
(computed by the caller without grad). Everything else here is O(B*k*d_in):

* :func:`sparse_encode` gathers the selected pre-activations ``pre[b, idx[b, j]]``; its
  backward gives ``W_enc``'s gradient as a *segment sum*: the B*k (token, latent) pairs are
  sorted by latent once and ``F.embedding_bag`` sums, for each latent, its tokens' rows of
  ``x_in`` weighted by the upstream gradient. This never materialises ``[B, k, d_in]`` (the
  old ``index_add`` of ``x_in[b] * g[b, j]`` rows did, ~6x slower on CPU) nor the dense
  ``[B, d_sae]`` gradient (a second full matmul).
* :func:`sparse_encode_centered` is the same with ``x_in = x - b_dec`` folded in: the
  gradient of ``b_dec`` is ``-W_enc @ grad_b_enc`` (one matvec) instead of a per-token
  ``[B, d_in]`` gradient, unless ``x`` itself needs a gradient.
* :func:`sparse_decode` is ``sum_j v_j W_dec[idx_j]`` (``embedding_bag``) whose backward is
  the same segment sum for ``W_dec`` and, for the values, dot products taken latent by
  latent (each decoder row read once).

Selections without sorting the whole ``[B, d_sae]`` matrix: :func:`global_topk` (BatchTopK /
Mutual Choice), :func:`keep_to_padded` (threshold inference), :func:`capacity_selection`
(Feature Choice). All return padded per-row indices whose padding is masked and distinct
from the row's kept indices.

Precision: every gradient is accumulated in the dtype of the weight it belongs to (fp32
master weights under bf16 autocast) and returned in the dtype of its input.
Dense references for all of this live in ``tests/test_kernels.py``.

Backends: on CUDA the three autograd functions run the Triton kernels of
:mod:`saekit.triton_kernels` (when ``triton`` is installed); elsewhere, or with
``SAEKIT_KERNELS=eager``, the eager torch ops above. Both give the same values and
gradients (``tests/test_kernels_triton.py``, run on CPU under Triton's interpreter).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from saekit import triton_kernels as tk

#: tokens per chunk in the fallback value gradient (bounds the [chunk, k, d_in] gather)
VALUE_GRAD_CHUNK = 256


def segments(idx: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Group the (token, slot) pairs of ``idx [B, K]`` by latent.

    Returns ``order`` (flat positions sorted by latent), ``tok`` (the token of each sorted
    pair) and ``offsets [n]`` (start of each latent's segment; empty segments allowed).
    """
    K = idx.shape[1]
    flat = idx.reshape(-1)
    if flat.device.type == "cpu":
        # numpy's single-threaded introsort: torch's CPU sort runs OpenMP regions that stall
        # for hundreds of ms when the cores are shared (measured: median 560 ms vs 1.7 ms
        # for 131k indices on 2 busy cores)
        order = torch.from_numpy(np.argsort(flat.numpy()))
    else:
        order = torch.argsort(flat)
    tok = torch.div(order, K, rounding_mode="floor")
    counts = torch.bincount(flat, minlength=n)
    offsets = counts.cumsum(0) - counts
    return order, tok, offsets


def segment_sum(
    rows: Tensor, weights: Tensor, seg: tuple[Tensor, Tensor, Tensor], dtype: torch.dtype
) -> Tensor:
    """``out[i] = sum over pairs (b, j) with idx[b, j] = i of weights[b, j] * rows[b]``.

    ``rows [B, d]``, ``weights [B, K]``, ``seg`` from :func:`segments`; ``out [n, d]`` in
    ``dtype`` (the accumulation dtype).
    """
    order, tok, offsets = seg
    w = weights.reshape(-1)[order].to(dtype)
    return F.embedding_bag(
        tok, rows.to(dtype), offsets, per_sample_weights=w, mode="sum"
    ).contiguous()


def _triton(t: Tensor) -> bool:
    """Whether tensors on ``t``'s device use the Triton kernels (see ``tk.backend``)."""
    return tk.backend(t.device) == "triton"


def _gather_grad_x(idx: Tensor, g: Tensor, W_enc: Tensor) -> Tensor:
    # grad_x[b] = sum_j g[b, j] * W_enc[:, idx[b, j]]: embedding_bag over the rows of W_enc^T
    # (free for the SAE's latent-major W_enc; otherwise a copy, since embedding_bag on the
    # strided view is ~50x slower on CPU)
    if _triton(g):
        return tk.gather_rows(idx, g, W_enc.t(), W_enc.dtype)
    return F.embedding_bag(
        idx, W_enc.t().contiguous(), per_sample_weights=g.to(W_enc.dtype), mode="sum"
    )


class _SparseEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_in: Tensor, W_enc: Tensor, b_enc: Tensor, idx: Tensor, sel: Tensor):
        ctx.save_for_backward(x_in, W_enc, idx)
        return sel.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        x_in, W_enc, idx = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        gx = gW = gb = None
        if ctx.needs_input_grad[0]:
            gx = _gather_grad_x(idx, g, W_enc).to(x_in.dtype)
        if ctx.needs_input_grad[1] and _triton(g):
            gW = tk.segment_sum(idx, g, x_in, d_sae, W_enc.dtype).t()
        elif ctx.needs_input_grad[1]:
            gW = segment_sum(x_in, g, segments(idx, d_sae), W_enc.dtype).t()
        if ctx.needs_input_grad[2]:
            gb = torch.zeros(d_sae, dtype=W_enc.dtype, device=g.device)
            gb.index_add_(0, idx.reshape(-1), g.reshape(-1).to(W_enc.dtype))
        return gx, gW, gb, None, None


class _SparseEncodeCentered(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, idx: Tensor, sel: Tensor
    ):
        ctx.save_for_backward(x, b_dec, W_enc, idx)
        return sel.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        x, b_dec, W_enc, idx = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        need_x, need_bdec, need_W, need_b = ctx.needs_input_grad[:4]
        gx = gbd = gW = gb = None
        gsum = None
        if need_bdec or need_b:
            gsum = torch.zeros(d_sae, dtype=W_enc.dtype, device=g.device)
            gsum.index_add_(0, idx.reshape(-1), g.reshape(-1).to(W_enc.dtype))
        if need_x:
            gx = _gather_grad_x(idx, g, W_enc)
            if need_bdec:
                gbd = (-gx.sum(0)).to(b_dec.dtype)
            gx = gx.to(x.dtype)
        elif need_bdec:
            assert gsum is not None
            gbd = (-(W_enc @ gsum)).to(b_dec.dtype)
        if need_W and _triton(g):  # x - b_dec fused into the segment sum
            gW = tk.segment_sum(idx, g, x, d_sae, W_enc.dtype, shift=b_dec).t()
        elif need_W:
            x_in = x.to(W_enc.dtype) - b_dec.to(W_enc.dtype)
            gW = segment_sum(x_in, g, segments(idx, d_sae), W_enc.dtype).t()
        if need_b:
            gb = gsum
        return gx, gbd, gW, gb, None, None


def _grad_needed(*ts: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _selected(pre: Tensor | None, idx: Tensor, selected: Tensor | None) -> Tensor:
    if selected is not None:
        return selected.detach()
    if pre is None:
        raise TypeError("give pre or selected")
    return pre.detach().gather(1, idx)


def sparse_encode(
    x_in: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    idx: Tensor,
    pre: Tensor | None = None,
    selected: Tensor | None = None,
) -> Tensor:
    """Selected pre-activations ``pre[b, idx[b, j]]`` with sparse gradients.

    ``pre`` must equal ``x_in @ W_enc + b_enc`` (computed without grad by the caller), or
    ``selected`` its entries at ``idx`` already (see :func:`chunked_row_topk`).
    """
    sel = _selected(pre, idx, selected)
    if not _grad_needed(x_in, W_enc, b_enc):
        return sel
    return _SparseEncode.apply(x_in, W_enc, b_enc, idx, sel)


def sparse_encode_centered(
    x: Tensor,
    b_dec: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    idx: Tensor,
    pre: Tensor | None = None,
    selected: Tensor | None = None,
) -> Tensor:
    """:func:`sparse_encode` with ``x_in = x - b_dec``; ``pre`` must equal ``x_in @ W_enc + b_enc``.

    When ``x`` needs no gradient, ``b_dec``'s gradient is the matvec ``-W_enc @ grad_b_enc``
    (O(d_in*d_sae)) rather than a sum of B per-token gradients (O(B*k*d_in)).
    """
    sel = _selected(pre, idx, selected)
    if not _grad_needed(x, b_dec, W_enc, b_enc):
        return sel
    return _SparseEncodeCentered.apply(x, b_dec, W_enc, b_enc, idx, sel)


def _value_grad(
    go: Tensor, W_dec: Tensor, idx: Tensor, seg: tuple[Tensor, Tensor, Tensor]
) -> Tensor:
    """``gv[b, j] = <go[b], W_dec[idx[b, j]]>`` without materialising ``W_dec[idx]``.

    Walks the pairs grouped by latent (``seg`` from :func:`segments`): each decoder row is
    read once, sequentially, and dotted with its tokens' rows of ``go`` (small, cache
    resident). Uses ATen's embedding-bag per-sample-weight backward with the roles of
    weight and gradient swapped (~2x faster on CPU than the token-ordered call, which
    gathers a random 4*d_in-byte decoder row per pair); a chunked gather + bmm is the
    fallback should that private op change.
    """
    B, K = idx.shape
    order, tok, offsets = seg
    try:
        bag = idx.reshape(-1)[order]
        r = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            W_dec, go.contiguous(), tok, offsets, bag, 0, -1
        )
        gv = torch.empty_like(r)
        gv[order] = r
        return gv.view(B, K)
    except (RuntimeError, AttributeError):  # pragma: no cover - private op changed
        gv = torch.empty(B, K, dtype=W_dec.dtype, device=idx.device)
        for s in range(0, B, VALUE_GRAD_CHUNK):
            e = s + VALUE_GRAD_CHUNK
            gv[s:e] = torch.bmm(W_dec[idx[s:e]], go[s:e].unsqueeze(2)).squeeze(2)
        return gv


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx: Tensor, values: Tensor, W_dec: Tensor):
        ctx.save_for_backward(idx, values, W_dec)
        return _decode(idx, values, W_dec)

    @staticmethod
    @once_differentiable
    def backward(ctx, go: Tensor):
        idx, values, W_dec = ctx.saved_tensors
        gv = gW = None
        if _triton(go):
            if ctx.needs_input_grad[1]:
                gv = tk.row_dots(idx, go, W_dec, values.dtype)
            if ctx.needs_input_grad[2]:
                gW = tk.segment_sum(idx, values, go, W_dec.shape[0], W_dec.dtype)
            return None, gv, gW
        seg = segments(idx, W_dec.shape[0])  # shared by both gradients
        if ctx.needs_input_grad[1]:
            gv = _value_grad(go.to(W_dec.dtype), W_dec, idx, seg).to(values.dtype)
        if ctx.needs_input_grad[2]:
            gW = segment_sum(go, values, seg, W_dec.dtype)
        return None, gv, gW


def sparse_decode(idx: Tensor, values: Tensor, W_dec: Tensor) -> Tensor:
    """``out[b] = sum_j values[b, j] * W_dec[idx[b, j]]`` (no bias), sparse backward."""
    if idx.shape[1] == 0:
        return values.new_zeros(idx.shape[0], W_dec.shape[1]).to(W_dec.dtype)
    if not _grad_needed(values, W_dec):
        return _decode(idx, values, W_dec)
    return _SparseDecode.apply(idx, values, W_dec)


def _decode(idx: Tensor, values: Tensor, W_dec: Tensor) -> Tensor:
    if _triton(values):
        return tk.gather_rows(idx, values, W_dec, W_dec.dtype)
    return F.embedding_bag(idx, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")


def dense_decode(codes: Tensor, W_dec: Tensor) -> Tensor:
    """``codes @ W_dec`` for dense codes ``[B, d_sae]``."""
    return codes @ W_dec


def chunked_row_topk(
    x_in: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    chunk: int,
    cols: Tensor | None = None,
    absolute: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-row top-``k`` of ``pre = x_in @ W_enc + b_enc`` computed ``chunk`` latents at a
    time (no grad): ``values [B, k]`` (signed ``pre`` entries) and ``indices [B, k]``.

    ``cols``: only these latents compete (indices still refer to all latents);
    ``absolute``: rank by ``|pre|``. A running top-``k`` is merged with each chunk's, so
    the largest temporaries are ``[B, chunk]`` and ``[d_in, chunk]``, never ``[B, d_sae]``.
    Equals ``pre.topk(k)`` up to ties and the matmul's rounding.
    """
    F = W_enc.shape[1] if cols is None else cols.numel()
    k = min(k, F)
    best: tuple[Tensor, Tensor, Tensor] | None = None  # values, indices, scores
    for s in range(0, F, max(chunk, 1)):
        if cols is None:
            c = torch.arange(s, min(s + chunk, F), device=x_in.device)
            p = torch.addmm(b_enc[s : s + chunk], x_in, W_enc[:, s : s + chunk])
        else:
            c = cols[s : s + chunk]
            p = torch.addmm(b_enc[c], x_in, W_enc[:, c])
        score = p.abs() if absolute else p
        top = score.topk(min(k, p.shape[1]), dim=1, sorted=False)
        new = (p.gather(1, top.indices), c[top.indices], top.values)
        if best is None:
            best = new
            continue
        v, i, sc = (torch.cat([o, n], 1) for o, n in zip(best, new))
        keep = sc.topk(min(k, sc.shape[1]), dim=1, sorted=False).indices
        best = (v.gather(1, keep), i.gather(1, keep), sc.gather(1, keep))
    if best is None:  # no latent at all
        empty = x_in.new_zeros(x_in.shape[0], 0)
        return empty, torch.zeros(empty.shape, dtype=torch.long, device=x_in.device)
    return best[0], best[1]


# ---------------------------------------------------------------------- selections
#: elements of the temporary of :func:`masked_row_topk` (rows per chunk = this / columns)
MASKED_TOPK_ELEMENTS = 1 << 22


def abs_row_topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(|values|, indices)``, ``[B, k]``, of each row's ``k`` largest ``|pre|`` (``k``
    clipped to the row length) without forming ``|pre|``.

    The row's ``k`` largest and ``k`` smallest entries are merged: an entry scores ``u`` in
    the first list when ``u >= 0`` and ``-u`` in the second when ``u < 0`` (``-inf``
    otherwise), so no column is picked twice. Exact: each of the ``k`` largest ``|u|`` is
    non-negative and among the ``k`` largest ``u``, or negative and among the ``k``
    smallest, and the two lists hold at least ``k`` finite scores. Equals
    ``pre.abs().topk(k)`` up to ties (the same ``|values|`` either way). Temporaries are
    ``[B, 2k]``.
    """
    kk = min(k, pre.shape[-1])
    hi = pre.topk(kk, dim=-1, sorted=False)
    lo = pre.topk(kk, dim=-1, largest=False, sorted=False)
    ninf = pre.new_tensor(float("-inf"))
    score = torch.cat(
        [torch.where(hi.values < 0, ninf, hi.values), torch.where(lo.values < 0, -lo.values, ninf)],
        dim=-1,
    )
    top = score.topk(kk, dim=-1, sorted=False)
    return top.values, torch.cat([hi.indices, lo.indices], dim=-1).gather(-1, top.indices)


def row_topk(score: Tensor, k: int, absolute: bool = False) -> tuple[Tensor, Tensor]:
    """``(values, indices)`` of each row's ``k`` largest ``score`` (of ``|score|`` when
    ``absolute``, see :func:`abs_row_topk`; values are then ``|score|``); ``k`` clipped to
    the row length, unsorted."""
    if absolute:
        return abs_row_topk(score, k)
    top = score.topk(min(k, score.shape[-1]), dim=-1, sorted=False)
    return top.values, top.indices


def masked_row_topk(pre: Tensor, allowed: Tensor, k: int, absolute: bool = False) -> Tensor:
    """Indices ``[B, k]`` of each row's ``k`` largest entries of ``pre [B, F]`` (of ``|pre|``
    when ``absolute``) among the columns where ``allowed [F]`` is True (``k`` <= their number).

    Equals ``where(allowed, score, -inf).topk(k)`` up to ties without that ``[B, F]`` score:
    the allowed columns are gathered in row chunks of at most :data:`MASKED_TOPK_ELEMENTS`
    elements (no copy at all when every column is allowed: :func:`row_topk`).
    """
    B, F = pre.shape
    cols = allowed.nonzero(as_tuple=True)[0]
    n = cols.numel()
    if k > n:
        raise ValueError(f"k={k} but only {n} columns are allowed")
    every = n == F
    if every:
        return row_topk(pre, k, absolute)[1]
    out = torch.empty(B, k, dtype=torch.long, device=pre.device)
    step = max(1, MASKED_TOPK_ELEMENTS // max(n, 1))
    for s in range(0, B, step):
        sub = pre[s : s + step].index_select(1, cols)
        if absolute:
            sub.abs_()
        out[s : s + step] = cols[sub.topk(k, dim=1, sorted=False).indices]
    return out


#: per-row candidates of :func:`global_topk`, as a multiple of the mean budget per row
GLOBAL_TOPK_CANDIDATES = 2.0


def keep_to_padded(keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A ``[B, F]`` boolean mask as padded per-row indices.

    Returns ``idx [B, K]`` (kept columns of each row in ascending order, then padding),
    ``mask [B, K]`` (False on padding) and ``counts [B]``, with ``K = max(counts.max(), 1)``.
    Padding indices are the row's smallest *unkept* columns, so indices stay distinct
    within a row (a scatter of padded codes never overwrites a kept latent). One
    ``nonzero`` pass: no ``[B, F]`` float copy and no top-k over the full matrix.
    """
    B, F = keep.shape
    rows, cols = keep.nonzero(as_tuple=True)  # row-major: columns ascending within a row
    return pairs_to_padded(rows, cols, B, F)


def pairs_to_padded(rows: Tensor, cols: Tensor, B: int, F: int) -> tuple[Tensor, Tensor, Tensor]:
    """Like :func:`keep_to_padded` from the kept ``(rows, cols)`` pairs, sorted row-major."""
    counts = torch.bincount(rows, minlength=B) if rows.numel() else rows.new_zeros(B)
    K = min(max(int(counts.max()) if B else 0, 1), F)
    start = counts.cumsum(0) - counts
    pos = torch.arange(rows.numel(), device=rows.device) - start[rows]
    idx = torch.full((B, K), F, dtype=torch.long, device=rows.device)
    idx[rows, pos] = cols
    mask = torch.zeros(B, K, dtype=torch.bool, device=rows.device)
    mask[rows, pos] = True
    return _pad_distinct(idx, mask, counts, F), mask, counts


def _pad_distinct(idx: Tensor, mask: Tensor, counts: Tensor, F: int) -> Tensor:
    """Replace padding slots of ``idx`` by the row's smallest unkept columns.

    ``idx [B, K]`` holds each row's kept columns in ascending order in its first
    ``counts[b]`` slots (``mask`` True there).
    """
    B, K = idx.shape
    slot = torch.arange(K, device=idx.device).expand(B, K)
    # kept column c_i at slot i has g_i = c_i - i unkept columns before it; the j-th unkept
    # column of the row is j + #{i : g_i <= j}
    g = torch.where(mask, idx - slot, torch.full_like(idx, F))
    j = (slot - counts[:, None]).clamp_min(0).contiguous()
    unkept = j + torch.searchsorted(g.contiguous(), j, right=True)
    return torch.where(mask, idx, unkept)


def global_topk_exact(pre: Tensor, budget: int) -> tuple[Tensor, Tensor, Tensor]:
    """Reference for :func:`global_topk`: one top-k over the flattened ``[B, F]`` matrix."""
    B, F = pre.shape
    flat = pre.reshape(-1)
    budget = max(0, min(budget, flat.numel()))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if budget:
        keep[flat.topk(budget, sorted=False).indices] = True
    keep &= flat > 0
    return keep_to_padded(keep.view(B, F))


def global_topk(
    pre: Tensor, budget: int, candidates: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``budget`` largest *positive* entries of ``pre [B, F]`` (BatchTopK / Mutual Choice).

    Returns ``idx [B, K]``, ``mask [B, K]``, ``counts [B]`` (see :func:`keep_to_padded`;
    padding indices are distinct within a row, mask False). Exactly ``min(budget, #positive)``
    entries are kept; ties at the threshold are broken arbitrarily.

    Without sorting B*F values: each row's top ``m = candidates * budget / B`` entries are
    candidates, the global top-``budget`` is taken over the B*m candidates, and a row whose
    smallest candidate is still above that threshold (it may hold more winners than
    candidates) gets 4x more candidates, repeated until no row is in doubt (at worst its
    whole row). The result equals the exact flattened top-k up to ties.
    """
    B, F = pre.shape
    budget = max(0, min(budget, B * F))
    c = GLOBAL_TOPK_CANDIDATES if candidates is None else candidates
    if c < 1:
        raise ValueError(f"candidates must be >= 1 (a multiple of budget / B), got {c}")
    m = min(F, max(1, math.ceil(c * budget / max(B, 1))))
    if budget == 0 or B == 0 or m >= F:
        return global_topk_exact(pre, budget)
    cv, ci = pre.topk(m, dim=1, sorted=False)
    full = torch.zeros(B, dtype=torch.bool, device=pre.device)  # rows with every entry
    while True:
        flat = cv.reshape(-1)
        top = flat.topk(min(budget, flat.numel()), sorted=False)
        t = top.values.min()
        doubt = (cv.min(1).values > t) & ~full
        if not bool(doubt.any()):
            break
        rows = doubt.nonzero(as_tuple=True)[0]
        m2 = min(F, 4 * cv.shape[1])
        if m2 > cv.shape[1]:  # widen every row's candidate list (-inf padding)
            pad = m2 - cv.shape[1]
            cv = torch.cat([cv, cv.new_full((B, pad), float("-inf"))], 1)
            ci = torch.cat([ci, ci.new_full((B, pad), 0)], 1)
        v2, i2 = pre[rows].topk(m2, dim=1, sorted=False)
        cv[rows], ci[rows] = v2, i2
        full[rows] = m2 >= F
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[top.indices] = True
    keep &= flat > 0
    keep = keep.view(cv.shape)
    counts = keep.sum(1)
    K = min(max(int(counts.max()), 1), F)
    # kept columns of each row, ascending, then distinct padding (never touches [B, F])
    kc = torch.where(keep, ci, torch.full_like(ci, F))
    idx = kc.topk(K, dim=1, largest=False, sorted=True).values
    mask = torch.arange(K, device=pre.device)[None, :] < counts[:, None]
    return _pad_distinct(idx, mask, counts, F), mask, counts


def _capacity_pairs(z: Tensor, m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    B, F = z.shape
    if m.shape != (F,):
        raise ValueError(f"capacities have shape {tuple(m.shape)}, expected ({F},)")
    m = m.to(device=z.device, dtype=torch.long).clamp(0, B)
    low = torch.full((F,), float("inf"), dtype=z.dtype, device=z.device)
    rows_all, cols_all = [], []
    if B and F and int(m.max()) > 0:
        # bucket j holds columns with 2^(j-1) < m <= 2^j (j = 0: m = 1)
        bucket = torch.ceil(torch.log2(m.clamp_min(1).double())).long()
        bucket[m == 0] = -1
        for j in torch.unique(bucket).tolist():
            if j < 0:
                continue
            cols = (bucket == j).nonzero(as_tuple=True)[0]
            width = min(1 << j, B)
            v, r = z.index_select(1, cols).t().topk(width, dim=1, sorted=True)  # [n, width]
            ok = (torch.arange(width, device=z.device)[None, :] < m[cols][:, None]) & (v > 0)
            rows_all.append(r[ok])
            cols_all.append(cols[:, None].expand_as(r)[ok])
            low[cols] = torch.where(ok, v, torch.full_like(v, float("inf"))).min(1).values
    empty = torch.zeros(0, dtype=torch.long, device=z.device)
    rows = torch.cat(rows_all) if rows_all else empty
    cols = torch.cat(cols_all) if cols_all else empty
    return rows, cols, low


def capacity_topk(z: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """Column ``i`` of ``z [B, F]`` keeps its ``m[i]`` largest *positive* entries (Feature Choice).

    Returns ``keep [B, F]`` (bool) and ``low [F]``, the smallest kept value of each column
    (``inf`` where nothing is kept). Ties at a column's cut are broken arbitrarily.

    Instead of one column top-``max(m)`` over every column (a near-full sort of all columns
    when one capacity approaches B), columns are grouped by capacity into power-of-two
    buckets and each bucket takes a top-``2^j`` over its own columns only: the work
    follows the capacities, not their maximum.
    """
    rows, cols, low = _capacity_pairs(z, m)
    keep = torch.zeros(z.shape, dtype=torch.bool, device=z.device)
    keep[rows, cols] = True
    return keep, low


def capacity_selection(z: Tensor, m: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`capacity_topk` as padded per-row ``idx, mask, counts`` plus ``low [F]``.

    Never builds the ``[B, F]`` mask: the kept pairs are sorted row-major (one sort of
    ``sum(m)`` keys) and padded like :func:`keep_to_padded` (distinct padding indices).
    """
    B, F = z.shape
    rows, cols, low = _capacity_pairs(z, m)
    key = rows * F + cols
    if key.device.type == "cpu":
        order = torch.from_numpy(np.argsort(key.numpy()))
    else:
        order = torch.argsort(key)
    idx, mask, counts = pairs_to_padded(rows[order], cols[order], B, F)
    return idx, mask, counts, low


def capacity_topk_reference(z: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """One column top-``max(m)`` masked down to each column's ``m[i]`` (the plain way)."""
    B, F = z.shape
    m = m.to(device=z.device, dtype=torch.long).clamp(0, B)
    mmax = max(int(m.max()), 1)
    v, r = z.topk(mmax, dim=0, sorted=True)
    ok = (torch.arange(mmax, device=z.device)[:, None] < m[None, :]) & (v > 0)
    keep = torch.zeros(B, F, dtype=torch.bool, device=z.device).scatter_(0, r, ok)
    low = torch.where(ok, v, torch.full_like(v, float("inf"))).min(0).values
    return keep, low
