"""ROME, MEMIT and EMMET as thin configurations of one solver, and the reversible Edit.

An editor is a dataclass of hyperparameters. ``apply`` runs the pipeline
statistics → values → (per layer) keys, residual, solve → write, and returns an
:class:`Edit` that knows how to put the weights back bit for bit.

Every method speaks the same vocabulary: ``layers`` (the edited layers) and ``reg``
(the λ of its solve), with each paper's own name accepted as an alias
(``MEMIT(mom2_update_weight=...)``, ``EMMET(lambda_e=...)``, ``ROME(layer=...)``).
Methods live in one registry, :data:`METHODS`; a new method is one dataclass plus
``@register``, and :func:`make_editor` builds any of them the same way for the
runners, the widgets and the command line.

The package, by concept: :mod:`.edit` (the reversible Edit), :mod:`.presets`, :mod:`.base`
(the Editor), :mod:`.registry` (METHODS, register, make_editor), :mod:`.methods` (ROME, r-ROME,
unified-ROME, MEMIT, EMMET) and :mod:`.alphaedit`.
"""
from .edit import HUGE_UPDATE_RATIO, Edit, EditError, EditWarning, summarized_edit_warnings
from .presets import available_presets, preset_for
from .base import PEER_ALIASES, Editor
from .registry import METHODS, make_editor, register
from .methods import EMMET, MEMIT, ROME, RROME, UnifiedROME
from .alphaedit import AlphaEdit, preserved_keys

__all__ = ["EditWarning", "Editor", "ROME", "RROME", "UnifiedROME", "MEMIT", "EMMET", "AlphaEdit", "preserved_keys", "Edit", "EditError", "METHODS", "register", "make_editor",
           "available_presets", "preset_for", "summarized_edit_warnings", "HUGE_UPDATE_RATIO", "PEER_ALIASES"]
