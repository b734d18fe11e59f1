"""The preservation–memorization solver behind ROME, MEMIT and EMMET.

All three minimise the preservation term ``‖Ŵ K0 − W K0‖²`` (which only needs
``C0 ∝ K0 K0ᵀ``) and differ in how the new pairs ``(K, V = W K + R)`` are memorized:

* least squares (MEMIT):   Δ = R Kᵀ (λ C0 + K Kᵀ)⁻¹
* equality (ROME, EMMET):  Δ = R D⁻¹ Kᵀ C0⁻¹,  D = Kᵀ C0⁻¹ K (+ λ_E I when E > 1)
* null space (AlphaEdit):  Δ = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + λ I)⁻¹,  P = Û Ûᵀ

ROME is the equality form with E = 1. In the null-space form the preservation term
is not traded off at all: Δ is confined to the directions where C0 has (almost) no
energy, see :class:`NullSpace`. Solves use Cholesky factorizations, never
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
import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch

log = logging.getLogger(__name__)

__all__ = ["solve", "Solution", "SingularSystemError", "least_squares_delta", "equality_delta", "ridge",
           "C0Factor", "push_through_delta", "c0_checksum", "NullSpace", "null_space_delta"]

Constraint = Literal["least_squares", "equality", "null_space"]
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
        """safetensors with the ridge, condition number, C0 checksum, and the factor's own
        shape, dtype and sha256 in its metadata (verified by :meth:`load`); written atomically."""
        import os
        import uuid

        from safetensors.torch import save_file

        path = Path(path)
        L = self.L.contiguous().cpu()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        save_file({"L": L}, str(tmp),
                  metadata={"ridge": repr(self.ridge), "cond": repr(self.cond), "checksum": self.checksum or "",
                            "sha256": c0_checksum(L), "shape": json.dumps(list(L.shape)), "dtype": str(L.dtype)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path, checksum: str | None = None, *, d_in: int | None = None,
             dtype: torch.dtype | None = None) -> "C0Factor | None":
        """The stored factor, verified: its C0 checksum equals ``checksum`` (else it is stale or
        foreign), its shape is ``d_in × d_in``, its dtype ``dtype``, its bytes match the sha256 it
        was saved with, it is finite. Otherwise ``None`` with a warning naming the file and why
        (garbage, truncated and bit-flipped files included): the caller recomputes it."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if checksum is not None and meta.get("checksum") != checksum:
                    raise ValueError("it was made from another C0 (its C0 checksum differs)")
                if "sha256" not in meta:
                    raise ValueError("no checksum of its own in its metadata (written by an older editkit)")
                L = f.get_tensor("L")
            if L.ndim != 2 or L.shape[0] != L.shape[1] or (d_in is not None and L.shape[0] != d_in):
                raise ValueError(f"shape {tuple(L.shape)} ≠ ({d_in}, {d_in})")
            if dtype is not None and L.dtype != dtype:
                raise ValueError(f"dtype {L.dtype} ≠ {dtype}")
            if c0_checksum(L) != meta["sha256"]:
                raise ValueError("its bytes do not match the sha256 it was saved with")
            if not torch.isfinite(L).all():
                raise ValueError("it holds NaN/inf")
            F = cls(L, float(meta.get("ridge", 0.0)), float(meta.get("cond", "nan")), meta.get("checksum") or None)
        except Exception as exc:  # safetensors raises its own types for garbage, truncated or empty files
            log.warning("cached C0 factor %s is unusable (%s: %s); recomputing it", path, type(exc).__name__, exc)
            return None
        return F


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
          dtype: torch.dtype = torch.float64, path: SolvePath = "cached", K_cur: torch.Tensor | None = None, *,
          null_space: "NullSpace | None" = None, preserved: torch.Tensor | None = None) -> Solution:
    """Δ for keys ``K`` (d_in × E), residuals ``R`` (d_out × E) and second moment ``C0``.

    ``C0`` is the d_in × d_in tensor or its :class:`C0Factor`. ``reg`` is λ
    (``mom2_update_weight``) for least squares and λ_E for equality. ``path``:
    ``"cached"`` solves on the factor (computed here if a tensor was given;
    pass a :class:`C0Factor` to reuse one across batches), ``"direct"``
    factorizes the batch's own system (needs the C0 tensor). Computed in
    ``dtype`` on K's device — with a factor, in the factor's dtype on its device
    (e.g. a float32 factor kept on the CPU), Δ returned on K's device. Raises
    :class:`SingularSystemError` rather than ever returning non-finite weights.

    ``constraint="null_space"`` (AlphaEdit) never factorizes C0: ``reg`` is the weight
    of ``‖Δ‖²`` (the authors' ``L2``), ``null_space`` the projector's basis (default
    ``NullSpace.of(C0)``, the authors' absolute threshold) and ``preserved`` the Gram
    matrix ``K_p K_pᵀ`` (d_in × d_in) of earlier edits' keys; ``path`` plays no role.
    """
    out_device = K.device
    if constraint != "null_space" and (null_space is not None or preserved is not None):
        raise ValueError(f"null_space= and preserved= belong to constraint='null_space', not {constraint!r}")
    if constraint == "null_space":
        if null_space is None:
            C = C0.L @ C0.L.mT if isinstance(C0, C0Factor) else C0
            null_space = NullSpace.of(C.to(dtype))
        K, R = (t.to(dtype=dtype) for t in (K, R))
        if K.shape[0] != null_space.basis.shape[0] or K.shape[1] != R.shape[1]:
            raise ValueError(f"shape mismatch: K {tuple(K.shape)}, R {tuple(R.shape)}, null-space basis "
                             f"{tuple(null_space.basis.shape)}")
        sol = null_space_delta(K, R, null_space, reg, preserved)
        if not torch.isfinite(sol.delta).all():
            raise SingularSystemError("the update is not finite; the system is numerically singular")
        return sol
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
        raise ValueError(f"constraint={constraint!r}: choose 'least_squares', 'equality' or 'null_space'")
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


