"""The preservation–memorization solver behind ROME, MEMIT and EMMET.

All three minimise the preservation term ``‖Ŵ K0 − W K0‖²`` (which only needs
``C0 ∝ K0 K0ᵀ``) and differ in how the new pairs ``(K, V = W K + R)`` are memorized:

* least squares (MEMIT):   Δ = R Kᵀ (λ C0 + K Kᵀ)⁻¹
* equality (ROME, EMMET):  Δ = R D⁻¹ Kᵀ C0⁻¹,  D = Kᵀ C0⁻¹ K (+ λ_E I when E > 1)

ROME is the equality form with E = 1. Solves use Cholesky factorizations, never
explicit inverses, in float64 by default.

Two paths give the same Δ:

* ``"cached"`` (default): C0 is factorized once per layer, ``C0 = L Lᵀ`` (a
  :class:`C0Factor`), and every batch works with the whitened keys ``W = L⁻¹K``.
  For MEMIT this uses the push-through identity
  ``Kᵀ(λC0 + KKᵀ)⁻¹ = (λI + KᵀC0⁻¹K)⁻¹ KᵀC0⁻¹``, so both constraints reduce to an
  E × E system ``(D + ρI)`` with ``D = WᵀW`` and ``ρ = λ`` (MEMIT) or ``λ_E``
  (EMMET): a batch costs two triangular solves, O(d²E), plus O(E³), instead of a
  fresh O(d³) factorization. (MEMIT is EMMET with λ_E = λ.)
* ``"direct"``: factorize ``λC0 + KKᵀ`` (MEMIT) or C0 (ROME/EMMET) for every batch.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch

__all__ = ["solve", "Solution", "SingularSystemError", "least_squares_delta", "equality_delta", "ridge",
           "C0Factor", "push_through_delta", "c0_checksum"]

Constraint = Literal["least_squares", "equality"]
SolvePath = Literal["cached", "direct"]


class SingularSystemError(RuntimeError):
    """The edit's linear system is singular or not positive definite."""


@dataclass
class Solution:
    delta: torch.Tensor  # Δ, d_out × d_in
    cond: float  # condition number of the system matrix that was factorized (D + ρI, or λC0 + KKᵀ)
    cond_C0: float | None = None
    path: str = "direct"


#: Beyond this condition number a float64 solve no longer means anything.
MAX_COND = 1e12

_C0_FIX = ("estimate C0 from more tokens (n_samples / max_tokens ≫ d_in), or set c0_ridge (e.g. 1e-6) if the layer "
           "has units that never fire")


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


def c0_checksum(C0: torch.Tensor) -> str:
    """sha256 of C0's shape, dtype and bytes: ties a stored factor to the exact C0 it factorizes."""
    t = C0.detach().contiguous().cpu()
    h = hashlib.sha256(f"{tuple(t.shape)}:{t.dtype}".encode())
    h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


