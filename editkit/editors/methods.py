"""ROME, r-ROME, unified-ROME, MEMIT and EMMET: each a dataclass of defaults and aliases on :class:`Editor`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..requests import EditRequest
from .base import Editor
from .registry import register


@register
@dataclass(kw_only=True)
class ROME(Editor):
    """Rank-one edit of one fact at one layer (equality constraint). Several requests
    are applied one after another, each a rank-one update of the already-edited model.
    ``ROME(layer=5)`` is ``ROME(layers=[5])``."""

    method: ClassVar[str] = "ROME"
    constraint: ClassVar[str] = "equality"
    aliases: ClassVar[dict[str, str]] = {"layer": "layers"}
    rome_conventions: ClassVar[bool] = True
    original_rome: ClassVar[bool] = True
    one_at_a_time: ClassVar[bool] = True  # a batch's weights do not depend on the batch size

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.layers) != 1:
            raise ValueError(f"layers: ROME edits exactly one layer (got {self.layers}); "
                             "use MEMIT or EMMET to spread an edit over several")

    @property
    def layer(self) -> int:
        return self.layers[0]

    def _groups(self, reqs: list[EditRequest]) -> list[list[EditRequest]]:
        return [[r] for r in reqs]


@register
@dataclass(kw_only=True)
class MEMIT(Editor):
    """Batched least-squares edit spread over ``layers``; ``reg`` is λ (MEMIT's ``mom2_update_weight``)."""

    reg: float = 15000.0
    method: ClassVar[str] = "MEMIT"
    constraint: ClassVar[str] = "least_squares"
    aliases: ClassVar[dict[str, str]] = {"mom2_update_weight": "reg"}


@register
@dataclass(kw_only=True)
class EMMET(Editor):
    """Batched equality-constrained edit (batched ROME); ``reg`` is λ_E (``lambda_e``), which conditions D."""

    reg: float = 0.1
    # The authors scale C0 by w = mom2_update_weight before adding λ_E to D, which is λ_E' = w·λ_E on
    # the unscaled C0 (the update is otherwise unchanged): the solve's ridge is w·λ_E (GPT-2 XL: 1000 × 0.1).
    mom2_update_weight: float = 1.0
    method: ClassVar[str] = "EMMET"
    constraint: ClassVar[str] = "equality"
    aliases: ClassVar[dict[str, str]] = {"lambda_e": "reg", "emmet_lambda": "reg"}

    @property
    def solve_reg(self) -> float:
        return self.mom2_update_weight * self.reg


@register
@dataclass(kw_only=True)
class RROME(ROME):
    """r-ROME (Gupta et al., "Rebuilding ROME", 2024): ROME with the same averaged key k̄ in the
    numerator and the denominator of the rank-one update,

        Δ = (v* − W k̄) (C0⁻¹ k̄)ᵀ / (k̄ᵀ C0⁻¹ k̄),   so that (W + Δ) k̄ = v*,

    k̄ the flat mean of the subject's key over ROME's context prefixes and the bare prompt,
    v* = h + δ with δ on the MLP output. The original ROME divides by k_curᵀC0⁻¹k̄ and
    subtracts W k_cur, k_cur being the bare prompt's key: a mismatch that collapses models
    after some edits. Under the reference protocol this is the r-ROME paper's code
    (scalable-model-editing/rebuilding-rome; measured distance: docs/protocols.md, fidelity).
    ``RROME(layer=5)``."""

    method: ClassVar[str] = "r-ROME"
    original_rome: ClassVar[bool] = False
    mean_key_residual: ClassVar[bool] = True


@register
@dataclass(kw_only=True)
class UnifiedROME(ROME):
    """ROME as the batch-editing study's code ran it (unified-model-editing at cf1907f,
    ``alg_name="ROME"``): EMMET's equality solve for one fact, ``Δ = (z* − z)(C0⁻¹k̄)ᵀ/(k̄ᵀC0⁻¹k̄)``,
    with MEMIT's conventions — its 5 context prefixes, the grouped key mean k̄, δ on the block
    output, the residual z* − z read at the bare prompt. The same k̄ in both places of the
    denominator as r-ROME, but not r-ROME's numerator, so the edited module maps k̄ to
    W k̄ + (z* − z), not to v*. Keep it to reproduce the study's ROME numbers
    (measured distance: docs/protocols.md, fidelity). ``UnifiedROME(layer=5)``."""

    method: ClassVar[str] = "unified-ROME"
    rome_conventions: ClassVar[bool] = False
    original_rome: ClassVar[bool] = False
