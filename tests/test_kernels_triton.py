"""Triton kernels against the eager ones: values and every gradient, through the autograd
functions of :mod:`saekit.kernels`. On a CPU-only machine they run in Triton's interpreter
(``TRITON_INTERPRET=1``, set in ``conftest.py`` before anything imports the kernels)."""

from __future__ import annotations

import pytest
import torch

from saekit import kernels
from saekit import triton_kernels as tk
from saekit.errors import ConfigError, EnvironmentProblem

pytest.importorskip("triton", reason="triton is not installed (dev extra)")
if not torch.cuda.is_available() and not tk.interpreting():
    pytest.skip("no CUDA and TRITON_INTERPRET is off", allow_module_level=True)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# (B, d_in, d_sae, k): k not a power of two, d_in not a multiple of the block size
SHAPES = [(7, 40, 13, 3), (12, 24, 96, 5), (5, 40, 24, 19)]


def _params(B: int, d: int, F: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(F, d, generator=g) / d**0.5  # latent-major, as the SAE keeps it
    out = {
        "x": torch.randn(B, d, generator=g),
        "b_dec": torch.randn(d, generator=g) * 0.1,
        "W_enc": W_enc.t(),
        "b_enc": torch.randn(F, generator=g) * 0.1,
        "W_dec": torch.randn(F, d, generator=g),
        "proj": torch.randn(B, d, generator=g),
    }
    return {k: v.to(DEV) for k, v in out.items()}


def _run(base: dict, idx: torch.Tensor, centered: bool, x_grad: bool) -> tuple:
    p = {k: v.detach().clone().requires_grad_(k != "proj") for k, v in base.items()}
    p["W_enc"] = base["W_enc"].detach().t().clone().t().requires_grad_()  # keep the layout
    p["x"].requires_grad_(x_grad)
    x_in = p["x"] - p["b_dec"]
    with torch.no_grad():
        pre = torch.addmm(p["b_enc"], x_in, p["W_enc"])
    if centered:
        sel = kernels.sparse_encode_centered(p["x"], p["b_dec"], p["W_enc"], p["b_enc"], idx, pre)
    else:
        sel = kernels.sparse_encode(x_in, p["W_enc"], p["b_enc"], idx, pre)
    vals = torch.relu(sel)
    vals.retain_grad()
    out = kernels.sparse_decode(idx, vals, p["W_dec"])
    (out * p["proj"]).sum().backward()
    grads = {k: v.grad for k, v in p.items() if v.requires_grad}
    grads["values"] = vals.grad
    return out.detach(), grads


@pytest.fixture(params=["default", "small"])
def blocks(request, monkeypatch) -> None:
    """Default block sizes, and 16-wide blocks so that every loop has a partial block."""
    if request.param == "small":
        for name in ("BLOCK_D", "BLOCK_K", "BLOCK_P"):
            monkeypatch.setattr(tk, name, 16)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("x_grad", [True, False])
def test_triton_equals_eager(shape, centered, x_grad, blocks, monkeypatch) -> None:
    B, d, F, k = shape
    base = _params(B, d, F, seed=B * k)
    pre = (base["x"] - base["b_dec"]) @ base["W_enc"] + base["b_enc"]
    idx = pre.topk(k, dim=1, sorted=False).indices
    idx[0, : min(k, 3)] = torch.arange(min(k, 3), device=DEV)  # a popular latent...
    idx[1:, 0] = 0  # ...in several rows (long segment), while others are empty
    monkeypatch.setenv(tk.ENV, "eager")
    ref_out, ref_g = _run(base, idx, centered, x_grad)
    monkeypatch.setenv(tk.ENV, "triton")
    assert kernels._triton(base["x"])
    out, g = _run(base, idx, centered, x_grad)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert set(g) == set(ref_g) and "values" in g and ("x" in g) == x_grad
    for name, r in ref_g.items():
        assert g[name].shape == r.shape and g[name].dtype == r.dtype, name
        # fp32 sums in another order: absolute tolerance relative to the largest entry
        atol = 1e-6 * max(1.0, float(r.abs().max()))
        torch.testing.assert_close(g[name], r, rtol=1e-5, atol=atol, msg=name)
    assert g["W_enc"].stride() == ref_g["W_enc"].stride()  # latent-major, no copy


def test_segment_sum_repeats_empty_latents_and_shift(monkeypatch) -> None:
    monkeypatch.setattr(tk, "BLOCK_P", 16)
    idx = torch.tensor([[0, 0, 3], [3, 1, 3]] * 9, device=DEV)  # latent 3: 27 pairs
    w = torch.randn(idx.shape, device=DEV)
    rows = torch.randn(idx.shape[0], 5, device=DEV)
    shift = torch.randn(5, device=DEV)
    out = tk.segment_sum(idx, w, rows, 6, torch.float32, shift=shift)
    contrib = (w[..., None] * (rows - shift)[:, None]).reshape(-1, 5)
    ref = torch.zeros(6, 5, device=DEV).index_add_(0, idx.reshape(-1), contrib)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out[2].abs().sum() == 0 and out[4:].abs().sum() == 0


def test_mixed_dtypes_accumulate_in_fp32(monkeypatch) -> None:
    """bf16 values and gradients with fp32 weights: outputs in the eager kernels' dtypes."""
    B, d, F, k = 6, 20, 30, 5
    base = _params(B, d, F, seed=1)
    idx = torch.randint(0, F, (B, k), device=DEV)
    v = torch.rand(B, k, device=DEV).bfloat16()
    res = {}
    for mode in ("eager", "triton"):
        monkeypatch.setenv(tk.ENV, mode)
        vv = v.clone().requires_grad_()
        W = base["W_dec"].clone().requires_grad_()
        out = kernels.sparse_decode(idx, vv, W)
        out.backward(base["proj"])
        res[mode] = (out, vv.grad, W.grad)
    for a, b in zip(res["triton"], res["eager"]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)


def test_sae_step_equal_under_both_backends(monkeypatch) -> None:
    """A whole SAE loss (TopK + aux-k on dead latents): same loss and parameter gradients."""
    from saekit import SAE, SAEConfig

    x = torch.randn(24, 20, device=DEV)
    torch.manual_seed(0)
    ref = SAE(SAEConfig(d_in=20, d_sae=48, k=5, aux_k=7, dead_tokens=1)).to(DEV).train()
    ref.init_from_data(x)
    ref.observe(ref.encode(x[:1]), 30)  # most latents dead: the aux-k loss runs
    got = {}
    for mode in ("eager", "triton"):
        monkeypatch.setenv(tk.ENV, mode)
        ref.zero_grad(set_to_none=True)
        loss, terms, _ = ref.loss(x)
        assert "aux" in terms and float(terms["aux"]) > 0
        loss.backward()
        got[mode] = (loss.detach(), {n: p.grad.clone() for n, p in ref.named_parameters()})
    torch.testing.assert_close(got["triton"][0], got["eager"][0], rtol=1e-5, atol=1e-6)
    for n, gr in got["eager"][1].items():
        torch.testing.assert_close(got["triton"][1][n], gr, rtol=1e-4, atol=1e-6, msg=n)


def test_backend_choice(monkeypatch) -> None:
    monkeypatch.delenv(tk.ENV, raising=False)
    assert tk.backend("cpu") == "eager"
    assert tk.backend("cuda") == "triton"  # auto: Triton on CUDA (installed here)
    monkeypatch.setenv(tk.ENV, "eager")
    assert tk.backend("cuda") == "eager"
    monkeypatch.setenv(tk.ENV, "triton")
    assert tk.backend("cpu") == ("triton" if tk.interpreting() else "eager")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(EnvironmentProblem, match="TRITON_INTERPRET"):
        tk.backend("cpu")
    monkeypatch.setenv(tk.ENV, "fast")
    with pytest.raises(ConfigError, match="SAEKIT_KERNELS"):
        tk.backend("cpu")
