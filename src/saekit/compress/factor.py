"""Closed-form low-rank factorisations of one weight matrix: SVD, ASVD, SVD-LLM, SAES-SVD.

Conventions: ``W`` is ``[m, n]`` (``out x in``, the ``nn.Linear`` layout) and acts on column
inputs ``x`` of size ``n``. Statistics come from calibration inputs stacked as columns of ``X``
(``[n, N]``): ``H = X Xᵀ`` and, for SAES-SVD, ``Δ = (X_f − X) Xᵀ`` where ``X_f`` are the inputs
the full-precision model sees. Every method returns ``A [m, r]`` and ``B [r, n]`` with
``W ≈ A B``; the singular values are split evenly, ``A = U_r S_r^½`` and ``B = S_r^½ V_rᵀ ...``.
All maths runs in float64; callers cast the factors back to the model dtype.

Ridge: SVD-LLM and SAES-SVD factor ``H + λI = L Lᵀ`` and use ``H + λI`` in place of ``H``
everywhere (also inside ``G(β)``). For the CEALC objective
``J = ‖(AB − W)X‖² + α‖ABX − W X_f‖²`` (``β = α/(1+α)``) this is the exact minimiser of
``J + (1+α)·λ·‖AB − W‖²_F`` (see :func:`cealc_objective`); with this choice SAES-SVD at
``β = 0`` is *exactly* SVD-LLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from saekit.compress.aces import AcesResult, aces_beta, grid_beta, retained_energy
from saekit.errors import ConfigError, DataError


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """Rank ``r = ⌊m n (1 − ratio) / (m + n)⌋`` (ratio = fraction of the layer's parameters
    removed), clipped to ``[1, min(m, n)]``; ``ratio = 0`` gives ``min(m, n)`` (no
    truncation: the layer stays dense, see :func:`saves_params`)."""
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"ratio is the fraction of parameters removed, in [0, 1); got {ratio}")
    if ratio == 0.0:
        return min(m, n)
    r = math.floor(m * n * (1.0 - ratio) / (m + n))
    return max(1, min(r, m, n))


def saves_params(m: int, n: int, r: int) -> bool:
    """Whether rank-r factors (``r(m + n)`` parameters) are smaller than the dense ``m n``
    weight; layers where they are not stay dense [our choice]."""
    return r * (m + n) < m * n


def _check_rank(W: Tensor, r: int) -> None:
    if W.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(W.shape)}")
    if not 1 <= r <= min(W.shape):
        raise ValueError(
            f"rank must be in [1, {min(W.shape)}] for a {tuple(W.shape)} weight, got {r}"
        )


def _split(U: Tensor, S: Tensor, Vh: Tensor, r: int) -> tuple[Tensor, Tensor]:
    s = S[:r].clamp_min(0).sqrt()
    return U[:, :r] * s, s[:, None] * Vh[:r]


def svd_factor(W: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Plain truncated SVD of ``W`` (Eckart-Young optimal in Frobenius norm, data-free)."""
    _check_rank(W, r)
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return _split(U, S, Vh, r)


