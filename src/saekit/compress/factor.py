"""Closed-form low-rank factorisations of one weight matrix: SVD, ASVD, SVD-LLM, SAES-SVD.

Conventions: ``W`` is ``[m, n]`` (``out x in``, the ``nn.Linear`` layout) and acts on column
inputs ``x`` of size ``n``. Statistics come from calibration inputs stacked as columns of ``X``
(``[n, N]``): ``H = X Xᵀ`` and, for SAES-SVD, ``Δ = (X_f − X) Xᵀ`` where ``X_f`` are the inputs
the full-precision model sees. Every method returns ``A [m, r]`` and ``B [r, n]`` with
``W ≈ A B``; the singular values are split evenly, ``A = U_r S_r^½`` and ``B = S_r^½ V_rᵀ ...``.
All maths runs in float64; callers cast the factors back to the model dtype.

Ridge: SVD-LLM and SAES-SVD factor ``H + λI = L Lᵀ`` and use ``H + λI`` in place of ``H``
everywhere (also inside ``G(β)``), which is the exact minimiser of the CEALC objective plus
``λ‖AB − W‖²_F``; with this choice SAES-SVD at ``β = 0`` is *exactly* SVD-LLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from saekit.errors import ConfigError, DataError

METHODS = ("svd", "asvd", "svdllm", "saes")


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """Uniform rank ``r = ⌊m n (1 − ratio) / (m + n)⌋`` (ratio = fraction of parameters
    removed), clipped to ``[1, min(m, n)]``."""
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"ratio is the fraction of parameters removed, in [0, 1); got {ratio}")
    r = math.floor(m * n * (1.0 - ratio) / (m + n))
    return max(1, min(r, m, n))


def _check_rank(W: Tensor, r: int) -> None:
    if W.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(W.shape)}")
    if not 1 <= r <= min(W.shape):
        raise ConfigError(
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


def whitened_target(W: Tensor, L: Tensor, H: Tensor, delta: Tensor | None, beta: float) -> Tensor:
    """``G(β) = W (H + λI + βΔ) L⁻ᵀ`` = ``W L + β W Δ L⁻ᵀ``."""
    G = W.double() @ L
    if delta is not None and beta != 0.0:
        G = G + beta * _solve_right_LT(W.double() @ delta.double(), L)
    return G


def svdllm_factor(
    W: Tensor, H: Tensor, r: int, ridge: float = 1e-6, auto_ridge: bool = False, name: str = ""
) -> tuple[Tensor, Tensor]:
    """SVD-LLM truncation-aware whitening: ``H + λI = L Lᵀ``, ``W L = U S Vᵀ``,
    ``A = U_r S_r^½``, ``B = S_r^½ V_rᵀ L⁻¹`` (minimises ``‖(W − AB) X‖_F`` at ``λ = 0``)."""
    return saes_factor(W, H, None, r, beta=0.0, ridge=ridge, auto_ridge=auto_ridge, name=name)[:2]


@dataclass
class SaesInfo:
    """What SAES-SVD chose for one layer."""

    beta: float
    rho: float  # retained-energy ratio ρ(β) of G(β) at rank r
    rho0: float  # ρ(0)
    ridge: float  # relative ridge used
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
    name: str = "",
) -> tuple[Tensor, Tensor, SaesInfo]:
    """SAES-SVD (CEALC closed form): ``G(β) = W(H + βΔ)L⁻ᵀ``, ``U_r S_r V_rᵀ = TruncSVD_r(G)``,
    ``A = U_r S_r^½``, ``B = S_r^½ V_rᵀ L⁻¹``.

    ``beta``: a number fixes β; ``"aces"`` picks β by the fixed-subspace closed form
    (:func:`aces_beta`), then ``β ← shrink · β`` capped to ``[0, beta_max]``; ``"grid"`` picks
    the β of a ``grid``-point search (default 21) of the exact ρ(β) on ``[0, beta_max]``.
    With ``grid > 0`` and ``beta="aces"`` the grid search is also run and reported in the
    returned :class:`SaesInfo` for comparison (the closed form is still used).
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
    G1 = _solve_right_LT(Wd @ delta.double(), L) if delta is not None else torch.zeros_like(G0)
    b_grid = rho_grid = None
    if isinstance(beta, str):
        if beta not in ("aces", "grid"):
            raise ConfigError(f"beta must be a number, 'aces' or 'grid'; got {beta!r}")
        b = 0.0
        if delta is not None and (grid or beta == "grid"):
            b_grid, rho_grid = grid_beta(G0, G1, r, beta_max, grid or 21)
        if delta is not None and beta == "aces":
            b = min(max(shrink * aces_beta(G0, G1, r, beta_max), 0.0), beta_max)
        elif delta is not None:
            b = b_grid  # type: ignore[assignment]
    else:
        b = float(beta)
        if not 0.0 <= b < 1.0 and delta is not None:
            raise ConfigError(f"β = α/(1+α) must be in [0, 1), got {b}")
    G = G0 + b * G1
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    A, Bw = _split(U, S, Vh, r)
    B = _solve_right_Linv(Bw, L)
    info = SaesInfo(
        beta=b,
        rho=retained_energy(G, r),
        rho0=retained_energy(G0, r),
        ridge=used,
        beta_grid=b_grid,
        rho_grid=rho_grid,
    )
    return A, B, info


