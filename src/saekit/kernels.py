"""Sparse kernels for codes with k << d_sae active latents per token.

``sparse_encode`` gathers selected pre-activations ``x_in @ W_enc[:, idx] + b_enc[idx]``
from an already-computed (no-grad) dense ``pre`` and, in backward, produces the gradients
of ``W_enc``, ``b_enc`` and ``x_in`` with index-adds of k rows per token: O(B*k*d_in),
never the dense B x d_sae gradient. ``sparse_decode`` is ``sum_j v_j W_dec[idx_j]``
(embedding_bag) with an equally sparse backward. Both have dense references in the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _SparseEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_in: Tensor, W_enc: Tensor, b_enc: Tensor, idx: Tensor, pre: Tensor):
        ctx.save_for_backward(x_in, W_enc, idx)
        ctx.d_sae = W_enc.shape[1]
        return pre.gather(1, idx)

    @staticmethod
    def backward(ctx, g: Tensor):
        x_in, W_enc, idx = ctx.saved_tensors
        B, K = idx.shape
        flat = idx.reshape(-1)
        gx = gW = gb = None
        if ctx.needs_input_grad[0]:
            # grad_x[b] = sum_j g[b, j] * W_enc[:, idx[b, j]]
            gx = F.embedding_bag(
                idx, W_enc.t(), per_sample_weights=g.to(W_enc.dtype), mode="sum"
            ).to(x_in.dtype)
        if ctx.needs_input_grad[1]:
            # grad_W_enc[:, i] = sum over (b, j) with idx[b, j] = i of g[b, j] * x_in[b]
            rows = (x_in.unsqueeze(1) * g.unsqueeze(2)).reshape(B * K, -1)
            gWt = torch.zeros(ctx.d_sae, x_in.shape[1], dtype=W_enc.dtype, device=g.device)
            gWt.index_add_(0, flat, rows.to(W_enc.dtype))
            gW = gWt.t()
        if ctx.needs_input_grad[2]:
            gb = torch.zeros(ctx.d_sae, dtype=W_enc.dtype, device=g.device)
            gb.index_add_(0, flat, g.reshape(-1).to(W_enc.dtype))
        return gx, gW, gb, None, None


def sparse_encode(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, idx: Tensor, pre: Tensor) -> Tensor:
    """Selected pre-activations ``pre[b, idx[b, j]]`` with sparse gradients.

    ``pre`` must equal ``x_in @ W_enc + b_enc`` (computed without grad by the caller).
    """
    if not torch.is_grad_enabled() or not (
        x_in.requires_grad or W_enc.requires_grad or b_enc.requires_grad
    ):
        return pre.gather(1, idx)
    return _SparseEncode.apply(x_in, W_enc, b_enc, idx, pre.detach())


def sparse_decode(idx: Tensor, values: Tensor, W_dec: Tensor) -> Tensor:
    """``out[b] = sum_j values[b, j] * W_dec[idx[b, j]]`` (no bias), sparse backward."""
    if idx.shape[1] == 0:
        return values.new_zeros(idx.shape[0], W_dec.shape[1])
    return F.embedding_bag(idx, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")


def dense_decode(codes: Tensor, W_dec: Tensor) -> Tensor:
    return codes @ W_dec
