"""Triton implementations of the sparse kernels in :mod:`saekit.kernels` (CUDA).

Three kernels serve every sparse product of a TopK-style step (``idx [B, K]`` latent
indices, ``W [n, d]`` row-major rows, fp32 accumulation, stored in the output's dtype):

* :func:`gather_rows` -- ``out[b] = sum_j v[b, j] * W[idx[b, j]]``: the decoder forward
  and the encoder's input gradient (with ``W = W_enc^T``, latent-major). One program per
  (token, block of ``d``), looping over the token's ``K`` slots in blocks.
* :func:`row_dots` -- ``out[b, j] = <g[b], W[idx[b, j]]>``: the decoder's value gradient.
  One program per (token, block of slots), looping over ``d`` in blocks.
* :func:`segment_sum` -- ``out[i] = sum over (b, j) with idx[b, j] = i of
  w[b, j] * (rows[b] - shift)``: the weight gradients of decoder and encoder (``shift =
  b_dec`` fuses the centred encoder input ``x - b_dec``). The B*K pairs are sorted by
  latent once; one program per (latent, block of ``d``) sums its own segment and writes
  its row once: no atomics, deterministic, empty latents get zeros.

The launch wrappers take plain tensors; :mod:`saekit.kernels` decides when to use them
(:func:`backend`). The kernels follow OpenAI's ``sparse_autoencoder/kernels.py`` and
sparsify's fused encoder in what they compute; the segment layout is ours.

Testing without a GPU: with ``TRITON_INTERPRET=1`` set before this module is imported,
Triton's interpreter runs the same kernels on CPU tensors (``tests/test_kernels_triton.py``).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor

from saekit.errors import ConfigError, EnvironmentProblem

#: environment variable choosing the kernels: auto (Triton on CUDA), eager, triton
ENV = "SAEKIT_KERNELS"
#: block sizes (powers of two); tests lower them to cover partial blocks on small shapes
BLOCK_D = 128
BLOCK_K = 32
BLOCK_P = 32


@functools.cache
def available() -> bool:
    """Whether Triton can be imported."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def backend(device: torch.device | str) -> str:
    """``"triton"`` or ``"eager"`` for tensors on ``device``, from ``SAEKIT_KERNELS``.

    ``auto`` (default): Triton on CUDA when it is installed, else eager. ``eager``: always
    eager. ``triton``: always Triton (on CPU tensors only under ``TRITON_INTERPRET=1``).
    """
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    dev = torch.device(device).type
    if mode == "eager":
        return "eager"
    if mode == "auto":
        return "triton" if dev == "cuda" and available() else "eager"
    if mode == "triton":
        if not available():
            raise EnvironmentProblem(
                f"{ENV}=triton but triton is not installed; pip install triton or unset {ENV}"
            )
        if dev != "cuda" and not interpreting():
            raise EnvironmentProblem(
                f"{ENV}=triton needs CUDA tensors (got {dev}) or TRITON_INTERPRET=1 set before"
                " saekit is imported"
            )
        return "triton"
    raise ConfigError(f"{ENV}={mode!r} is not a kernel choice; use auto, eager or triton")


