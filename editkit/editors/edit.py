"""The reversible :class:`Edit` an editor returns, and the per-edit warnings a study
summarizes once instead of per edit."""
from __future__ import annotations

import logging
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



class _EditWarnings(logging.Filter):
    """Holds back the per-edit warnings (value optimization not converged, update dwarfing
    the weights) and counts them, so a study of hundreds of edits says it once, at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[tuple[str, str], list] = {}  # (kind, method) -> [flagged, out of, first message]

    def filter(self, record: logging.LogRecord) -> bool:
        kind = getattr(record, "editkit_kind", None)
        if kind is None:
            return True
        method = str(record.args[0]) if isinstance(record.args, tuple) and record.args else "?"
        c = self.counts.setdefault((kind, method), [0, 0, record.getMessage()])
        bad, total = getattr(record, "editkit_count", (1, 1))
        c[0] += bad
        c[1] += total
        return False


@contextmanager
def summarized_edit_warnings(what: str = "this run") -> Iterator[_EditWarnings]:
    """Within the block, the editors' per-edit warnings are counted instead of logged; on
    exit one warning per kind and method gives the totals and the first example. (Each
    edit's ``converged`` flag and update norm stay in the results.)"""
    f = _EditWarnings()
    log.addFilter(f)
    try:
        yield f
    finally:
        log.removeFilter(f)
        for (kind, method), (bad, total, first) in f.counts.items():
            if kind == "not_converged":
                log.warning("%s, %s: the value optimization did not converge for %d of %d request(s) (the `converged` "
                            "column flags them; raise v_steps or v_lr). First: %s", what, method, bad, total, first)
            else:
                log.warning("%s, %s: %d edit(s) changed a layer by more than %g × its norm. First: %s", what,
                            method, bad, HUGE_UPDATE_RATIO, first)


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
        if any(e.scoped for e in below):
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
