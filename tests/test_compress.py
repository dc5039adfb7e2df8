"""Low-rank compression maths: SVD, ASVD, SVD-LLM, SAES-SVD factorisations (saekit.compress)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from compress_helpers import data as _data
from saekit.compress import (
    METHODS,
    CompressConfig,
    IllConditionedError,
    LowRankLinear,
    asvd_factor,
    cealc_objective,
    rank_for_ratio,
    saes_factor,
    svd_factor,
    svdllm_factor,
    svdllm_update_u,
)
from saekit.compress.factor import ridge_value, saves_params


def _factor(method: str, W: torch.Tensor, X: torch.Tensor, r: int, **kw):
    H = X @ X.T / X.shape[1]
    if method == "svd":
        return svd_factor(W, r)
    if method == "asvd":
        return asvd_factor(W, X.abs().mean(1), r)
    if method == "svdllm":
        return svdllm_factor(W, H, r, **kw)
    A, B, _ = saes_factor(W, H, None, r, beta="aces", **kw)
    return A, B


def test_rank_formula():
    assert rank_for_ratio(128, 512, 0.4) == math.floor(128 * 512 * 0.6 / 640) == 61
    assert rank_for_ratio(4, 4, 0.99) == 1
    with pytest.raises(ValueError, match="ratio"):
        rank_for_ratio(4, 4, 1.0)


def test_layers_whose_factors_save_nothing_stay_dense():
    """A rank whose factors hold at least m·n parameters saves nothing (ratio 0's full rank
    included: ``test_compress_regressions.py``)."""
    assert not saves_params(32, 32, 32) and not saves_params(32, 32, 16)
    assert saves_params(32, 32, 15)


@pytest.mark.parametrize("method", METHODS)
def test_full_rank_reproduces_weight(method):
    W, X = _data(12, 8, 200, 0)
    A, B = _factor(method, W, X, 8, ridge=0.0)
    assert A.shape == (12, 8) and B.shape == (8, 8)
    torch.testing.assert_close(A @ B, W, rtol=1e-8, atol=1e-8)


def test_saes_full_rank_with_delta_targets_fp_outputs():
    """At full rank and β > 0 SAES-SVD gives AB = W(H + βΔ)H⁻¹ (not W): it shifts towards W X_f."""
    W, X = _data(10, 6, 100, 1)
    Xf = X + 0.1 * torch.randn_like(X)
    H, D = X @ X.T / 100, (Xf - X) @ X.T / 100
    A, B, info = saes_factor(W, H, D, 6, beta=0.5, ridge=0.0)
    assert info.beta == 0.5
    torch.testing.assert_close(A @ B, W @ (H + 0.5 * D) @ torch.linalg.inv(H))


@pytest.mark.parametrize("seed", range(6))
def test_svdllm_output_error_never_above_svd(seed):
    m, n = [(16, 12), (12, 16), (20, 20), (8, 24), (24, 8), (16, 16)][seed]
    W, X = _data(m, n, 3 * n, seed)
    for r in (1, min(m, n) // 2, min(m, n) - 1):
        As, Bs = svd_factor(W, r)
        Al, Bl = svdllm_factor(W, X @ X.T, r, ridge=0.0)
        err_svd = torch.linalg.norm((W - As @ Bs) @ X)
        err_llm = torch.linalg.norm((W - Al @ Bl) @ X)
        assert err_llm <= err_svd * (1 + 1e-10)
        Ad, Bd = svdllm_factor(W, X @ X.T, r)  # default small ridge: still not worse
        assert torch.linalg.norm((W - Ad @ Bd) @ X) <= err_svd * (1 + 1e-6)
    # and it is strictly better on anisotropic data at half rank
    r = min(m, n) // 2
    As, Bs = svd_factor(W, r)
    Al, Bl = svdllm_factor(W, X @ X.T, r, ridge=0.0)
    assert torch.linalg.norm((W - Al @ Bl) @ X) < 0.99 * torch.linalg.norm((W - As @ Bs) @ X)


def test_asvd_scaling_differs_from_svd_and_helps_scaled_channels():
    W, X = _data(16, 12, 300, 3)
    X = X.abs().mean(1, keepdim=True).reciprocal() * X  # equalise, then scale few channels up
    X[:3] *= 50
    r = 4
    As, Bs = svd_factor(W, r)
    Aa, Ba = asvd_factor(W, X.abs().mean(1), r, alpha=0.5)
    assert torch.linalg.norm((W - Aa @ Ba) @ X) < torch.linalg.norm((W - As @ Bs) @ X)
    with pytest.raises(ValueError, match="abs_mean"):
        asvd_factor(W, torch.ones(5), r)


def test_saes_beta_zero_equals_svdllm():
    W, X = _data(14, 10, 80, 4)
    Xf = X + 0.3 * torch.randn_like(X)
    H, D = X @ X.T / 80, (Xf - X) @ X.T / 80
    Al, Bl = svdllm_factor(W, H, 5)
    As, Bs, info = saes_factor(W, H, D, 5, beta=0.0)
    torch.testing.assert_close(As, Al)
    torch.testing.assert_close(Bs, Bl)
    assert info.beta == 0.0


def test_saes_beta_reduces_error_against_fp_outputs():
    """With β near 1 the CEALC target is W X_f: the error to the FP outputs drops vs β = 0."""
    W, X = _data(14, 10, 400, 5)
    Xf = X + 0.5 * torch.randn_like(X)
    H, D = X @ X.T / 400, (Xf - X) @ X.T / 400
    errs = []
    for beta in (0.0, 0.9):
        A, B, _ = saes_factor(W, H, D, 5, beta=beta)
        errs.append(float(torch.linalg.norm(A @ B @ X - W @ Xf)))
    assert errs[1] < errs[0]


def test_cholesky_failure_names_ridge():
    W, X = _data(8, 12, 5, 6)  # 5 samples, 12 inputs: H has rank 5
    H = X @ X.T
    with pytest.raises(IllConditionedError, match="ridge") as ei:
        svdllm_factor(W, H, 3, ridge=0.0, name="blk.0.q")
    assert isinstance(ei.value, ValueError)
    assert "blk.0.q" in str(ei.value) and "--ridge" in str(ei.value)
    fix = ei.value.ridge
    assert 0 < fix <= 1
    A, B = svdllm_factor(W, H, 3, ridge=fix)  # the suggested ridge works
    assert torch.isfinite(A @ B).all()
    A2, B2, info = saes_factor(W, H, None, 3, beta=0.0, ridge=0.0, auto_ridge=True)
    assert info.ridge == fix
    torch.testing.assert_close(A2 @ B2, A @ B)


def test_lowrank_linear_matches_dense():
    lin = nn.Linear(6, 5)
    A, B = svd_factor(lin.weight.detach(), 5)
    low = LowRankLinear.from_factors(A, B, lin.bias.detach(), lin.weight)
    x = torch.randn(3, 2, 6)
    torch.testing.assert_close(low(x), lin(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(6, 5, 6)


def test_ridge_term_is_one_plus_alpha_lambda():
    """With H + λI used everywhere, the full-rank SAES-SVD solution is the exact minimiser of
    J + (1+α)λ‖AB − W‖² (not J + λ‖AB − W‖², as the docstring said)."""
    W, X = _data(7, 5, 40, 8)
    Xf = X + 0.4 * torch.randn(X.shape, generator=torch.Generator().manual_seed(3), dtype=X.dtype)
    H, D, Hf = X @ X.T, (Xf - X) @ X.T, Xf @ Xf.T
    beta, ridge = 0.6, 1e-2
    A, B, _ = saes_factor(W, H, D, 5, beta=beta, ridge=ridge)
    lam = ridge_value(H, ridge)
    AB = A @ B

    def obj(M, scale):
        return cealc_objective(M, W, H, D, beta, Hf, ridge_abs=lam * scale)

    g = torch.Generator().manual_seed(0)
    eps = 1e-4
    for _ in range(5):
        P = torch.randn(AB.shape, generator=g, dtype=AB.dtype)
        # the solution is a minimum of the (1+α)λ form: no direction decreases it ...
        assert obj(AB + eps * P, 1.0) >= obj(AB, 1.0) - 1e-9
        assert obj(AB - eps * P, 1.0) >= obj(AB, 1.0) - 1e-9
    # ... and its gradient is zero there, while the λ-only form has a non-zero gradient
    Mt = AB.clone().requires_grad_(True)
    alpha = beta / (1 - beta)
    E = Mt - W
    J = ((E @ H) * E).sum() + alpha * (
        ((Mt @ H) * Mt).sum() - 2 * ((W @ (H + D)) * Mt).sum() + ((W @ Hf) * W).sum()
    )
    for scale, zero in ((1 + alpha, True), (1.0, False)):
        (grad,) = torch.autograd.grad(J + scale * lam * (E * E).sum(), Mt, retain_graph=True)
        assert (float(grad.abs().max()) < 1e-6 * float(H.abs().max())) == zero
    assert math.isclose(obj(AB, 1.0), float(J + (1 + alpha) * lam * (E * E).sum()), rel_tol=1e-9)


def test_svdllm_update_u_is_the_least_squares_refit():
    """SVD-LLM's U update: with B fixed, A = argmin ‖(AB − W)X‖ (checked against lstsq on X),
    and it never increases the error on those inputs."""
    W, X = _data(12, 10, 200, 9)
    Xc = X + 0.3 * torch.randn(X.shape, generator=torch.Generator().manual_seed(2), dtype=X.dtype)
    A, B = svdllm_factor(W, X @ X.T, 4)  # whitened on X, refit on the shifted inputs Xc
    A2 = svdllm_update_u(W, B, Xc @ Xc.T, ridge=0.0)
    ref = torch.linalg.lstsq((B @ Xc).T, (W @ Xc).T).solution.T
    torch.testing.assert_close(A2, ref, rtol=1e-7, atol=1e-9)
    err = lambda M: float(torch.linalg.norm((M @ B - W) @ Xc))  # noqa: E731
    assert err(A2) < err(A)


def test_config_errors():
    with pytest.raises(ValueError, match="method"):
        CompressConfig(method="lora")
    with pytest.raises(ValueError, match="β"):
        CompressConfig(beta="1.5")
    with pytest.raises(ValueError, match="sequential"):
        CompressConfig(method="saes", sequential="false")
    with pytest.raises(ValueError, match="update_u"):
        CompressConfig(method="saes", update_u=True)
    with pytest.raises(ValueError, match="ratio_mlp"):
        CompressConfig(ratio_mlp=1.2)
    c = CompressConfig(ratio=0.3, ratio_attn=0.1)
    assert c.ratio_for("attn") == 0.1 and c.ratio_for("mlp") == 0.3