@functools.cache
def _kernels():  # noqa: ANN202 - the jitted kernels, built on first use
    import triton
    import triton.language as tl

    @triton.jit
    def gather_rows_kernel(
        idx_ptr, val_ptr, w_ptr, out_ptr, K, D, stride_w,
        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        md = offs_d < D
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for j0 in range(0, K, BLOCK_K):
            offs_k = j0 + tl.arange(0, BLOCK_K)
            mk = offs_k < K
            i = tl.load(idx_ptr + b * K + offs_k, mask=mk, other=0)
            v = tl.load(val_ptr + b * K + offs_k, mask=mk, other=0.0).to(tl.float32)
            w = tl.load(
                w_ptr + i[:, None] * stride_w + offs_d[None, :],
                mask=mk[:, None] & md[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(w * v[:, None], axis=0)
        tl.store(out_ptr + b * D + offs_d, acc.to(out_ptr.dtype.element_ty), mask=md)

    @triton.jit
    def row_dots_kernel(
        idx_ptr, g_ptr, w_ptr, out_ptr, K, D, stride_w,
        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mk = offs_k < K
        i = tl.load(idx_ptr + b * K + offs_k, mask=mk, other=0)
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            md = offs_d < D
            g = tl.load(g_ptr + b * D + offs_d, mask=md, other=0.0).to(tl.float32)
            w = tl.load(
                w_ptr + i[:, None] * stride_w + offs_d[None, :],
                mask=mk[:, None] & md[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(w * g[None, :], axis=1)
        tl.store(out_ptr + b * K + offs_k, acc.to(out_ptr.dtype.element_ty), mask=mk)

    @triton.jit
    def segment_sum_kernel(
        order_ptr, bounds_ptr, wt_ptr, rows_ptr, shift_ptr, out_ptr, K, D, stride_r,
        HAS_SHIFT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        n = tl.program_id(0).to(tl.int64)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        md = offs_d < D
        start = tl.load(bounds_ptr + n)
        end = tl.load(bounds_ptr + n + 1)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        wsum = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for p0 in range(start, end, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            mp = offs_p < end
            o = tl.load(order_ptr + offs_p, mask=mp, other=0)  # flat (token, slot) position
            wv = tl.load(wt_ptr + o, mask=mp, other=0.0).to(tl.float32)
            r = tl.load(
                rows_ptr + (o // K)[:, None] * stride_r + offs_d[None, :],
                mask=mp[:, None] & md[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(r * wv[:, None], axis=0)
            wsum += wv
        if HAS_SHIFT:
            s = tl.load(shift_ptr + offs_d, mask=md, other=0.0).to(tl.float32)
            acc -= tl.sum(wsum, axis=0) * s
        tl.store(out_ptr + n * D + offs_d, acc.to(out_ptr.dtype.element_ty), mask=md)

    return gather_rows_kernel, row_dots_kernel, segment_sum_kernel


def _rows(W: Tensor) -> Tensor:
    """``W`` with unit stride along its last dimension (a copy only when it has not)."""
    return W if W.stride(-1) == 1 else W.contiguous()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block(n: int, cap: int) -> int:
    """The smallest power of two >= n, at most ``cap`` and at least 16."""
    return max(16, min(cap, 1 << max(n - 1, 0).bit_length()))


def gather_rows(idx: Tensor, values: Tensor, W: Tensor, dtype: torch.dtype) -> Tensor:
    """``out[b] = sum_j values[b, j] * W[idx[b, j]]``, ``out [B, d]`` in ``dtype``."""
    B, K = idx.shape
    W = _rows(W)
    D = W.shape[1]
    out = torch.empty(B, D, dtype=dtype, device=W.device)
    if B == 0 or D == 0:
        return out
    bd, bk = _block(D, BLOCK_D), _block(K, BLOCK_K)
    _kernels()[0][(B, _cdiv(D, bd))](
        idx.contiguous(), values.contiguous(), W, out, K, D, W.stride(0),
        BLOCK_K=bk, BLOCK_D=bd,
    )  # fmt: skip
    return out


def row_dots(idx: Tensor, g: Tensor, W: Tensor, dtype: torch.dtype) -> Tensor:
    """``out[b, j] = <g[b], W[idx[b, j]]>``, ``out [B, K]`` in ``dtype``."""
    B, K = idx.shape
    W = _rows(W)
    D = W.shape[1]
    out = torch.empty(B, K, dtype=dtype, device=W.device)
    if B == 0 or K == 0:
        return out
    bd, bk = _block(D, BLOCK_D), _block(K, BLOCK_K)
    _kernels()[1][(B, _cdiv(K, bk))](
        idx.contiguous(), g.contiguous(), W, out, K, D, W.stride(0),
        BLOCK_K=bk, BLOCK_D=bd,
    )  # fmt: skip
    return out


def segment_sum(
    idx: Tensor,
    weights: Tensor,
    rows: Tensor,
    n: int,
    dtype: torch.dtype,
    shift: Tensor | None = None,
) -> Tensor:
    """``out[i] = sum_{(b, j): idx[b, j] = i} weights[b, j] * (rows[b] - shift)``, ``[n, d]``."""
    B, K = idx.shape
    rows = _rows(rows)
    D = rows.shape[1]
    flat = idx.reshape(-1)
    order = torch.argsort(flat)
    counts = torch.bincount(flat, minlength=n)
    bounds = torch.zeros(n + 1, dtype=torch.long, device=idx.device)
    torch.cumsum(counts, 0, out=bounds[1:])
    out = torch.empty(n, D, dtype=dtype, device=rows.device)
    if n == 0 or D == 0:
        return out
    bd = _block(D, BLOCK_D)
    _kernels()[2][(n, _cdiv(D, bd))](
        order, bounds, weights.contiguous(), rows,
        rows if shift is None else shift.contiguous(), out, K, D, rows.stride(0),
        HAS_SHIFT=shift is not None, BLOCK_P=BLOCK_P, BLOCK_D=bd,
    )  # fmt: skip
    return out