# --- AlphaEdit: the update confined to the null space of the preserved keys ---------

@dataclass
class NullSpace:
    """The directions of key space that the preserved keys (almost) never visit.

    ``C0 = E[k kᵀ]`` has eigenpairs ``(μ_j, u_j)`` with ``μ_j = E[(u_jᵀ k)²]``: the
    mean squared component of a preserved key along ``u_j``. The basis ``Û`` holds
    the ``u_j`` with ``μ_j`` below the cut, and ``P = Û Ûᵀ`` projects onto their
    span. An update with ``Δ = Δ P`` then changes ``W k`` only by ``Δ k = Δ Û Ûᵀ k``,
    whose mean square over preserved keys is at most the cut times ``‖Δ‖²``: the
    preserved outputs are untouched to that tolerance, without any trade-off term.

    The threshold's meaning is explicit:

    * ``relative=False`` (the authors' convention): the cut is ``threshold`` itself,
      an absolute mean squared key component. The authors' statistics are the same
      uncentered mean ``E[k kᵀ]`` as editkit's C0 (not a sum over tokens), so their
      number means the same thing here; but it is a property of one model's
      activation scale (their released GPT-2 XL and Llama-3-8B settings use 2e-2;
      the paper's text, 1e-2), not a portable constant.
    * ``relative=True``: the cut is ``threshold · μ_max``, a fraction of the top
      eigenvalue, which carries across models and layers of other scales.

    ``Û`` (d_in × r) is kept instead of the d_in × d_in ``P``: the solve works in
    the r-dimensional subspace, where its system is symmetric positive definite.
    """

    basis: torch.Tensor  # Û, d_in × r, orthonormal columns
    threshold: float
    relative: bool
    cut: float  # the absolute eigenvalue cut that was applied
    top: float  # μ_max, the largest eigenvalue of C0

    @classmethod
    def of(cls, C0: torch.Tensor, threshold: float = 2e-2, relative: bool = False) -> "NullSpace":
        """Û from the eigenvectors of ``C0`` whose eigenvalues are below the cut (see class doc)."""
        if not threshold > 0:
            raise ValueError(f"nullspace_threshold={threshold!r}: give a positive number (absolute, or a "
                             f"fraction of the top eigenvalue with relative=True)")
        if not torch.isfinite(C0).all():
            raise ValueError("C0 has non-finite entries; recompute the statistics")
        C = C0.to(torch.float64)
        mu, U = torch.linalg.eigh((C + C.T) / 2)
        top = mu[-1].item()
        cut = threshold * top if relative else threshold
        if cut > top:
            warnings.warn(f"AlphaEdit: nullspace_threshold={threshold:g} is above C0's top eigenvalue {top:.3g}: "
                          "every direction counts as null space, the projector is the identity and the update "
                          "protects no preserved key; lower the threshold (or use nullspace_relative=True with "
                          "a small fraction)", UserWarning, stacklevel=2)
        return cls(U[:, mu < cut].to(C0.dtype).contiguous(), float(threshold), bool(relative), float(cut), top)

    @property
    def rank(self) -> int:
        """r, the dimension of the null space (0: no direction is free to edit)."""
        return self.basis.shape[1]

    @property
    def projector(self) -> torch.Tensor:
        """``P = Û Ûᵀ`` (d_in × d_in), symmetric and idempotent."""
        return self.basis @ self.basis.T

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "NullSpace":
        return NullSpace(self.basis.to(device=device, dtype=dtype), self.threshold, self.relative, self.cut,
                         self.top)