def asvd_factor(
    W: Tensor, abs_mean: Tensor, r: int, alpha: float = 0.5, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """ASVD: truncated SVD of ``W S`` with ``S_jj = (mean|x_j|)^alpha``, then ``B ← B S⁻¹``.

    ``abs_mean`` is the per-input-channel mean absolute activation (``[n]``). Channels whose
    scale is below ``eps`` times the largest are floored there so ``S`` stays invertible.
    """
    _check_rank(W, r)
    if abs_mean.shape != (W.shape[1],):
        raise ValueError(f"abs_mean must have shape ({W.shape[1]},), got {tuple(abs_mean.shape)}")
    s = abs_mean.double().clamp_min(0) ** alpha
    s = s.clamp_min(eps * float(s.max().clamp_min(1e-300)))
    U, S, Vh = torch.linalg.svd(W.double() * s, full_matrices=False)
    A, B = _split(U, S, Vh, r)
    return A, B / s


class IllConditionedError(ValueError):
    """Cholesky of ``H + λI`` failed; ``.ridge`` is a λ that makes it succeed."""

    def __init__(self, msg: str, ridge: float) -> None:
        super().__init__(msg)
        self.ridge = ridge


def ridge_value(H: Tensor, ridge: float) -> float:
    """Absolute ridge ``λ = ridge · mean(diag H)`` (``ridge`` is relative to input power)."""
    return float(ridge) * float(H.diagonal().mean().clamp_min(1e-300))


def cholesky(
    H: Tensor, ridge: float = 1e-6, auto_ridge: bool = False, name: str = ""
) -> tuple[Tensor, float]:
    """Lower Cholesky factor ``L`` of ``H + λI`` with ``λ = ridge · mean(diag H)``.

    On failure, raises :class:`IllConditionedError` naming the smallest relative ridge in
    ``{1e-8, 1e-7, ..., 1}`` that works, or (``auto_ridge=True``) uses that ridge and
    returns it. Returns ``(L, relative ridge used)``.
    """
    H = H.double()
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be square, got shape {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise DataError(f"H{f' of {name}' if name else ''} has non-finite entries")
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    L, info = torch.linalg.cholesky_ex(H + ridge_value(H, ridge) * eye)
    if int(info) == 0:
        return L, ridge
    fix = None
    for k in range(-8, 1):
        cand = 10.0**k
        if cand <= ridge:
            continue
        L2, info2 = torch.linalg.cholesky_ex(H + ridge_value(H, cand) * eye)
        if int(info2) == 0:
            fix = cand
            break
    if fix is None:
        raise IllConditionedError(
            f"Cholesky of H{f' for {name}' if name else ''} failed even with ridge 1.0; "
            "the calibration inputs are degenerate (all zero?)",
            ridge=float("nan"),
        )
    if auto_ridge:
        return L2, fix
    where = f" for layer {name}" if name else ""
    raise IllConditionedError(
        f"H = XXᵀ{where} is not positive definite (ill-conditioned; too few calibration "
        f"tokens or dead input channels): Cholesky of H + λI failed with relative ridge "
        f"{ridge:g}. A relative ridge of {fix:g} (λ = {ridge_value(H, fix):.3g}) fixes it: "
        f"pass ridge={fix:g} (CLI --ridge {fix:g}) or auto_ridge=True (CLI --auto-ridge true).",
        ridge=fix,
    )


def _solve_right_LT(M: Tensor, L: Tensor) -> Tensor:
    """``M L⁻ᵀ`` for lower-triangular ``L``."""
    return torch.linalg.solve_triangular(L, M.T, upper=False).T


def _solve_right_Linv(M: Tensor, L: Tensor) -> Tensor:
    """``M L⁻¹`` for lower-triangular ``L``."""
    return torch.linalg.solve_triangular(L.T, M.T, upper=True).T


def svdllm_factor(
    W: Tensor, H: Tensor, r: int, ridge: float = 1e-6, auto_ridge: bool = False, name: str = ""
) -> tuple[Tensor, Tensor]:
    """SVD-LLM truncation-aware whitening: ``H + λI = L Lᵀ``, ``W L = U S Vᵀ``,
    ``A = U_r S_r^½``, ``B = S_r^½ V_rᵀ L⁻¹`` (minimises ``‖(W − AB) X‖_F`` at ``λ = 0``)."""
    return saes_factor(W, H, None, r, beta=0.0, ridge=ridge, auto_ridge=auto_ridge, name=name)[:2]


def svdllm_update_u(W: Tensor, B: Tensor, H: Tensor, ridge: float = 1e-6) -> Tensor:
    """SVD-LLM's closed-form update of ``U`` (its repository's "whitening + update" step).

    With ``B`` fixed, ``A = argmin ‖(AB − W) X‖²_F = W H Bᵀ (B H Bᵀ)⁻¹`` where ``H = X Xᵀ`` are
    the inputs the layer sees *in the already-compressed model* (the repository solves the
    same least squares with ``lstsq`` on the stacked inputs). ``ridge`` (relative to the mean
    diagonal of ``B H Bᵀ``) keeps the solve defined for rank-deficient inputs.
    """
    Wd, Bd, Hd = W.double(), B.double(), H.double()
    M = Bd @ Hd @ Bd.T
    M = M + ridge_value(M, ridge) * torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    rhs = Wd @ Hd @ Bd.T  # [m, r]
    return torch.linalg.solve(M, rhs.T).T


def cealc_objective(
    AB: Tensor,
    W: Tensor,
    H: Tensor,
    delta: Tensor | None,
    beta: float,
    Hf: Tensor | None = None,
    ridge_abs: float = 0.0,
) -> float:
    """``J + (1+α)·λ·‖AB − W‖²`` with ``J = ‖(AB − W)X‖² + α‖ABX − W X_f‖²``, ``α = β/(1−β)``.

    From second moments: ``H = XXᵀ``, ``Δ = (X_f − X)Xᵀ``, ``H_f = X_f X_fᵀ`` (needed for the
    constant part only; ``None`` drops that constant). ``ridge_abs`` is the absolute λ.
    The SAES-SVD factors at full rank minimise this exactly.
    """
    alpha = beta / (1.0 - beta)
    E = AB.double() - W.double()
    Hd = H.double()
    J = float(((E @ Hd) * E).sum())
    if alpha:
        D = torch.zeros_like(Hd) if delta is None else delta.double()
        ABd, Wd = AB.double(), W.double()
        # ‖ABX − WX_f‖² = tr(AB H ABᵀ) − 2 tr(W (H + Δ) ABᵀ) + tr(W H_f Wᵀ)
        val = float(((ABd @ Hd) * ABd).sum()) - 2 * float(((Wd @ (Hd + D)) * ABd).sum())
        if Hf is not None:
            val += float(((Wd @ Hf.double()) * Wd).sum())
        J += alpha * val
    return J + (1.0 + alpha) * ridge_abs * float((E * E).sum())


@dataclass
class SaesInfo:
    """What SAES-SVD chose for one layer (``aces`` is set when β came from ACES)."""

    beta: float
    rho: float  # exact retained-energy ratio ρ(β) of G(β) at rank r
    rho0: float  # ρ(0)
    ridge: float  # relative ridge used
    aces: AcesResult | None = None
    beta_grid: float | None = None  # grid-search β (when checked)
    rho_grid: float | None = None  # ρ at the grid β


def saes_factor(
    W: Tensor,
    H: Tensor,
    delta: Tensor | None,
    r: int,
    beta: float | str = "aces",
    ridge: float = 1e-6,
    auto_ridge: bool = False,
    beta_max: float = 0.9,
    shrink: float = 1.0,
    grid: int = 0,
    aces_method: str = "exact",
    name: str = "",
) -> tuple[Tensor, Tensor, SaesInfo]:
    """SAES-SVD (CEALC closed form): ``G(β) = W(H + λI + βΔ)L⁻ᵀ``, ``U_r S_r V_rᵀ =
    TruncSVD_r(G)``, ``A = U_r S_r^½``, ``B = S_r^½ V_rᵀ L⁻¹``.

    ``beta``: a number in ``[0, 1)`` fixes β; ``"aces"`` maximises the exact ρ(β) on
    ``[0, beta_max]`` (:func:`~saekit.compress.aces.aces_beta`, ``aces_method``, then
    ``β ← shrink·β``); ``"grid"`` takes the best of ``grid`` (default 21) evenly spaced β.
    With ``grid > 0`` and ``beta="aces"`` the grid is also evaluated and reported in the
    returned :class:`SaesInfo` as a check. Without Δ (``delta=None``) β is 0: SVD-LLM.
    """
    _check_rank(W, r)
    n = W.shape[1]
    if H.shape != (n, n):
        raise ValueError(f"H must be [{n}, {n}] for a weight with {n} inputs, got {tuple(H.shape)}")
    if delta is not None and delta.shape != (n, n):
        raise ValueError(f"Δ must be [{n}, {n}], got {tuple(delta.shape)}")
    L, used = cholesky(H, ridge, auto_ridge, name)
    Wd = W.double()
    G0 = Wd @ L
    G1 = _solve_right_LT(Wd @ delta.double(), L) if delta is not None else None
    info = SaesInfo(beta=0.0, rho=0.0, rho0=0.0, ridge=used)
    if isinstance(beta, str):
        if beta not in ("aces", "grid"):
            raise ConfigError(f"beta must be a number, 'aces' or 'grid'; got {beta!r}")
        if G1 is not None and (grid or beta == "grid"):
            info.beta_grid, info.rho_grid = grid_beta(G0, G1, r, beta_max, grid or 21)
        if G1 is not None and beta == "aces":
            info.aces = aces_beta(G0, G1, r, beta_max, shrink, method=aces_method)
            info.beta = info.aces.beta
        elif G1 is not None:
            info.beta = info.beta_grid  # type: ignore[assignment]
    else:
        info.beta = float(beta)
        if not 0.0 <= info.beta < 1.0:
            raise ConfigError(f"β = α/(1+α) must be in [0, 1), got {info.beta}")
    G = G0 if G1 is None or info.beta == 0.0 else G0 + info.beta * G1
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    A, Bw = _split(U, S, Vh, r)
    B = _solve_right_Linv(Bw, L)
    s2 = S.double() ** 2
    info.rho = float(s2[:r].sum() / s2.sum().clamp_min(1e-300))
    info.rho0 = info.rho if G is G0 else retained_energy(G0, r)
    return A, B, info