def retained_energy(G: Tensor, r: int) -> float:
    """ρ = Σ_{i≤r} σ_i²(G) / ‖G‖²_F."""
    s2 = torch.linalg.svdvals(G.double()) ** 2
    tot = float(s2.sum())
    return float(s2[:r].sum()) / tot if tot > 0 else 1.0


def grid_beta(
    G0: Tensor, G1: Tensor, r: int, beta_max: float, points: int = 21
) -> tuple[float, float]:
    """β in ``linspace(0, beta_max, points)`` maximising the exact ρ(G0 + βG1); returns (β, ρ)."""
    best = (0.0, -1.0)
    for b in torch.linspace(0.0, beta_max, points).tolist():
        rho = retained_energy(G0 + b * G1, r)
        if rho > best[1] + 1e-15:
            best = (b, rho)
    return best


def aces_coefficients(G0: Tensor, G1: Tensor, r: int) -> tuple[float, ...]:
    """Tail/total energy quadratics ``(a, b, c, A, B, C)`` under the fixed-subspace approximation.

    The top-r singular subspaces ``U_r, V_r`` of ``G(0)`` are frozen; the retained energy of
    ``G(β) = G0 + βG1`` is taken as ``‖U_rᵀ G(β) V_r‖²_F`` (two-sided projection, equal to
    Σ_{i≤r} σ_i² at β = 0), so tail = ``aβ² + bβ + c`` and total = ``Aβ² + Bβ + C``.
    """
    U, _, Vh = torch.linalg.svd(G0.double(), full_matrices=False)
    Ur, Vr = U[:, :r], Vh[:r].T
    P0, P1 = Ur.T @ G0 @ Vr, Ur.T @ G1 @ Vr
    A_, B_, C_ = float((G1 * G1).sum()), 2 * float((G0 * G1).sum()), float((G0 * G0).sum())
    pa, pb, pc = float((P1 * P1).sum()), 2 * float((P0 * P1).sum()), float((P0 * P0).sum())
    return A_ - pa, B_ - pb, C_ - pc, A_, B_, C_


def aces_beta(G0: Tensor, G1: Tensor, r: int, beta_max: float = 0.9) -> float:
    """ACES closed-form β: minimise the fixed-subspace tail ratio ``(aβ²+bβ+c)/(Aβ²+Bβ+C)``.

    Candidates are the real roots in ``[0, beta_max]`` of
    ``(aB − bA)β² + 2(aC − cA)β + (bC − cB) = 0`` plus both end points; the candidate with the
    smallest surrogate tail ratio wins (ties go to the smaller β).
    """
    a, b, c, A_, B_, C_ = aces_coefficients(G0, G1, r)

    def tail(x: float) -> float:
        den = A_ * x * x + B_ * x + C_
        return (a * x * x + b * x + c) / den if den > 0 else float("inf")

    q2, q1, q0 = a * B_ - b * A_, 2 * (a * C_ - c * A_), b * C_ - c * B_
    cands = [0.0, beta_max]
    scale = max(abs(q2), abs(q1), abs(q0), 1e-300)
    if abs(q2) > 1e-12 * scale:
        disc = q1 * q1 - 4 * q2 * q0
        if disc >= 0:
            sq = math.sqrt(disc)
            cands += [(-q1 + sq) / (2 * q2), (-q1 - sq) / (2 * q2)]
    elif abs(q1) > 1e-12 * scale:
        cands.append(-q0 / q1)
    cands = sorted(x for x in cands if 0.0 <= x <= beta_max)
    return min(cands, key=lambda x: (tail(x), x))
