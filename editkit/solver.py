"""The preservation–memorization solver behind ROME, MEMIT and EMMET.

All three minimise the preservation term ``‖Ŵ K0 − W K0‖²`` (which only needs
``C0 ∝ K0 K0ᵀ``) and differ in how the new pairs ``(K, V = W K + R)`` are memorized:

* least squares (MEMIT):   Δ = R Kᵀ (λ C0 + K Kᵀ)⁻¹
* equality (ROME, EMMET):  Δ = R D⁻¹ Kᵀ C0⁻¹,  D = Kᵀ C0⁻¹ K (+ λ_E I when E > 1)

ROME is the equality form with E = 1. Solves use Cholesky factorizations, never
explicit inverses, in float64 by default.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["solve", "Solution", "SingularSystemError", "least_squares_delta", "equality_delta", "ridge"]

Constraint = Literal["least_squares", "equality"]


class SingularSystemError(RuntimeError):
    """The edit's linear system is singular or not positive definite."""


@dataclass
class Solution:
    delta: torch.Tensor  # Δ, d_out × d_in
    cond: float  # condition number of the system matrix that was factorized (D or λC0 + KKᵀ)
    cond_C0: float | None = None


#: Beyond this condition number a float64 solve no longer means anything.
MAX_COND = 1e12


def _cholesky(A: torch.Tensor, what: str, fix: str) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(A)
    if info.item() != 0 or not torch.isfinite(L).all() or _cond_from_cholesky(L) > MAX_COND:
        ev = torch.linalg.eigvalsh(A)
        raise SingularSystemError(
            f"{what} is singular or not positive definite (eigenvalues from {ev[0].item():.3g} to "
            f"{ev[-1].item():.3g}, condition number above {MAX_COND:.0e}); {fix}"
        )
    return L


def _cond_from_cholesky(L: torch.Tensor) -> float:
    """Cheap condition estimate (λ_max/λ_min ≥ (max L_ii / min L_ii)²); exact for small matrices."""
    if L.shape[0] <= 2048:
        ev = torch.linalg.eigvalsh(L @ L.T)
        return (ev[-1] / ev[0]).item() if ev[0] > 0 else float("inf")
    d = L.diagonal()
    return ((d.max() / d.min()) ** 2).item()


def ridge(C0: torch.Tensor, eps: float) -> torch.Tensor:
    """``C0 + ε·mean(diag C0)·I``: a relative ridge for statistics with dead directions.

    Small models have MLP units that never fire on the corpus; their rows and
    columns of C0 are (numerically) zero, and C0 is singular. The ridge makes the
    solve well posed while changing nothing measurable along live directions, and
    the update along a dead direction is multiplied by an activation that is zero.
    """
    if not eps:
        return C0
    return C0 + eps * C0.diagonal().mean() * torch.eye(C0.shape[0], dtype=C0.dtype, device=C0.device)


def least_squares_delta(K: torch.Tensor, R: torch.Tensor, C0: torch.Tensor, lam: float) -> Solution:
    """MEMIT: ``Δ = R Kᵀ (λ C0 + K Kᵀ)⁻¹`` (the normal equations ``Δ(λC0 + KKᵀ) = R Kᵀ``)."""
    A = lam * C0 + K @ K.T
    L = _cholesky(A, "λ·C0 + K Kᵀ", "increase reg (λ, mom2_update_weight), estimate C0 from more tokens, or set "
                  "c0_ridge (e.g. 1e-6) if the layer has dead units")
    delta = torch.cholesky_solve(K @ R.T, L).T  # A symmetric: Δᵀ = A⁻¹ K Rᵀ
    return Solution(delta, _cond_from_cholesky(L))


def equality_delta(K: torch.Tensor, R: torch.Tensor, C0: torch.Tensor, lam_E: float = 0.0) -> Solution:
    """ROME / EMMET: ``Δ = R D⁻¹ (C0⁻¹ K)ᵀ`` with ``D = Kᵀ C0⁻¹ K (+ λ_E I if E > 1)``."""
    L0 = _cholesky(C0, "C0", "estimate C0 from more tokens (n_samples / max_tokens ≫ d_in), or set "
                    "c0_ridge (e.g. 1e-6) if the layer has units that never fire")
    C0inv_K = torch.cholesky_solve(K, L0)  # d_in × E
    D = K.T @ C0inv_K
    if K.shape[1] > 1 and lam_E:
        D = D + lam_E * torch.eye(D.shape[0], dtype=D.dtype, device=D.device)
    LD = _cholesky(D, f"D = Kᵀ C0⁻¹ K ({D.shape[0]}×{D.shape[0]})",
                   "the keys are linearly dependent (duplicate subjects in one batch?); drop duplicates or "
                   "set reg (λ_E, lambda_e) > 0")
    delta = R @ torch.cholesky_solve(C0inv_K.T, LD)  # R D⁻¹ (C0⁻¹K)ᵀ
    return Solution(delta, _cond_from_cholesky(LD))


def solve(K: torch.Tensor, R: torch.Tensor, C0: torch.Tensor, constraint: Constraint, reg: float,
          dtype: torch.dtype = torch.float64) -> Solution:
    """Δ for keys ``K`` (d_in × E), residuals ``R`` (d_out × E) and second moment ``C0``.

    ``reg`` is λ (``mom2_update_weight``) for least squares and λ_E for equality.
    Computed in ``dtype`` on ``K``'s device; raises :class:`SingularSystemError`
    rather than ever returning non-finite weights.
    """
    K, R, C0 = (t.to(device=K.device, dtype=dtype) for t in (K, R, C0))
    if K.shape[0] != C0.shape[0] or K.shape[1] != R.shape[1]:
        raise ValueError(f"shape mismatch: K {tuple(K.shape)}, R {tuple(R.shape)}, C0 {tuple(C0.shape)}")
    if constraint == "least_squares":
        sol = least_squares_delta(K, R, C0, reg)
    elif constraint == "equality":
        sol = equality_delta(K, R, C0, reg)
    else:
        raise ValueError(f"constraint={constraint!r}: choose 'least_squares' or 'equality'")
    if not torch.isfinite(sol.delta).all():
        raise SingularSystemError("the update is not finite; the system is numerically singular")
    return sol
