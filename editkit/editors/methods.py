"""ROME, r-ROME, MEMIT and EMMET: each a dataclass of defaults and aliases on :class:`Editor`."""
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
    original_rome: ClassVar[bool] = True

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
    """r-ROME: ROME with one key in both places of the rank-one update (``k*ᵀC0⁻¹k*``), the fix
    the r-ROME paper proposes for the original ROME's collapse after some edits. Under the
    reference protocol it is the authors' r-ROME code, which is also the ROME of the study's own
    code: MEMIT's prefixes and grouped keys, δ on the residual. ``RROME(layer=5)``."""

    method: ClassVar[str] = "r-ROME"
    original_rome: ClassVar[bool] = False