def null_space_delta(K: torch.Tensor, R: torch.Tensor, null_space: NullSpace, reg: float = 1.0,
                     preserved: torch.Tensor | None = None) -> Solution:
    """AlphaEdit: ``Δ = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + λ I)⁻¹`` with ``P = Û Ûᵀ``.

    It minimizes, over updates confined to the null space (``Δ = Δ P``),

        ‖Δ K − R‖²  +  λ ‖Δ‖²  +  ‖Δ K_p‖²

    (memorize the new pairs; keep the update small; leave earlier edits' outputs
    where they are), with ``preserved = K_p K_pᵀ``. Writing ``Δ = X Ûᵀ`` the normal
    equations are ``X (Ûᵀ (K_p K_pᵀ + K Kᵀ) Û + λ I) = R Kᵀ Û``: an r × r symmetric
    positive definite system (Cholesky), the same Δ as the paper's d × d form
    (which is not symmetric) at lower cost.
    """
    U = null_space.basis.to(device=K.device, dtype=K.dtype)
    if U.shape[0] != K.shape[0]:
        raise ValueError(f"shape mismatch: null-space basis {tuple(U.shape)} for keys {tuple(K.shape)}")
    if reg < 0:
        raise ValueError(f"reg={reg!r}: the weight of ‖Δ‖² must be ≥ 0 (AlphaEdit's L2)")
    if null_space.rank == 0:
        raise SingularSystemError(
            f"the null space is empty: every eigenvalue of C0 is above the cut {null_space.cut:.3g} "
            f"(top eigenvalue {null_space.top:.3g}), so no update can leave the preserved keys untouched; "
            "raise nullspace_threshold (or use relative=True with a fraction of the top eigenvalue)")
    UK = U.T @ K  # r × E: the keys' components in the null space
    A = UK @ UK.T
    if preserved is not None:
        if preserved.shape != (K.shape[0], K.shape[0]):
            raise ValueError(f"preserved must be K_p K_pᵀ, {K.shape[0]}×{K.shape[0]} (got {tuple(preserved.shape)})")
        A = A + U.T @ preserved.to(device=K.device, dtype=K.dtype) @ U
    if reg:
        A = A + reg * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    L = _cholesky(A, f"Ûᵀ(K_p K_pᵀ + K Kᵀ)Û + λI ({A.shape[0]}×{A.shape[0]})",
                  "set reg (AlphaEdit's L2) > 0: with λ = 0 the system is singular whenever the null space "
                  "has more dimensions than there are keys")
    X = torch.cholesky_solve(UK @ R.T, L).T  # d_out × r, from X A = R Kᵀ Û (A symmetric)
    return Solution(X @ U.T, _cond_from_cholesky(L))