@dataclass
class C0Factor:
    """One layer's preservation statistics in solved form: ``C0 + ridge = L Lᵀ``.

    Factorized once (O(d³)) and reused by every batch edited at that layer
    (sequential runs edit thousands of batches against the same C0), so a batch
    only pays O(d²E). ``derived`` holds other per-layer products of the same C0
    that a method builds once and reuses — e.g. AlphaEdit's null-space projector
    from C0's eigendecomposition — filled on first use by :meth:`derive`.
    Only ``L`` is needed to solve; C0 itself can be dropped (half the memory).
    """

    L: torch.Tensor  # lower triangular, d_in × d_in
    ridge: float = 0.0  # the relative ridge ε that was added before factorizing (see :func:`ridge`)
    cond: float = math.nan  # condition number (estimate for d_in > 2048) of C0 + ridge
    checksum: str | None = None  # c0_checksum of the C0 it was computed from (cache verification)
    derived: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, C0: torch.Tensor, ridge_eps: float = 0.0, dtype: torch.dtype = torch.float64,
           device: torch.device | str | None = None, checksum: bool = False) -> "C0Factor":
        """Factorize ``C0 + ε·mean(diag C0)·I`` in ``dtype`` on ``device`` (default: C0's)."""
        C = ridge(C0.to(device=device or C0.device, dtype=dtype), ridge_eps)
        L = _cholesky(C, "C0", _C0_FIX)
        return cls(L, float(ridge_eps), _cond_from_cholesky(L), c0_checksum(C0) if checksum else None)

    @property
    def d_in(self) -> int:
        return self.L.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.L.dtype

    @property
    def device(self) -> torch.device:
        return self.L.device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "C0Factor":
        """The same factor on another device / in another dtype (derived products are recomputed there)."""
        if (device is None or torch.device(device) == self.device) and (dtype is None or dtype == self.dtype):
            return self
        return C0Factor(self.L.to(device=device or self.device, dtype=dtype or self.dtype), self.ridge, self.cond,
                        self.checksum)

    def whiten(self, K: torch.Tensor) -> torch.Tensor:
        """``L⁻¹ K``: keys in the metric of C0 (``(L⁻¹K)ᵀ(L⁻¹K) = Kᵀ C0⁻¹ K``)."""
        return torch.linalg.solve_triangular(self.L, K, upper=False)

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """``C0⁻¹ B`` by two triangular solves (no inverse is ever formed)."""
        return torch.linalg.solve_triangular(self.L.mT, self.whiten(B), upper=True)

    def derive(self, name: str, build: Callable[["C0Factor"], torch.Tensor]) -> torch.Tensor:
        """``build(self)`` once per name, then the stored result (per-layer products of C0)."""
        if name not in self.derived:
            self.derived[name] = build(self)
        return self.derived[name]

    def save(self, path: str | Path) -> None:
        """safetensors with the ridge, condition number and C0 checksum in its metadata."""
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"L": self.L.contiguous().cpu()}, str(tmp),
                  metadata={"ridge": repr(self.ridge), "cond": repr(self.cond), "checksum": self.checksum or ""})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, checksum: str | None = None) -> "C0Factor | None":
        """The stored factor, or ``None`` when its C0 checksum differs from ``checksum`` (stale or foreign file)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if checksum is not None and meta.get("checksum") != checksum:
                return None
            L = f.get_tensor("L")
        return cls(L, float(meta.get("ridge", 0.0)), float(meta.get("cond", "nan")), meta.get("checksum") or None)


def least_squares_delta(K: torch.Tensor, R: torch.Tensor, C0: torch.Tensor, lam: float) -> Solution:
    """MEMIT, direct: ``Δ = R Kᵀ (λ C0 + K Kᵀ)⁻¹``, factorizing ``λC0 + KKᵀ`` (O(d³)) for this batch."""
    A = lam * C0 + K @ K.T
    L = _cholesky(A, "λ·C0 + K Kᵀ", "increase reg (λ, mom2_update_weight), estimate C0 from more tokens, or set "
                  "c0_ridge (e.g. 1e-6) if the layer has dead units")
    delta = R @ torch.cholesky_solve(K, L).T  # A symmetric: Kᵀ A⁻¹ = (A⁻¹ K)ᵀ; E right-hand sides, not d_out
    return Solution(delta, _cond_from_cholesky(L), path="direct")


def push_through_delta(K: torch.Tensor, R: torch.Tensor, F: C0Factor, rho: float,
                       K_cur: torch.Tensor | None = None) -> Solution:
    """``Δ = R (D + ρI)⁻¹ (C0⁻¹K)ᵀ`` with ``D = KᵀC0⁻¹K = WᵀW``, ``W = L⁻¹K``, on a cached factor.

    ρ = λ gives MEMIT's least-squares update (push-through identity), ρ = λ_E
    EMMET's equality update (ρ = 0: ROME). Cost O(d²E + d·E² + E³ + d_out·d·E).
    ``K_cur`` replaces the left factor of D (``D = K_curᵀC0⁻¹K``): the original ROME's
    denominator ``k_curᵀC0⁻¹k*`` with the un-prefixed key, so that ``Δ k_cur = R``.
    """
    W = F.whiten(K)  # d × E
    if K_cur is not None:
        D = F.whiten(K_cur).T @ W  # not symmetric: an LU solve
        if rho:
            D = D + rho * torch.eye(D.shape[0], dtype=D.dtype, device=D.device)
        if not torch.isfinite(D).all() or torch.linalg.matrix_rank(D) < D.shape[0]:
            raise SingularSystemError(f"D = K_curᵀ C0⁻¹ K ({D.shape[0]}×{D.shape[0]}) is singular; the "
                                      "un-prefixed and the averaged keys are C0-orthogonal")
        Y = torch.linalg.solve_triangular(F.L.mT, W, upper=True)  # C0⁻¹ K
        delta = torch.linalg.solve(D.T, R.T).T @ Y.T  # R D⁻¹ (C0⁻¹K)ᵀ
        return Solution(delta, torch.linalg.cond(D).item(), F.cond, path="cached")
    D = W.T @ W  # Kᵀ C0⁻¹ K, symmetric PSD by construction
    if rho:
        D = D + rho * torch.eye(D.shape[0], dtype=D.dtype, device=D.device)
    LD = _cholesky(D, f"D = Kᵀ C0⁻¹ K ({D.shape[0]}×{D.shape[0]})" + (f" + {rho:g}·I" if rho else ""),
                   "the keys are linearly dependent (duplicate subjects in one batch?); drop duplicates or "
                   "set reg (λ_E, lambda_e) > 0")
    Y = torch.linalg.solve_triangular(F.L.mT, W, upper=True)  # C0⁻¹ K
    delta = torch.cholesky_solve(R.T, LD).T @ Y.T  # (D + ρI)⁻¹ symmetric
    return Solution(delta, _cond_from_cholesky(LD), F.cond, path="cached")


def equality_delta(K: torch.Tensor, R: torch.Tensor, C0: torch.Tensor | C0Factor, lam_E: float = 0.0,
                   K_cur: torch.Tensor | None = None) -> Solution:
    """ROME / EMMET: ``Δ = R D⁻¹ (C0⁻¹ K)ᵀ`` with ``D = Kᵀ C0⁻¹ K (+ λ_E I if E > 1)``.

    Given a tensor, C0 is factorized for this call (the direct path); given a
    :class:`C0Factor`, its cached factor is reused.
    """
    F = C0 if isinstance(C0, C0Factor) else C0Factor.of(C0)
    sol = push_through_delta(K, R, F, lam_E if K.shape[1] > 1 else 0.0, K_cur)
    sol.path = "cached" if isinstance(C0, C0Factor) else "direct"
    return sol


def solve(K: torch.Tensor, R: torch.Tensor, C0: torch.Tensor | C0Factor, constraint: Constraint, reg: float,
          dtype: torch.dtype = torch.float64, path: SolvePath = "cached", K_cur: torch.Tensor | None = None
          ) -> Solution:
    """Δ for keys ``K`` (d_in × E), residuals ``R`` (d_out × E) and second moment ``C0``.

    ``C0`` is the d_in × d_in tensor or its :class:`C0Factor`. ``reg`` is λ
    (``mom2_update_weight``) for least squares and λ_E for equality. ``path``:
    ``"cached"`` solves on the factor (computed here if a tensor was given;
    pass a :class:`C0Factor` to reuse one across batches), ``"direct"``
    factorizes the batch's own system (needs the C0 tensor). Computed in
    ``dtype`` on K's device — with a factor, in the factor's dtype on its device
    (e.g. a float32 factor kept on the CPU), Δ returned on K's device. Raises
    :class:`SingularSystemError` rather than ever returning non-finite weights.
    """
    out_device = K.device
    if isinstance(C0, C0Factor):
        if path != "cached":
            raise ValueError("path='direct' needs the C0 tensor, not its C0Factor; pass C0 or use path='cached'")
        dev, dtype, d_in = C0.device, C0.dtype, C0.d_in
    else:
        dev, d_in = K.device, C0.shape[0]
        C0 = C0.to(device=dev, dtype=dtype)
    K, R = (t.to(device=dev, dtype=dtype) for t in (K, R))
    if K_cur is not None:  # the original ROME's denominator keys (see push_through_delta)
        if constraint != "equality" or K_cur.shape != K.shape:
            raise ValueError(f"K_cur (shape {tuple(K_cur.shape)}) is ROME's equality denominator; it needs "
                             f"constraint='equality' and the shape of K {tuple(K.shape)}")
        K_cur = K_cur.to(device=dev, dtype=dtype)
    if K.shape[0] != d_in or K.shape[1] != R.shape[1]:
        raise ValueError(f"shape mismatch: K {tuple(K.shape)}, R {tuple(R.shape)}, C0 {d_in}×{d_in}")
    if constraint not in ("least_squares", "equality"):
        raise ValueError(f"constraint={constraint!r}: choose 'least_squares' or 'equality'")
    if path not in ("cached", "direct"):
        raise ValueError(f"path={path!r}: choose 'cached' (reuse C0's factor) or 'direct' (factorize per batch)")
    if path == "direct":
        sol = (least_squares_delta(K, R, C0, reg) if constraint == "least_squares"
               else equality_delta(K, R, C0, reg, K_cur))
    else:
        F = C0 if isinstance(C0, C0Factor) else C0Factor.of(C0)
        rho = reg if constraint == "least_squares" else (reg if K.shape[1] > 1 else 0.0)
        sol = push_through_delta(K, R, F, rho, K_cur)
    if not torch.isfinite(sol.delta).all():
        raise SingularSystemError("the update is not finite; the system is numerically singular")
    sol.delta = sol.delta.to(out_device)
    return sol
