"""The reversible :class:`Edit` an editor returns, and the per-edit warnings a study
summarizes once instead of per edit."""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch

from ..models import LanguageModel
from ..requests import EditRequest

log = logging.getLogger("editkit.editors")  # one logger for the package: summarized_edit_warnings filters it


#: ‖Δ‖ / ‖W‖ above which an edit is logged as suspicious. Healthy ROME edits of the world
#: models measure 1.3-2.5 (a small model's layer is small); 100 flags only runaway updates.
HUGE_UPDATE_RATIO = 100.0



class EditWarning(UserWarning):
    """Something about an edit a user must know (its update dwarfs the layer, its value
    optimization did not converge, it edits the last layer). Also flagged on ``Edit.flags``."""


class _EditWarnings:
    """Per-edit warnings held back and counted over *every* edit (flagged or not), so a study
    of hundreds of edits says "k of N" once, at the end."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], list] = {}  # (kind, method) -> [flagged, out of, first message]

    def add(self, kind: str, method: str, bad: int, total: int, message: str | None) -> None:
        c = self.counts.setdefault((kind, method), [0, 0, None])
        c[0] += bad
        c[1] += total
        if c[2] is None and bad:
            c[2] = message


#: The summaries open in this process, innermost last (see summarized_edit_warnings).
_SUMMARIES: list[_EditWarnings] = []

_SUMMARY_TEXT = {
    "not_converged": "the value optimization did not converge for {bad} of {total} request(s) (the `converged` "
                     "column flags them; raise v_steps or v_lr)",
    "huge_update": "{bad} of {total} layer update(s) changed a layer by more than {ratio:g} × its norm",
    "last_layer": "{bad} of {total} edit(s) edited the last layer, where a change at the subject cannot reach "
                  "the object's prediction",
}


def _report(kind: str, method: str, bad: int, total: int, message: str) -> None:
    """One edit's outcome for ``kind``: counted by the open summary, or (none open, ``bad`` > 0)
    logged and shown to the user with ``warnings.warn`` (a notebook shows it; logging under a
    NullHandler shows nothing)."""
    if _SUMMARIES:
        _SUMMARIES[-1].add(kind, method, bad, total, message)
    elif bad:
        log.warning("%s", message)
        warnings.warn(message, EditWarning, stacklevel=3)


@contextmanager
def summarized_edit_warnings(what: str = "this run") -> Iterator[_EditWarnings]:
    """Within the block, the editors' per-edit warnings are counted (over every edit, warned
    or not) instead of shown; on exit one warning per kind and method gives "k of N" and the
    first example, logged and through ``warnings.warn``. (Each edit's ``converged`` flag and
    update norm stay in the results, its ``flags`` on the Edit.)"""
    f = _EditWarnings()
    _SUMMARIES.append(f)
    try:
        yield f
    finally:
        _SUMMARIES.remove(f)
        for (kind, method), (bad, total, first) in f.counts.items():
            if bad:
                text = (f"{what}, {method}: " + _SUMMARY_TEXT[kind].format(bad=bad, total=total,
                                                                          ratio=HUGE_UPDATE_RATIO)
                        + f". First: {first}")
                if _SUMMARIES:  # an outer summary counts them too
                    _SUMMARIES[-1].add(kind, method, bad, total, first)
                    continue
                log.warning("%s", text)
                warnings.warn(text, EditWarning, stacklevel=3)


class EditError(RuntimeError):
    """An edit could not be applied or undone safely."""


@dataclass
class Edit:
    """The result of ``editor.apply``: per-layer deltas, norms, timings, diagnostics.

    ``originals`` hold the edited weights as ``lm.weight(layer)`` returns them
    (d_out × d_in), so nothing outside the model adapter knows about GPT-2's Conv1D.
    """

    lm: LanguageModel = field(repr=False)
    method: str
    requests: list[EditRequest] = field(repr=False)
    originals: dict[int, torch.Tensor] = field(repr=False)  # lm.weight(layer) before the edit (d_out × d_in)
    deltas: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # Δ (d_out × d_in), float32 CPU
    keys: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # K (d_in × E) at which R is written (ROME: k_cur)
    residuals: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # R (d_out × E) at each layer
    targets: torch.Tensor | None = field(default=None, repr=False)  # Z (E × d): residual wanted at the top layer
    norms: dict[int, dict[str, float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    # model state besides the weights that this edit changed, as it was before (``lm.cache``
    # key -> previous value, None if absent): AlphaEdit's K_p K_pᵀ. Undo puts it back.
    state_before: dict[Any, Any] = field(default_factory=dict, repr=False)
    # what the user must know about this edit (also warned): "huge_update" (layers), "not_converged"
    # (request indices), "last_layer" (True); empty for a healthy edit
    flags: dict[str, Any] = field(default_factory=dict)
    undone: bool = False
    committed: bool = False
    scoped: bool = field(default=False, repr=False)  # applied by ``Editor.applied``: undone when its block ends
    # What made it, for saved edits (editkit.saved): the editor (its settings: ``editor.to_dict()``; a loaded
    # edit holds them as a dict) and, per layer, where C0 came from.
    editor: Any = field(default=None, repr=False)
    c0: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)
    #: Writes an edit to a folder for ``save``: :func:`editkit.saved.save_edit`, registered by that
    #: module (the file format sits above the editors, which therefore never import it).
    writer: ClassVar[Callable[["Edit", Path], Path] | None] = None

    def save(self, path: str | Path) -> Path:
        """Write this edit to the folder ``path``: its per-layer updates (safetensors; low-rank
        factors where smaller) and a JSON card (method, settings, protocol, requests, the
        unedited model's weight fingerprint, C0's provenance, versions, norms, diagnostics).
        ``ek.load_edit(path).apply(lm)`` makes it again, in any process. See editkit.saved."""
        if Edit.writer is None:  # pragma: no cover - set when editkit is imported
            raise EditError("no edit writer is registered: import editkit (editkit.saved registers it)")
        return Edit.writer(self, Path(path))

    def undo(self) -> None:
        """Restore the edited weights exactly. Only the most recent edit can be undone."""
        if self.undone:
            raise EditError("this edit was already undone")
        if self.committed:
            raise EditError("this edit was committed: its weights are part of the model now and cannot be undone")
        if self.lm.edits and self.lm.edits[-1] is not self:
            raise EditError("undo the later edits first: edits on a model are undone in reverse order")
        with torch.no_grad():
            for layer, w in self.originals.items():
                self.lm.weight(layer).copy_(w)
        self.lm.weights_written({self.lm.weight_name(layer) for layer in self.originals})
        for key, value in self.state_before.items():
            if value is None:
                self.lm.cache.pop(key, None)
            else:
                self.lm.cache[key] = value
        self._forget()
        self.undone = True

    def commit(self) -> None:
        """Keep the edit's weights and drop its undo record (and the saved originals).

        For edits that stay: sequential editing applies batch after batch and keeps
        each, so the model's undo stack must not grow with every batch."""
        if self.undone:
            raise EditError("this edit was undone; there is nothing to commit")
        stack = self.lm.edits
        below = stack[:next((i for i, e in enumerate(stack) if e is self), len(stack))]
        if self.scoped or any(e.scoped for e in below):
            raise EditError("this edit sits inside an `applied()` block, which undoes every edit made in it on exit; "
                            "commit it outside the block")
        self._forget()
        self.originals, self.state_before = {}, {}
        self.committed = True

    def _forget(self) -> None:
        """Remove this edit from the model's undo stack (by identity: Edits hold tensors)."""
        self.lm.edits[:] = [e for e in self.lm.edits if e is not self]

    @property
    def converged(self) -> bool:
        """Whether the value optimization of every request reached its stopping criterion
        (per request in ``diagnostics["converged"]``)."""
        return all(self.diagnostics.get("converged", [True]))

    def summary(self) -> dict[str, Any]:
        """A flat dict for logs and tidy frames."""
        out: dict[str, Any] = {"method": self.method, "n_requests": len(self.requests)}
        for layer, n in self.norms.items():
            out.update({f"{k}_L{layer}": v for k, v in n.items()})
        out.update({f"time_{k}": v for k, v in self.timings.items()})
        return out
