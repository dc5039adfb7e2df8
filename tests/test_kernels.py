"""Sparse kernels vs dense references: outputs and every gradient."""

from __future__ import annotations

import pytest
import torch

from saekit import kernels

SHAPES = [(7, 5, 13, 3), (16, 12, 40, 5), (33, 24, 96, 7), (64, 16, 64, 64)]  # B, d, F, k


def _params(B: int, d: int, F: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(B, d, generator=g),
        "b_dec": torch.randn(d, generator=g) * 0.1,
        "W_enc": torch.randn(d, F, generator=g) / d**0.5,
        "b_enc": torch.randn(F, generator=g) * 0.1,
        "W_dec": torch.randn(F, d, generator=g),
        "proj": torch.randn(B, d, generator=g),
    }


def _leaves(p: dict[str, torch.Tensor], x_grad: bool) -> dict[str, torch.Tensor]:
    out = {k: v.clone().requires_grad_(k != "proj") for k, v in p.items()}
    out["x"].requires_grad_(x_grad)
    return out


def _run(p: dict[str, torch.Tensor], idx: torch.Tensor, mode: str) -> tuple:
    """Encode -> ReLU -> decode, loss = <x_hat, proj>; returns output and gradients."""
    x_in = p["x"] - p["b_dec"]
    if mode == "dense":
        pre = x_in @ p["W_enc"] + p["b_enc"]
        sel = pre.gather(1, idx)
    else:
        with torch.no_grad():
            pre = torch.addmm(p["b_enc"], x_in, p["W_enc"])
        if mode == "sparse":
            sel = kernels.sparse_encode(x_in, p["W_enc"], p["b_enc"], idx, pre)
        else:
            sel = kernels.sparse_encode_centered(
                p["x"], p["b_dec"], p["W_enc"], p["b_enc"], idx, pre
            )
    vals = torch.relu(sel)
    vals.retain_grad()
    if mode == "dense":
        codes = torch.zeros(idx.shape[0], p["W_dec"].shape[0]).scatter_add(1, idx, vals)
        out = codes @ p["W_dec"]
    else:
        out = kernels.sparse_decode(idx, vals, p["W_dec"])
    (out * p["proj"]).sum().backward()
    grads = {k: v.grad for k, v in p.items() if v.requires_grad}
    grads["values"] = vals.grad
    return out.detach(), grads


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["sparse", "centered"])
@pytest.mark.parametrize("x_grad", [True, False])
def test_sparse_matches_dense(shape: tuple, mode: str, x_grad: bool) -> None:
    B, d, F, k = shape
    base = _params(B, d, F, seed=B + k)
    pre = (base["x"] - base["b_dec"]) @ base["W_enc"] + base["b_enc"]
    idx = pre.topk(k, dim=1, sorted=False).indices  # distinct per row by construction
    ref_out, ref_g = _run(_leaves(base, x_grad), idx, "dense")
    out, g = _run(_leaves(base, x_grad), idx, mode)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert set(g) == set(ref_g)
    names = {"W_enc", "b_enc", "W_dec", "b_dec", "values"} | ({"x"} if x_grad else set())
    assert names <= set(g)
    for name in ref_g:
        assert g[name] is not None, name
        assert g[name].shape == ref_g[name].shape, name
        assert g[name].is_contiguous() or name == "W_enc", name
        torch.testing.assert_close(g[name], ref_g[name], rtol=1e-4, atol=1e-5, msg=name)


def test_segment_sum_handles_repeats_and_empty_latents() -> None:
    idx = torch.tensor([[0, 0, 3], [3, 1, 3]])  # repeats; latent 2 unused
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    rows = torch.tensor([[1.0, 10.0], [100.0, 1000.0]])
    out = kernels.segment_sum(rows, w, kernels.segments(idx, 5), torch.float32)
    contrib = (w[..., None] * rows[:, None]).view(-1, 2)
    ref = torch.zeros(5, 2).index_add_(0, idx.reshape(-1), contrib)
    torch.testing.assert_close(out, ref)
    assert out[2].abs().sum() == 0 and out[4].abs().sum() == 0


