"""AlphaEdit: MEMIT's update projected onto the null space of the preserved keys."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..models import LanguageModel
from ..solver import C0Factor, NullSpace
from .base import Editor
from .edit import Edit
from .registry import register

log = logging.getLogger("editkit.editors")  # one logger for the package: summarized_edit_warnings filters it



def preserved_keys(lm: LanguageModel, layer: int) -> torch.Tensor | None:
    """``K_p K_pᵀ`` at ``layer``: the Gram matrix (float64, d_in × d_in) of the keys that
    AlphaEdit edits have written into ``lm`` and that are still applied, or None.

    It is state of the edited model, like its weights: each AlphaEdit edit adds its
    keys, ``undo()`` puts the previous matrix back, ``commit()`` keeps it, and
    :func:`editkit.experiments.sequential_batched` saves it beside the weights so that
    a resumed run continues with the same ``K_p``. A d_in × d_in matrix rather than
    the keys themselves: its size does not grow with the number of edits."""
    return lm.cache.get(("preserved_keys", layer))


@register
@dataclass(kw_only=True)
class AlphaEdit(Editor):
    """Null-space constrained editing (Fang et al., ICLR 2025): MEMIT's keys and values,
    with the update confined to the directions the preserved keys (almost) never visit,

        Δ = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + λ I)⁻¹,   P = Û Ûᵀ,

    Û the eigenvectors of C0 whose eigenvalues are below ``nullspace_threshold``
    (absolute, the authors' convention, or a fraction of the top eigenvalue with
    ``nullspace_relative``; see :class:`editkit.solver.NullSpace`), λ = ``reg`` (the
    authors' ``L2``), and K_p the keys of the earlier AlphaEdit edits still applied
    to the model (:func:`preserved_keys`). Defaults are the authors' GPT-2 XL, GPT-J
    and Llama-3-8B settings (λ = 10, threshold 2e-2). C0 is never inverted, so
    ``c0_ridge`` plays no role; the projector is computed once per layer and C0 and
    cached beside it on the model."""

    reg: float = 10.0
    nullspace_threshold: float = 2e-2
    nullspace_relative: bool = False
    solve_path: str = "direct"  # C0 is never factorized: the projector comes from its eigenvectors
    method: ClassVar[str] = "AlphaEdit"
    constraint: ClassVar[str] = "null_space"
    aliases: ClassVar[dict[str, str]] = {"L2": "reg"}

    def __post_init__(self) -> None:
        super().__post_init__()
        t = self.nullspace_threshold
        if not (isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0):
            raise ValueError(f"AlphaEdit: nullspace_threshold={t!r} is impossible; give a positive number")
        if self.nullspace_relative and t >= 1:
            raise ValueError(f"AlphaEdit: nullspace_threshold={t!r} with nullspace_relative=True cuts at or above the "
                             "top eigenvalue of C0: the projector is the identity and no preserved key is protected; "
                             "give a fraction well below 1 (e.g. 1e-2)")

    def null_space(self, lm: LanguageModel, layer: int, C0: torch.Tensor | C0Factor) -> NullSpace:
        """The projector's basis for ``C0`` at ``layer`` (or for ``L Lᵀ`` of its cached
        factor), computed once and cached on ``lm`` beside C0 (reused while the same C0
        tensor or factor is passed)."""
        key = ("null_space", layer, self.nullspace_threshold, self.nullspace_relative)
        hit = lm.cache.get(key)
        if hit is None or hit[0] is not C0:
            C = C0.L @ C0.L.mT if isinstance(C0, C0Factor) else C0
            ns = NullSpace.of(C, self.nullspace_threshold, self.nullspace_relative)
            log.info("AlphaEdit layer %d: the null space of C0 has %d of %d dimensions (eigenvalues < %.3g; "
                     "top %.3g)", layer, ns.rank, ns.basis.shape[0], ns.cut, ns.top)
            hit = lm.cache[key] = (C0, ns)
        return hit[1]

    def _solve_inputs(self, lm: LanguageModel, layer: int, C0: torch.Tensor | C0Factor) -> dict[str, Any]:
        return {"null_space": self.null_space(lm, layer, C0), "preserved": preserved_keys(lm, layer)}

    def _written(self, lm: LanguageModel, layer: int, K: torch.Tensor, edit: Edit) -> None:
        key = ("preserved_keys", layer)
        old = lm.cache.get(key)
        edit.state_before.setdefault(key, old)
        K = K.to(torch.float64)
        # a new tensor, never in place: the Edit's reference to the old one is its undo record
        lm.cache[key] = K @ K.T if old is None else old + K.to(old.device) @ K.to(old.device).T

    def sequential_state(self, lm: LanguageModel) -> dict[str, torch.Tensor]:
        return {f"preserved_keys.{l}": g for l in self.layers if (g := preserved_keys(lm, l)) is not None}

    def load_sequential_state(self, lm: LanguageModel, tensors: dict[str, torch.Tensor]) -> None:
        for l in self.layers:
            g = tensors.get(f"preserved_keys.{l}")
            if g is None:
                lm.cache.pop(("preserved_keys", l), None)
            else:
                lm.cache[("preserved_keys", l)] = g.to(torch.float64)