def test_no_grad_paths_and_empty_codes() -> None:
    p = _params(4, 6, 10, seed=1)
    pre = p["x"] @ p["W_enc"] + p["b_enc"]
    idx = pre.topk(3, dim=1).indices
    with torch.no_grad():
        v = kernels.sparse_encode(p["x"], p["W_enc"], p["b_enc"], idx, pre)
    torch.testing.assert_close(v, pre.gather(1, idx))
    empty = kernels.sparse_decode(idx[:, :0], v[:, :0], p["W_dec"])
    assert empty.shape == (4, 6) and empty.abs().sum() == 0


def test_bf16_autocast_gives_fp32_master_grads() -> None:
    B, d, F, k = 8, 16, 48, 5
    base = _params(B, d, F, seed=3)
    idx = ((base["x"] - base["b_dec"]) @ base["W_enc"]).topk(k, dim=1).indices
    _, ref = _run(_leaves(base, False), idx, "dense")
    p = _leaves(base, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_in = p["x"] - p["b_dec"]
        with torch.no_grad():
            pre = torch.addmm(p["b_enc"], x_in, p["W_enc"])
        assert pre.dtype == torch.bfloat16
        sel = kernels.sparse_encode_centered(p["x"], p["b_dec"], p["W_enc"], p["b_enc"], idx, pre)
        out = kernels.sparse_decode(idx, torch.relu(sel), p["W_dec"])
    (out.float() * p["proj"]).sum().backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        gr = p[name].grad
        assert gr is not None and gr.dtype == torch.float32, name
        err = (gr - ref[name]).norm() / ref[name].norm()
        assert err < 0.05, (name, float(err))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CPU-only machine)")
def test_cuda_matches_cpu() -> None:
    B, d, F, k = 64, 32, 256, 9
    base = _params(B, d, F, seed=5)
    idx = ((base["x"] - base["b_dec"]) @ base["W_enc"]).topk(k, dim=1).indices
    out_c, g_c = _run(_leaves(base, True), idx, "sparse")
    cuda = {k: v.cuda() for k, v in base.items()}
    out_g, g_g = _run(_leaves(cuda, True), idx.cuda(), "sparse")
    torch.testing.assert_close(out_g.cpu(), out_c, rtol=1e-4, atol=1e-4)
    for name in g_c:
        torch.testing.assert_close(g_g[name].cpu(), g_c[name], rtol=1e-4, atol=1e-4, msg=name)


def _sae_grads(sae, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    sae.zero_grad(set_to_none=True)
    loss, _, out = sae.loss(x)
    loss.backward()
    return out.x_hat.detach(), {n: p.grad.clone() for n, p in sae.named_parameters()}


def test_sae_encoder_layout_and_buffer_reuse_keep_results() -> None:
    import copy

    from saekit import SAE, SAEConfig

    x = torch.randn(40, 12)
    sae = SAE(SAEConfig(d_in=12, d_sae=48, k=5, init_b_dec="mean")).train()
    sae.init_from_data(x)
    assert sae.W_enc.shape == (12, 48) and sae.W_enc.stride() == (1, 12)  # latent-major
    plain = copy.deepcopy(sae)
    plain.W_enc = torch.nn.Parameter(sae.W_enc.detach().contiguous())  # row-major copy
    ref_out, ref_g = _sae_grads(plain, x)
    assert not sae.reuse_buffers  # off by default
    sae.reuse_buffers = True
    for _ in range(2):  # second call reuses the first call's buffer
        out, g = _sae_grads(sae, x)
        torch.testing.assert_close(out, ref_out)
        for name in ref_g:
            torch.testing.assert_close(g[name], ref_g[name], msg=name)
    assert sae.W_enc.grad is not None and sae.W_enc.grad.stride() == (1, 12)  # no copy
    buf = sae._pre_buf
    assert buf is not None
    _, _, o = sae.loss(x)
    assert o.pre.data_ptr() == buf.data_ptr()
    _, _, o = sae.loss(x[:7])  # another batch size: a new buffer of the right shape
    assert o.pre.shape == (7, 48)
    sae.reuse_buffers = False
    _, _, o = sae.loss(x)
    assert sae._pre_buf is None and o.pre.data_ptr() != buf.data_ptr()
